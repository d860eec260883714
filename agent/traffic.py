"""A built-in traffic source: requests at a steady rate over the real Open Inference Protocol.

Demos and tests need live traffic to drive shadow comparisons and gates, and it must take the
same path as a device application: the gRPC endpoint, not a shortcut into the sessions. The
rule here is to keep sending whatever happens on the device: a model that is not loaded yet
(NOT_FOUND) or an endpoint that is not up (UNAVAILABLE) means wait and retry, never give up;
a switch to a new version is noticed from the response and the signature is read again.

Inputs come from either

- **synthetic tensors** built from the served model's signature (read with `ModelMetadata`):
  a dynamic leading dim is the batch (`batch_size`), other dynamic dims get `dynamic_size`, or a
  random size per request with `randomize_dynamic=True`; or
- **a folder of `.npy` files**, replayed in a loop, laid out in one of three ways:
  1. one sub-folder per request, each holding `<input name>.npy` for every input;
  2. `<input name>.npy` files directly in the folder: a single request, replayed;
  3. for a model with exactly one input, any `*.npy` files: one request each, in name order.
  Arrays are cast to the model's input dtype (numpy saves float64 by default).

Pacing sleeps on an event (no busy loop) and does not burst to catch up after a stall.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fleet.core.manifest import DTYPES, TensorSpec
from fleet.core.synthetic_models import random_inputs
from fleet.proto.inference import grpc_service_pb2 as pb
from fleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_OIP_TO_DTYPE = {oip: dtype for dtype, oip in DTYPES.items()}
_WAIT_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


class TrafficError(RuntimeError):
    """The traffic source cannot build requests (bad folder layout, unsupported datatype)."""


def _load_npy_folder(folder: Path) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """(one dict per sub-folder request, loose files by stem)."""
    if not folder.is_dir():
        raise TrafficError(f"traffic folder {folder} does not exist")
    per_request = [
        {f.stem: np.load(f, allow_pickle=False) for f in sorted(sub.glob("*.npy"))}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir())
    ]
    per_request = [r for r in per_request if r]
    loose = {f.stem: np.load(f, allow_pickle=False) for f in sorted(folder.glob("*.npy"))}
    if not per_request and not loose:
        raise TrafficError(f"traffic folder {folder} holds no .npy files")
    return per_request, loose


class TrafficSource:
    """Sends `rate` requests/s for `model` to the OIP endpoint at `address` from a thread."""

    def __init__(
        self,
        address: str,
        model: str,
        rate: float = 10.0,
        *,
        npy_dir: Path | None = None,
        dynamic_size: int = 8,
        batch_size: int = 1,
        randomize_dynamic: bool = False,
        seed: int = 0,
        timeout_s: float = 5.0,
        retry_interval_s: float = 0.5,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (requests per second)")
        self.address = address
        self.model = model
        self.rate = float(rate)
        self.dynamic_size = dynamic_size
        self.batch_size = batch_size
        self.randomize_dynamic = randomize_dynamic
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self._rng = np.random.default_rng(seed)
        self._folder = _load_npy_folder(Path(npy_dir)) if npy_dir is not None else None
        self._replay: list[dict[str, np.ndarray]] = []
        self._cursor = 0
        self._specs: list[TensorSpec] | None = None
        self._version = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.ok = 0
        self.errors = 0
        self.waiting = 0  # NOT_FOUND / UNAVAILABLE answers: the model or endpoint is not up yet
        self.versions: Counter[str] = Counter()
        self.last_error = ""

    # -- control -----------------------------------------------------------------------------

    def start(self) -> TrafficSource:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"fleet-traffic-{self.model}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> TrafficSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "model": self.model,
                "sent": self.sent,
                "ok": self.ok,
                "errors": self.errors,
                "waiting": self.waiting,
                "versions": dict(self.versions),
                "last_error": self.last_error,
            }

    def wait_for_ok(self, count: int, timeout: float) -> bool:
        """Block until `count` requests have succeeded (or `timeout` s passed)."""
        deadline = time.monotonic() + timeout
        while self.ok < count:
            if time.monotonic() >= deadline or self._stop.is_set():
                return self.ok >= count
            self._stop.wait(0.05)
        return True

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self._send_one(stub):
                    self._stop.wait(self.retry_interval_s)
                    next_at = time.monotonic()
                    continue
                next_at += 1.0 / self.rate
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # fell far behind: resume the rate, don't burst
        except TrafficError as exc:
            log.error("traffic for %s stopped: %s", self.model, exc)
            with self._lock:
                self.last_error = str(exc)
        finally:
            channel.close()

    def _send_one(self, stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
        """One request; False when the caller should back off (model or endpoint not up)."""
        try:
            if self._specs is None:
                self._fetch_signature(stub)
            request = self._request()
        except grpc.RpcError as exc:
            return self._failed(exc)
        with self._lock:
            self.sent += 1
        try:
            response = stub.ModelInfer(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            return self._failed(exc)
        with self._lock:
            self.ok += 1
            self.versions[response.model_version] += 1
        if response.model_version != self._version:
            self._specs = None  # a new version may have a new signature: read it again
        return True

    def _failed(self, exc: grpc.RpcError) -> bool:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        with self._lock:
            self.last_error = f"{code}: {exc.details() if isinstance(exc, grpc.Call) else exc}"
            if code in _WAIT_CODES:
                self.waiting += 1
            else:
                self.errors += 1
        if code in _WAIT_CODES:
            self._specs = None
            return False
        return True

    def _fetch_signature(self, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=self.model), timeout=self.timeout_s)
        specs = []
        for tensor in meta.inputs:
            dtype = _OIP_TO_DTYPE.get(tensor.datatype)
            if dtype is None:
                raise TrafficError(
                    f"input {tensor.name!r} has datatype {tensor.datatype}, which is not supported"
                )
            specs.append(TensorSpec(name=tensor.name, dtype=dtype, shape=tuple(int(d) for d in tensor.shape)))
        self._specs = specs
        self._version = meta.versions[0] if meta.versions else ""
        if self._folder is not None:
            self._replay = self._arrange(specs)
            self._cursor = 0

    def _arrange(self, specs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
        assert self._folder is not None
        per_request, loose = self._folder
        names = {s.name for s in specs}
        if per_request:
            requests = per_request
        elif names <= set(loose):
            requests = [{n: loose[n] for n in names}]
        elif len(specs) == 1:
            requests = [{specs[0].name: arr} for arr in loose.values()]
        else:
            raise TrafficError(
                f"cannot map the .npy files {sorted(loose)} to the inputs {sorted(names)}: name them "
                "<input>.npy, or use one sub-folder per request"
            )
        dtypes = {s.name: np.dtype(s.dtype) for s in specs}
        return [{n: np.asarray(a).astype(dtypes.get(n, a.dtype), copy=False) for n, a in r.items()}
                for r in requests]

    def _request(self) -> pb.ModelInferRequest:
        assert self._specs is not None
        if self._folder is not None:
            inputs = self._replay[self._cursor % len(self._replay)]
            self._cursor += 1
        else:
            inputs = random_inputs(
                self._specs,
                self._rng,
                dynamic_size=self.dynamic_size,
                batch_size=self.batch_size,
                randomize_dynamic=self.randomize_dynamic,
            )
        request = pb.ModelInferRequest(model_name=self.model, id=str(self.sent))
        for name, arr in inputs.items():
            oip = DTYPES.get(arr.dtype.name)
            if oip is None:
                raise TrafficError(f"input {name!r}: dtype {arr.dtype.name} cannot be sent")
            request.inputs.add(name=name, datatype=oip, shape=list(arr.shape))
            request.raw_input_contents.append(
                np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            )
        return request
