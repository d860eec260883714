"""A stock `tritonclient.grpc` client for test_inference_endpoint.py, run as a separate process.

Why a separate process: tritonclient registers its own copy of the OIP messages (package
`inference`) in protobuf's default descriptor pool, and so does `fleet.proto.inference`; the two
cannot be imported into one interpreter. A device application is a separate process anyway.

Usage: python oip_client.py SCENARIO ADDRESS [ARGS...]; the last stdout line is a JSON result.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def _infer(client: grpcclient.InferenceServerClient, model: str, arrays: dict[str, np.ndarray],
           outputs: list[str] | None = None) -> Any:
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), "FP64" if arr.dtype == np.float64 else "FP32")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    return client.infer(model, inputs, outputs=requested, request_id="req-42")


def _error(fn: Any) -> dict[str, str]:
    try:
        fn()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "OK", "message": ""}


def basic(address: str, out_dir: str) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(address)
    rng = np.random.default_rng(0)
    res: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "cls_ready": client.is_model_ready("cls"),
        "cls_v1_ready": client.is_model_ready("cls", "1"),
        "cls_v9_ready": client.is_model_ready("cls", "9"),
        "nope_ready": client.is_model_ready("nope"),
        "cls_meta": client.get_model_metadata("cls", as_json=True),
        "seg_meta": client.get_model_metadata("seg", as_json=True),
    }
    saved: dict[str, np.ndarray] = {}
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    result = _infer(client, "cls", {"input": x})
    saved["cls_x"], saved["cls_y"] = x, result.as_numpy("probabilities")
    response = result.get_response()
    res["cls_version"], res["cls_id"] = response.model_version, response.id
    for i, shape in enumerate([(1, 3, 8, 8), (2, 3, 20, 14)]):
        img = rng.standard_normal(shape).astype(np.float32)
        result = _infer(client, "seg", {"image": img})
        saved[f"seg{i}_x"] = img
        saved[f"seg{i}_mean"] = result.as_numpy("channel_mean")
        saved[f"seg{i}_mask"] = result.as_numpy("mask")
    only = _infer(client, "seg", {"image": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}, ["mask"])
    res["only_mask_outputs"] = [o.name for o in only.get_response().outputs]
    small, doubles = np.zeros((1, 3, 16, 16), np.float32), np.zeros((1, 3, 32, 32), np.float64)
    res["wrong_shape"] = _error(lambda: _infer(client, "cls", {"input": small}))
    res["wrong_dtype"] = _error(lambda: _infer(client, "cls", {"input": doubles}))
    res["unknown_model"] = _error(lambda: _infer(client, "nope", {"input": x}))
    res["unknown_output"] = _error(lambda: _infer(client, "seg", {"image": saved["seg0_x"]}, ["nope"]))
    np.savez(Path(out_dir) / "basic.npz", **saved)
    client.close()
    return res


def burst(address: str, model: str, count: str) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(address)
    rng = np.random.default_rng(1)
    versions: dict[str, int] = {}
    for _ in range(int(count)):
        x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
        version = _infer(client, model, {"input": x}).get_response().model_version
        versions[version] = versions.get(version, 0) + 1
    client.close()
    return {"versions": versions}


def hammer(address: str, model: str, stop_file: str) -> dict[str, Any]:
    """Two threads send requests back to back until `stop_file` exists; every failure is kept."""
    stop = Path(stop_file)
    lock = threading.Lock()
    state: dict[str, Any] = {"ok": 0, "errors": [], "versions": {}}
    started = threading.Event()

    def worker(seed: int) -> None:
        client = grpcclient.InferenceServerClient(address)
        rng = np.random.default_rng(seed)
        deadline = time.monotonic() + 60
        while not stop.exists() and time.monotonic() < deadline:
            x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
            try:
                result = _infer(client, model, {"input": x})
                probs = result.as_numpy("probabilities")
                assert probs is not None and probs.shape == (1, 10)
                version = result.get_response().model_version
            except Exception as exc:
                with lock:
                    state["errors"].append(repr(exc))
                continue
            with lock:
                state["ok"] += 1
                state["versions"][version] = state["versions"].get(version, 0) + 1
            started.set()
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    started.wait(30)
    print("started", flush=True)
    for t in threads:
        t.join()
    return state


def main() -> None:
    scenario, *args = sys.argv[1:]
    result = {"basic": basic, "burst": burst, "hammer": hammer}[scenario](*args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
