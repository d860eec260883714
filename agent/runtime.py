"""ONNX Runtime sessions that are checked against their manifest before they may serve.

The rules:

- before ONNX Runtime sees a file, `fleet.core.bundle.inspect_model` parses it without loading
  external data and refuses junk, truncated files, symbolic links and any tensor kept in an
  external file: ONNX Runtime would read such a file from wherever its location points;
- a model is usable only if ONNX Runtime opens it *and* its real inputs and outputs match the
  signed manifest (names, dtypes, ranks, fixed dims). The manifest is what clients, drift
  profiles and the controller rely on; a file that disagrees with it is a broken bundle, and
  `load_model` says so with `ModelLoadError` instead of failing on the first request;
- sessions are small citizens: one intra-op thread by default, one inter-op thread, sequential
  execution and no spinning, so that the serving and the shadow session on a 2-core device do
  not burn each other's CPU while idle;
- an accelerator provider that fails to initialise falls back to the CPU provider, and
  `LoadedModel.providers` records what the session really runs on (reported to the controller);
- requests are checked against the manifest's signature before they reach the runtime, so a
  client gets "input 'x': expected rank 4, got 3" instead of an ONNX Runtime internal message.

`LoadedModel.run` is safe to call from many threads at once (ONNX Runtime sessions are).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from fleet.core.bundle import GraphSignature, GraphTensor, inspect_model, signature_problems
from fleet.core.errors import BundleError, FleetError, InferenceInputError, ModelLoadError
from fleet.core.manifest import Manifest, TensorSpec
from fleet.core.synthetic_models import random_inputs

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# ONNX Runtime's type strings for the dtypes the manifest allows.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def session_options(threads: int = 1) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads wait for work by burning a core; two idle sessions would eat a small device.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: provider fallbacks are reported by us
    return opts


def _dims(shape: Any) -> list[int | None] | None:
    """ORT's shape as ints, with None for a symbolic/unknown dim; None if the rank is unknown."""
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def _graph_tensor(arg: Any) -> GraphTensor:
    dims = _dims(arg.shape)
    return GraphTensor(arg.name, _ORT_TYPES.get(arg.type, arg.type), None if dims is None else tuple(dims))


def check_signature(session: ort.InferenceSession, manifest: Manifest) -> list[str]:
    """Every way the session's inputs/outputs differ from the manifest (empty if they match).

    The rule is `fleet.core.bundle.signature_problems`, the one the controller applies at push.
    """
    graph = GraphSignature(
        inputs=tuple(_graph_tensor(a) for a in session.get_inputs()),
        outputs=tuple(_graph_tensor(a) for a in session.get_outputs()),
    )
    return signature_problems(manifest.inputs, manifest.outputs, graph)


class LoadedModel:
    """One open, signature-checked session of one model version."""

    def __init__(
        self,
        session: ort.InferenceSession,
        manifest: Manifest,
        providers: list[str],
        path: Path,
        threads: int = 1,
    ) -> None:
        self.session = session
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.providers = providers
        self.path = path
        self.threads = threads
        self.inputs: dict[str, TensorSpec] = {s.name: s for s in manifest.inputs}
        self.outputs: dict[str, TensorSpec] = {s.name: s for s in manifest.outputs}
        self.output_names: list[str] = [s.name for s in manifest.outputs]

    def __repr__(self) -> str:
        return f"LoadedModel({self.manifest.ref}, providers={self.providers})"

    def validate_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise `InferenceInputError` unless `inputs` fits the manifest's input signature."""
        missing = [n for n in self.inputs if n not in inputs]
        extra = [n for n in inputs if n not in self.inputs]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"unknown input(s) {', '.join(map(repr, extra))}")
            raise InferenceInputError(
                f"{self.manifest.ref}: {'; '.join(parts)}; expected {', '.join(map(repr, self.inputs))}"
            )
        for name, spec in self.inputs.items():
            arr = inputs[name]
            if not isinstance(arr, np.ndarray):
                raise InferenceInputError(f"input {name!r}: expected a numpy array, got {type(arr).__name__}")
            if arr.dtype.name != spec.dtype:
                raise InferenceInputError(
                    f"input {name!r}: expected dtype {spec.dtype}, got {arr.dtype.name}"
                )
            if arr.ndim != len(spec.shape):
                raise InferenceInputError(
                    f"input {name!r}: expected rank {len(spec.shape)} {list(spec.shape)}, "
                    f"got rank {arr.ndim} {list(arr.shape)}"
                )
            if not spec.accepts(tuple(arr.shape)):
                raise InferenceInputError(
                    f"input {name!r}: shape {list(arr.shape)} does not fit {list(spec.shape)} (-1 = any size)"
                )

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Validate and run; all outputs (or those named), by name."""
        self.validate_inputs(inputs)
        names = list(output_names) if output_names else self.output_names
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise InferenceInputError(
                f"{self.manifest.ref} has no output(s) {', '.join(map(repr, unknown))}; "
                f"outputs are {', '.join(map(repr, self.output_names))}"
            )
        try:
            results = self.session.run(names, dict(inputs))
        except OrtInvalidArgument as exc:
            # Passed the signature check but the graph still refused it (e.g. a size the model's
            # arithmetic cannot take): the request is at fault, not the model.
            raise InferenceInputError(f"{self.manifest.ref} rejected the input: {exc}") from exc
        except Exception as exc:
            raise FleetError(f"{self.manifest.ref} failed while running: {exc}") from exc
        return dict(zip(names, results, strict=True))

    def synthetic_inputs(
        self, rng: np.random.Generator | None = None, *, dynamic_size: int = 8, batch_size: int = 1
    ) -> dict[str, np.ndarray]:
        specs = list(self.inputs.values())
        return random_inputs(specs, rng, dynamic_size=dynamic_size, batch_size=batch_size)

    def warmup(self, runs: int = 3, inputs: Mapping[str, np.ndarray] | None = None) -> list[float]:
        """Run a few requests so the first real one does not pay for lazy allocation.

        Returns the latency of each run in ms. Raises `ModelLoadError` if the model cannot run:
        a version that cannot answer a well-formed request must not be switched in.
        """
        sample = dict(inputs) if inputs is not None else self.synthetic_inputs(np.random.default_rng(0))
        latencies: list[float] = []
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            try:
                self.run(sample)
            except FleetError as exc:
                raise ModelLoadError(f"{self.manifest.ref}: warm-up run failed: {exc}") from exc
            latencies.append((time.perf_counter() - start) * 1000.0)
        return latencies


def _open(path: Path, providers: list[str], threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)


def load_model(model_path: Path, manifest: Manifest, providers: list[str], threads: int = 1) -> LoadedModel:
    """Open `model_path` on `providers` (CPU fallback) and check it against `manifest`."""
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"{manifest.ref}: model file {path} does not exist")
    try:
        # The checker is left to ONNX Runtime; this pass is about what it must never be handed.
        inspect_model(path, f"{manifest.ref}: {path.name}", run_checker=False)
    except BundleError as exc:
        raise ModelLoadError(str(exc)) from exc
    available = set(ort.get_available_providers())
    wanted = [p for p in providers if p in available]
    dropped = [p for p in providers if p not in available]
    if dropped:
        log.warning("%s: providers not available in this ONNX Runtime, skipped: %s", manifest.ref, dropped)
    if CPU not in wanted:
        wanted.append(CPU)

    try:
        session = _open(path, wanted, threads)
    except Exception as exc:
        if wanted == [CPU]:
            raise ModelLoadError(
                f"{manifest.ref}: ONNX Runtime cannot open {path.name} as an ONNX model: {exc}"
            ) from exc
        log.warning("%s: session on %s failed (%s); retrying on CPU only", manifest.ref, wanted, exc)
        try:
            session = _open(path, [CPU], threads)
        except Exception as cpu_exc:
            raise ModelLoadError(
                f"{manifest.ref}: ONNX Runtime cannot open {path.name} as an ONNX model: {cpu_exc}"
            ) from cpu_exc

    problems = check_signature(session, manifest)
    if problems:
        raise ModelLoadError(
            f"{manifest.ref}: the model file does not match its manifest: " + "; ".join(problems),
            problems=problems,
        )
    active = list(session.get_providers())
    if active != wanted:
        log.info("%s: running on %s (asked for %s)", manifest.ref, active, wanted)
    return LoadedModel(session, manifest, active, path, threads)
