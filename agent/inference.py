"""The device's local inference endpoint (Open Inference Protocol v2 over gRPC) and the live sessions.

The rules this module enforces:

- **Answers come from the serving model only.** The shadow model sees a sampled share of the
  same inputs *after* the serving answer is computed, on its own worker thread behind a bounded
  queue; when the queue is full the mirror is dropped and counted, never waited for. A slow or
  crashing shadow can therefore never slow down or fail a client request.
- **Switching versions drops nothing.** Each model's assignment (serving session, shadow session,
  sample rate) is an immutable record replaced in one reference swap; a request takes the record
  once at its start and finishes on the sessions it found, so requests in flight during a switch
  complete on the old session and later ones use the new one.
- **Telemetry is windows of deltas.** Counters and histograms are kept per (model, version, role)
  and `drain_windows()` hands them over and starts new ones, in the telemetry-window dict shape of
  docs/ARCHITECTURE.md. Latencies are the runtime's own time (not time queued behind other
  requests), for serving and shadow alike, so the two are comparable.
- **Drift is measured off the request path.** Each served request's tensors are handed by
  reference to a `fleet.agent.drift.DriftTracker` (bounded queue, dropped when full); the serving
  window of each model carries the tracker's `drift` list and `profile_source`.
- **Domain errors map to gRPC status codes in one place** (`grpc_status_for`).

Readiness (`ServerReady`): the server is ready when every model it is expected to serve (see
`ModelHost.set_expected`, fed from the desired state) has a loaded serving session. With nothing
expected it is ready: a device without an assignment has nothing to wait for, and an orchestrator
(a K3s DaemonSet) must not hold it as "not ready" forever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from fleet.agent.background import BackgroundWorker
from fleet.agent.drift import DEFAULT_LEARN_SAMPLES, DEFAULT_QUEUE_SIZE, DriftTracker
from fleet.agent.runtime import LoadedModel
from fleet.core.agreement import AgreementAccumulator, compare
from fleet.core.errors import (
    ConflictError,
    FleetError,
    InferenceInputError,
    InvalidInputError,
    NotFoundError,
)
from fleet.core.histogram import DEFAULT_ACCURACY, LatencyHistogram
from fleet.core.manifest import DTYPES
from fleet.proto.errors import status_for
from fleet.proto.inference import grpc_service_pb2 as pb
from fleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# The shadow is evidence, not service: its inference must lose every contest for a core to serving.
SHADOW_NICE = 10

ROLE_SERVING = "serving"
ROLE_SHADOW = "shadow"
PLATFORM = "onnxruntime_onnx"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_SHADOW_QUEUE = 64

_OIP_TO_DTYPE = {oip: dtype for dtype, oip in DTYPES.items()}
# Which typed-contents field carries each OIP datatype (FP16 travels only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


# --------------------------------------------------------------------------------------------
# Live sessions, mirroring and counters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """What one model name runs right now. Replaced whole, never mutated."""

    serving: LoadedModel | None = None
    shadow: LoadedModel | None = None
    sample_rate: float = 0.0


@dataclass
class _Window:
    requests: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    agreement: AgreementAccumulator = field(default_factory=AgreementAccumulator)
    mirrored: int = 0
    shadow_dropped: int = 0
    paired: LatencyHistogram = field(default_factory=LatencyHistogram)
    # Shadow windows: on-CPU time of the shadow run and of the paired serving run. Wall time of the
    # shadow depends on scheduling (its thread yields to serving); CPU time compares the models.
    cpu: LatencyHistogram = field(default_factory=LatencyHistogram)
    paired_cpu: LatencyHistogram = field(default_factory=LatencyHistogram)

    def seen_traffic(self) -> bool:
        return bool(self.requests or self.errors or self.mirrored or self.shadow_dropped)


@dataclass(frozen=True)
class _Mirror:
    model: str
    shadow: LoadedModel
    serving_version: str
    inputs: Mapping[str, np.ndarray]
    serving_outputs: Mapping[str, np.ndarray]
    serving_latency_ms: float
    serving_cpu_ms: float


_WindowKey = tuple[str, str, str, str]  # model, version, role, compared_to


class ModelHost:
    """The live serving and shadow sessions of every model on this device."""

    def __init__(
        self,
        *,
        workers: int = 2,
        shadow_queue_size: int = DEFAULT_SHADOW_QUEUE,
        rng: random.Random | None = None,
        histogram_accuracy: float = DEFAULT_ACCURACY,
        profile_dir: Path | None = None,
        drift_learn_samples: int = DEFAULT_LEARN_SAMPLES,
        drift_queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        """`profile_dir` keeps learned drift profiles across restarts (None: relearn after each)."""
        self._assignments: dict[str, Assignment] = {}
        self._expected: frozenset[str] = frozenset()
        self._assign_lock = threading.Lock()  # writers only; readers take one dict lookup
        self._stats_lock = threading.Lock()
        self._windows: dict[_WindowKey, _Window] = {}
        self._accuracy = histogram_accuracy
        self._rng = rng or random.Random()
        self._executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fleet-infer")
        self._shadow_worker: BackgroundWorker[_Mirror] = BackgroundWorker(
            self._shadow_one, name="fleet-shadow", maxsize=shadow_queue_size, nice=SHADOW_NICE)
        self._closed = False
        self.drift = DriftTracker(profile_dir=profile_dir, learn_samples=drift_learn_samples,
                                  queue_size=drift_queue_size)

    # -- assignments -------------------------------------------------------------------------

    def _replace(self, name: str, **changes: Any) -> None:
        with self._assign_lock:
            current = self._assignments.get(name, Assignment())
            values = {"serving": current.serving, "shadow": current.shadow,
                      "sample_rate": current.sample_rate, **changes}
            updated = Assignment(**values)
            if updated.serving is None and updated.shadow is None:
                self._assignments.pop(name, None)
            else:
                # One reference store: a request sees the old record or the new one, never a mix.
                self._assignments[name] = updated

    @staticmethod
    def _check_name(name: str, loaded: LoadedModel | None) -> None:
        if loaded is not None and loaded.name != name:
            raise InvalidInputError(f"cannot assign {loaded.manifest.ref} under the model name {name!r}")

    def set_serving(self, name: str, loaded: LoadedModel | None) -> None:
        """Make `loaded` answer requests for `name` (None unassigns). In-flight requests finish
        on the session they started with."""
        self._check_name(name, loaded)
        self._replace(name, serving=loaded)

    def set_shadow(self, name: str, loaded: LoadedModel, sample_rate: float) -> None:
        """Mirror a `sample_rate` share (0..1) of `name`'s requests to `loaded`."""
        self._check_name(name, loaded)
        if not (isinstance(sample_rate, int | float) and 0.0 <= float(sample_rate) <= 1.0):
            raise InvalidInputError(f"shadow sample rate must be within [0, 1], got {sample_rate!r}")
        self._replace(name, shadow=loaded, sample_rate=float(sample_rate))

    def clear_shadow(self, name: str) -> None:
        self._replace(name, shadow=None, sample_rate=0.0)

    def assignment(self, name: str) -> Assignment:
        return self._assignments.get(name, Assignment())

    def serving(self, name: str) -> LoadedModel | None:
        return self.assignment(name).serving

    def shadow(self, name: str) -> LoadedModel | None:
        return self.assignment(name).shadow

    def models(self) -> list[str]:
        """Names with a serving or shadow session, sorted."""
        return sorted(self._assignments)

    def set_expected(self, names: Iterable[str]) -> None:
        """The models this device should serve (from the desired state); drives `ready()`."""
        self._expected = frozenset(names)

    def ready(self) -> bool:
        return all(self.serving(name) is not None for name in self._expected)

    # -- the request path --------------------------------------------------------------------

    def _window(self, key: _WindowKey) -> _Window:
        win = self._windows.get(key)
        if win is None:
            win = self._windows[key] = _Window(
                latency=LatencyHistogram(self._accuracy), paired=LatencyHistogram(self._accuracy),
                cpu=LatencyHistogram(self._accuracy), paired_cpu=LatencyHistogram(self._accuracy),
            )
        return win

    @staticmethod
    def _timed_run(
        loaded: LoadedModel, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], float, float]:
        """Outputs, wall time and this thread's CPU time (ms). With one intra-op thread ONNX Runtime
        computes in the calling thread, so the CPU time is the model's own cost."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        outputs = loaded.run(inputs)
        return outputs, (time.perf_counter() - start) * 1000.0, (time.thread_time() - cpu_start) * 1000.0

    async def infer(
        self, name: str, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Answer from the serving model: (the version that answered, outputs by name)."""
        current = self._assignments.get(name)
        loaded = current.serving if current else None
        if current is None or loaded is None:
            served = ", ".join(n for n in self.models() if self.serving(n)) or "none"
            raise NotFoundError(f"model {name!r} is not served on this device (served: {served})")
        # A malformed request is the client's fault: it is refused here and not counted as a
        # model error, so a buggy client cannot make a good version look bad.
        loaded.validate_inputs(inputs)
        unknown = [n for n in output_names or () if n not in loaded.outputs]
        if unknown:
            raise InferenceInputError(
                f"{loaded.manifest.ref} has no output(s) {', '.join(map(repr, unknown))}; "
                f"outputs are {', '.join(map(repr, loaded.output_names))}"
            )
        key: _WindowKey = (name, loaded.version, ROLE_SERVING, "")
        loop = asyncio.get_running_loop()
        try:
            outputs, latency_ms, cpu_ms = await loop.run_in_executor(self._executor, self._timed_run, loaded, inputs)
        except InferenceInputError:
            raise
        except Exception as exc:
            with self._stats_lock:
                win = self._window(key)
                win.requests += 1
                win.errors += 1
            if isinstance(exc, FleetError):
                raise
            raise FleetError(f"{loaded.manifest.ref} failed while running: {exc}") from exc

        mirror = current.shadow is not None and current.sample_rate > 0 and (
            current.sample_rate >= 1.0 or self._rng.random() < current.sample_rate
        )
        dropped = False
        self.drift.observe(loaded, inputs, outputs)  # before any filtering: drift sees every output
        if mirror and current.shadow is not None and not self._closed:
            item = _Mirror(name, current.shadow, loaded.version, inputs, outputs, latency_ms, cpu_ms)
            dropped = not self._shadow_worker.offer(item)
        with self._stats_lock:
            win = self._window(key)
            win.requests += 1
            win.latency.record(latency_ms)
            if mirror:
                if dropped:
                    win.shadow_dropped += 1
                else:
                    win.mirrored += 1
        if output_names:
            outputs = {n: outputs[n] for n in output_names}
        return loaded.version, outputs

    # -- the shadow worker -------------------------------------------------------------------

    def _shadow_one(self, item: _Mirror) -> None:
        shadow = item.shadow
        current = self.shadow(item.model)
        if current is None or current is not shadow:
            return  # the shadow was replaced or cleared while this request waited
        key: _WindowKey = (item.model, shadow.version, ROLE_SHADOW, item.serving_version)
        try:
            outputs, latency_ms, cpu_ms = self._timed_run(shadow, item.inputs)
        except Exception as exc:
            log.warning("shadow %s failed on a mirrored request: %s", shadow.manifest.ref, exc)
            with self._stats_lock:
                win = self._window(key)
                win.requests += 1
                win.errors += 1
            return
        comparisons = compare(shadow.manifest.task, item.serving_outputs, outputs,
                              layout=shadow.manifest.outputs_layout)
        with self._stats_lock:
            win = self._window(key)
            win.requests += 1
            win.latency.record(latency_ms)
            win.paired.record(item.serving_latency_ms)
            win.cpu.record(cpu_ms)
            win.paired_cpu.record(item.serving_cpu_ms)
            win.agreement.add(comparisons)

    def wait_shadow_idle(self, timeout: float = 5.0) -> bool:
        """Block until every mirrored request queued so far has been compared (tests, shutdown)."""
        return self._shadow_worker.wait_idle(timeout)

    # -- telemetry ---------------------------------------------------------------------------

    def drain_windows(self) -> list[dict[str, Any]]:
        """The counters since the last call, as telemetry-window dicts; counting starts afresh."""
        with self._stats_lock:
            windows, self._windows = self._windows, {}
        out: list[dict[str, Any]] = []
        for (model, version, role, compared_to), win in sorted(windows.items()):
            if not win.seen_traffic():
                continue
            drift, source = self.drift.drain(model, version) if role == ROLE_SERVING else ([], "")
            out.append({
                "model": model,
                "version": version,
                "role": role,
                "compared_to": compared_to,
                "requests": win.requests,
                "errors": win.errors,
                "latency_ms": win.latency.to_dict(),
                "agreement": win.agreement.to_list(),
                "mirrored": win.mirrored,
                "shadow_dropped": win.shadow_dropped,
                "paired_serving_latency_ms": win.paired.to_dict(),
                **({"cpu_ms": win.cpu.to_dict(), "paired_serving_cpu_ms": win.paired_cpu.to_dict()}
                   if role == ROLE_SHADOW else {}),
                "drift": drift,
                "profile_source": source,
            })
        return out

    def close(self) -> None:
        """Stop the shadow worker (pending mirrors are discarded) and the inference threads."""
        if self._closed:
            return
        self._closed = True
        self._shadow_worker.close()
        self.drift.close()
        self._executor.shutdown(wait=True)


# --------------------------------------------------------------------------------------------
# Open Inference Protocol endpoint
# --------------------------------------------------------------------------------------------


def grpc_status_for(error: FleetError) -> grpc.StatusCode:
    """This endpoint's status for a domain error: the project-wide mapping of `fleet.proto.errors`."""
    return status_for(error)[0]


_Resp = TypeVar("_Resp")


def _mapped_errors(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[_Resp]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[_Resp]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return await method(self, request, context)
        except FleetError as exc:
            await context.abort(grpc_status_for(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            log.exception("inference endpoint: unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def _element_count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise InferenceInputError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return math.prod(int(d) for d in shape)


def decode_inputs(request: pb.ModelInferRequest, loaded: LoadedModel) -> dict[str, np.ndarray]:
    """The request's tensors as numpy arrays, checked against `loaded`'s input signature."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InferenceInputError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise InferenceInputError(f"input {name!r} is given twice")
        spec = loaded.inputs.get(name)
        if spec is None:
            raise InferenceInputError(
                f"{loaded.manifest.ref} has no input {name!r}; "
                f"inputs are {', '.join(map(repr, loaded.inputs))}"
            )
        want = DTYPES[spec.dtype]
        if tensor.datatype != want:
            got = tensor.datatype or "(empty)"
            raise InferenceInputError(f"input {name!r}: datatype must be {want}, got {got}")
        shape = tuple(int(d) for d in tensor.shape)
        count = _element_count(name, shape)
        dtype = np.dtype(spec.dtype)
        if raw:
            data = raw[i]
            if len(data) != count * dtype.itemsize:
                raise InferenceInputError(
                    f"input {name!r}: shape {list(shape)} of {want} needs {count * dtype.itemsize} bytes, "
                    f"got {len(data)}"
                )
            # OIP raw contents are little-endian, row-major.
            arr = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        else:
            field_name = _CONTENTS_FIELD.get(want)
            if field_name is None:
                raise InferenceInputError(f"input {name!r}: {want} must be sent in raw_input_contents")
            values = getattr(tensor.contents, field_name)
            if len(values) != count:
                raise InferenceInputError(
                    f"input {name!r}: shape {list(shape)} needs {count} values in contents.{field_name}, "
                    f"got {len(values)}"
                )
            try:
                arr = np.asarray(values, dtype=dtype)
            except OverflowError as exc:
                raise InferenceInputError(f"input {name!r}: a value does not fit {want}") from exc
        arrays[name] = arr.reshape(shape)
    loaded.validate_inputs(arrays)
    return arrays


def encode_outputs(
    response: pb.ModelInferResponse, outputs: Mapping[str, np.ndarray]
) -> pb.ModelInferResponse:
    for name, arr in outputs.items():
        oip = DTYPES.get(arr.dtype.name)
        if oip is None:
            raise FleetError(f"output {name!r} has dtype {arr.dtype.name}, which the protocol cannot carry")
        response.outputs.add(name=name, datatype=oip, shape=list(arr.shape))
        response.raw_output_contents.append(
            np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        )
    return response


def _server_version() -> str:
    try:
        return metadata.version("edge-fleet")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over a `ModelHost`: stock OIP/Triton clients work."""

    def __init__(self, host: ModelHost, server_name: str = "edge-fleet-agent") -> None:
        self.host = host
        self.server_name = server_name
        self.server_version = _server_version()

    def _serving(self, name: str, version: str = "") -> LoadedModel:
        loaded = self.host.serving(name)
        if loaded is None:
            raise NotFoundError(f"model {name!r} is not served on this device")
        if version and version != loaded.version:
            raise NotFoundError(
                f"model {name!r} version {version!r} is not served; the serving version is {loaded.version!r}"
            )
        return loaded

    @_mapped_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_mapped_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.host.ready())

    @_mapped_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        loaded = self.host.serving(request.name)
        ready = loaded is not None and (not request.version or request.version == loaded.version)
        return pb.ModelReadyResponse(ready=ready)

    @_mapped_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version, extensions=[])

    @_mapped_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        loaded = self._serving(request.name, request.version)
        meta = pb.ModelMetadataResponse(name=loaded.name, versions=[loaded.version], platform=PLATFORM)
        for spec in loaded.manifest.inputs:
            meta.inputs.add(name=spec.name, datatype=DTYPES[spec.dtype], shape=list(spec.shape))
        for spec in loaded.manifest.outputs:
            meta.outputs.add(name=spec.name, datatype=DTYPES[spec.dtype], shape=list(spec.shape))
        return meta

    @_mapped_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        loaded = self._serving(request.model_name, request.model_version)
        inputs = decode_inputs(request, loaded)
        requested: list[str] = []
        for out in request.outputs:
            if "classification" in out.parameters:
                raise InferenceInputError(
                    "the classification extension is not supported; ask for the raw outputs"
                )
            requested.append(out.name)
        # The host takes the assignment afresh: if a switch happened since `_serving`, the new
        # version answers and the response says which one did.
        version, outputs = await self.host.infer(request.model_name, inputs, requested or None)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
        return encode_outputs(response, outputs)


async def start_inference_server(
    host: ModelHost,
    address: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    server_name: str = "edge-fleet-agent",
) -> grpc.aio.Server:
    """Serve OIP on `address` (e.g. "127.0.0.1:8001"; port 0 picks a free port, see `bound_port`)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(host, server_name), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConflictError(f"cannot listen on {address} for inference: {exc}") from exc
    if port == 0:
        raise ConflictError(f"cannot listen on {address} for inference (address in use or invalid?)")
    setattr(server, "fleet_bound_port", port)  # noqa: B010 - grpc.aio.Server has no slot for it
    await server.start()
    log.info("inference endpoint listening on %s (port %d)", address, port)
    return server


def bound_port(server: grpc.aio.Server) -> int:
    """The port `start_inference_server` bound (useful with port 0)."""
    return int(getattr(server, "fleet_bound_port"))  # noqa: B009
