"""The agent's Open Inference Protocol endpoint: a real grpc.aio server with real ONNX Runtime
sessions, called by the stock `tritonclient.grpc` client (in its own process, see oip_client.py),
by the generated stub, and by the built-in traffic source."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fleet.agent.inference import ModelHost, bound_port, start_inference_server
from fleet.agent.runtime import LoadedModel, load_model
from fleet.agent.traffic import TrafficSource
from fleet.core import synthetic_models as sm
from fleet.proto.inference import grpc_service_pb2 as pb
from fleet.proto.inference import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

CLIENT = Path(__file__).with_name("oip_client.py")
CPU = ["CPUExecutionProvider"]


def run_client(*args: str, timeout: float = 60) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(CLIENT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


class RunningServer:
    """The endpoint on its own event loop thread, as the agent daemon runs it."""

    def __init__(self, host: ModelHost) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-oip-loop", daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            start_inference_server(host, "127.0.0.1:0"), self.loop
        ).result(10)
        self.address = f"127.0.0.1:{bound_port(self.server)}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _load(folder: Path, model: bytes, name: str, version: str, task: str) -> LoadedModel:
    path = folder / f"{name}-{version}.onnx"
    path.write_bytes(model)
    loaded = load_model(path, sm.manifest_for(model, name=name, version=version, task=task), CPU)
    loaded.warmup(runs=1)
    return loaded


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "cls1": _load(folder, sm.classifier(1), "cls", "1", "classification"),
        "cls2": _load(folder, sm.classifier(2), "cls", "2", "classification"),
        "cls_bad": _load(folder, sm.classifier(3, divergent=True), "cls", "3", "classification"),
        "seg1": _load(folder, sm.dynamic_two_output(), "seg", "1", "segmentation"),
        "late": _load(folder, sm.dynamic_two_output(), "late", "1", "segmentation"),
    }


@pytest.fixture(scope="module")
def endpoint(models: dict[str, LoadedModel]) -> Iterator[tuple[ModelHost, str]]:
    host = ModelHost(workers=2)
    server = RunningServer(host)
    yield host, server.address
    server.stop()
    host.close()


@pytest.fixture
def host(endpoint: tuple[ModelHost, str], models: dict[str, LoadedModel]) -> ModelHost:
    """The shared host, reset to: cls v1 and seg v1 serving, no shadows, no counters."""
    h, _ = endpoint
    for name in h.models():
        h.clear_shadow(name)
        h.set_serving(name, None)
    h.set_serving("cls", models["cls1"])
    h.set_serving("seg", models["seg1"])
    h.set_expected([])
    h.drain_windows()
    return h


@pytest.fixture
def address(endpoint: tuple[ModelHost, str]) -> str:
    return endpoint[1]


def _window(windows: list[dict[str, Any]], model: str, version: str, role: str) -> dict[str, Any]:
    found = [w for w in windows if (w["model"], w["version"], w["role"]) == (model, version, role)]
    assert len(found) == 1, windows
    return found[0]


def test_stock_client_metadata_and_inference(
    host: ModelHost, address: str, models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    res = run_client("basic", address, str(tmp_path))
    assert res["live"] and res["ready"]
    assert res["cls_ready"] and res["cls_v1_ready"]
    assert not res["cls_v9_ready"] and not res["nope_ready"]
    meta = res["cls_meta"]
    assert (meta["name"], meta["versions"], meta["platform"]) == ("cls", ["1"], "onnxruntime_onnx")
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("input", "FP32", [-1, 3, 32, 32])]
    assert [(t["name"], [int(d) for d in t["shape"]]) for t in res["seg_meta"]["outputs"]] == [
        ("channel_mean", [-1, 3]), ("mask", [-1, 1, -1, -1])]

    saved = np.load(tmp_path / "basic.npz")
    expected = models["cls1"].run({"input": saved["cls_x"]})["probabilities"]
    np.testing.assert_array_equal(saved["cls_y"], expected)
    assert (res["cls_version"], res["cls_id"]) == ("1", "req-42")
    for i, shape in enumerate([(1, 3, 8, 8), (2, 3, 20, 14)]):
        local = models["seg1"].run({"image": saved[f"seg{i}_x"]})
        assert saved[f"seg{i}_mask"].shape == (shape[0], 1, shape[2], shape[3])
        np.testing.assert_array_equal(saved[f"seg{i}_mask"], local["mask"])
        np.testing.assert_array_equal(saved[f"seg{i}_mean"], local["channel_mean"])
    assert res["only_mask_outputs"] == ["mask"]

    assert res["wrong_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "shape [1, 3, 16, 16] does not fit [-1, 3, 32, 32]" in res["wrong_shape"]["message"]
    assert res["wrong_dtype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "datatype must be FP32, got FP64" in res["wrong_dtype"]["message"]
    assert res["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert res["unknown_output"]["status"] == "StatusCode.INVALID_ARGUMENT"
    # Requests the client got wrong are not model errors.
    assert all(w["errors"] == 0 for w in host.drain_windows())


def test_typed_contents_readiness_and_versions_with_the_generated_stub(host: ModelHost, address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
        request = pb.ModelInferRequest(model_name="seg", id="typed")
        request.inputs.add(name="image", datatype="FP32", shape=list(x.shape),
                           contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()))
        request.outputs.add(name="channel_mean")
        response = stub.ModelInfer(request)
        assert (response.id, response.model_version, [o.name for o in response.outputs]) == (
            "typed", "1", ["channel_mean"])
        mean = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 3)
        np.testing.assert_allclose(mean, host.serving("seg").run({"image": x})["channel_mean"])  # type: ignore[union-attr]

        short = pb.ModelInferRequest(model_name="seg")
        short.inputs.add(name="image", datatype="FP32", shape=[1, 3, 2, 2],
                         contents=pb.InferTensorContents(fp32_contents=[1.0] * 5))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(short)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs 12 values in contents.fp32_contents, got 5" in info.value.details()

        raw_short = pb.ModelInferRequest(model_name="seg", raw_input_contents=[b"\x00" * 7])
        raw_short.inputs.add(name="image", datatype="FP32", shape=[1, 3, 1, 1])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(raw_short)
        assert "needs 12 bytes, got 7" in info.value.details()

        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name="seg", model_version="7"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "serving version is '1'" in info.value.details()

        # Ready only once every expected model has a serving session.
        host.set_expected(["cls", "not-yet"])
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        host.set_expected(["cls"])
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "edge-fleet-agent"


def test_shadow_at_full_rate_produces_agreement_windows(
    host: ModelHost, address: str, models: dict[str, LoadedModel]
) -> None:
    host.set_shadow("cls", models["cls2"], 1.0)
    assert run_client("burst", address, "cls", "30") == {"versions": {"1": 30}}
    assert host.wait_shadow_idle(10)
    windows = host.drain_windows()
    serving = _window(windows, "cls", "1", "serving")
    counts = (serving["requests"], serving["errors"], serving["mirrored"], serving["shadow_dropped"])
    assert counts == (30, 0, 30, 0)
    assert serving["latency_ms"]["count"] == 30 and serving["agreement"] == []
    shadow = _window(windows, "cls", "2", "shadow")
    assert shadow["compared_to"] == "1"
    assert (shadow["requests"], shadow["errors"]) == (30, 0)
    assert shadow["latency_ms"]["count"] == 30 and shadow["paired_serving_latency_ms"]["count"] == 30
    [agreement] = shadow["agreement"]
    assert agreement["output"] == "probabilities" and agreement["samples"] == 30
    assert agreement["top1_samples"] == 30 and agreement["top1_agree"] >= 27
    assert agreement["cosine_sum"] / 30 > 0.999
    assert host.drain_windows() == []  # drained windows start afresh

    host.set_shadow("cls", models["cls_bad"], 1.0)
    run_client("burst", address, "cls", "30")
    assert host.wait_shadow_idle(10)
    [bad] = _window(host.drain_windows(), "cls", "3", "shadow")["agreement"]
    assert bad["top1_agree"] <= 3 and bad["cosine_min"] < 0.9


def test_shadow_never_holds_up_serving_and_drops_when_full(
    tmp_path: Path, models: dict[str, LoadedModel]
) -> None:
    slow = _load(tmp_path, sm.classifier(2, slow_factor=8), "cls", "slow", "classification")
    host = ModelHost(workers=2, shadow_queue_size=2)
    host.set_serving("cls", models["cls1"])
    host.set_shadow("cls", slow, 1.0)
    x = {"input": np.zeros((1, 3, 32, 32), np.float32)}

    async def flood() -> list[tuple[str, dict[str, np.ndarray]]]:
        return await asyncio.gather(*(host.infer("cls", x) for _ in range(40)))

    try:
        answers = asyncio.run(flood())
        assert all(version == "1" for version, _ in answers)
        assert host.wait_shadow_idle(20)
        windows = host.drain_windows()
        serving = _window(windows, "cls", "1", "serving")
        assert serving["requests"] == 40
        assert serving["mirrored"] + serving["shadow_dropped"] == 40
        assert serving["shadow_dropped"] > 0
        assert _window(windows, "cls", "slow", "shadow")["requests"] == serving["mirrored"]
    finally:
        started = time.monotonic()
        host.close()
        assert time.monotonic() - started < 5


def test_hot_swap_under_load_drops_no_request(
    host: ModelHost, address: str, models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, str(CLIENT), "hammer", address, "cls", str(stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        for i in range(20):
            host.set_serving("cls", models["cls2"] if i % 2 == 0 else models["cls1"])
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        stop.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["errors"] == []
    assert result["ok"] > 20
    assert set(result["versions"]) == {"1", "2"}
    windows = host.drain_windows()
    assert sum(w["requests"] for w in windows) == result["ok"]
    assert all(w["errors"] == 0 for w in windows)


def test_traffic_source_waits_for_the_model_then_sends(
    host: ModelHost, address: str, models: dict[str, LoadedModel]
) -> None:
    traffic = TrafficSource(address, "late", rate=100, randomize_dynamic=True, retry_interval_s=0.1)
    with traffic:
        time.sleep(0.4)
        assert traffic.ok == 0 and traffic.waiting > 0
        host.set_serving("late", models["late"])
        assert traffic.wait_for_ok(10, timeout=15)
    stats = traffic.stats()
    assert stats["errors"] == 0 and stats["versions"] == {"1": stats["ok"]}
    assert _window(host.drain_windows(), "late", "1", "serving")["requests"] == stats["ok"]


def test_traffic_source_replays_a_folder_of_npy_files(host: ModelHost, address: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for i in range(3):
        (tmp_path / f"req{i}").mkdir()
        np.save(tmp_path / f"req{i}" / "input.npy", rng.standard_normal((1, 3, 32, 32)))  # float64: cast
    with TrafficSource(address, "cls", rate=100, npy_dir=tmp_path) as traffic:
        assert traffic.wait_for_ok(6, timeout=15)
    assert traffic.stats()["errors"] == 0

    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(2):
        np.save(loose / f"frame{i}.npy", rng.standard_normal((2, 3, 9, 11)).astype(np.float32))
    with TrafficSource(address, "seg", rate=100, npy_dir=loose) as traffic:
        assert traffic.wait_for_ok(4, timeout=15)
    assert traffic.stats()["errors"] == 0
