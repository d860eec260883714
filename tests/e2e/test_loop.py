"""The core loop end to end: separate controller and agent processes, driven through the CLI.

Given a controller and three agents with built-in traffic,
when an operator deploys v1, rolls out a good v2 and a bad v3 with `fleet rollout ... --canary`,
then v2 is promoted on gate evidence, v3 is rolled back by the engine, and stock tritonclient
calls are answered by whichever version each device serves.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from fleet.core import synthetic_models as sm

from .conftest import FleetWorld

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GATE = ["--min-samples", "60", "--deadline", "90s", "--sample-rate", "1.0"]


def triton_infer(world: FleetWorld, device: str, model: str, arrays: dict[str, np.ndarray],
                 outputs: list[str]) -> tuple[str, dict[str, np.ndarray]]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{world.inference_port(device)}")
    inputs = []
    for name, array in arrays.items():
        item = triton.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array)
        inputs.append(item)
    result = client.infer(model, inputs, outputs=[triton.InferRequestedOutput(o) for o in outputs])
    response = result.get_response()
    return response.model_version, {o: result.as_numpy(o) for o in outputs}


def test_promotion_then_automatic_rollback(world: FleetWorld) -> None:
    # Given three signed versions and three devices
    world.push("detector:v1", sm.classifier(1), task="classification")
    world.push("detector:v2", sm.classifier(2), task="classification")
    world.push("detector:v3", sm.classifier(3, divergent=True), task="classification")
    devices = world.add_agents(3)
    listed = world.json("models", "ls")
    assert {m["name"] for m in listed} >= {"detector"}

    # When v1 is deployed everywhere
    world.fleet("rollout", "detector:v1", "--canary", "100%")
    assert world.wait_rollout("detector-v1")["phase"] == "Completed"
    world.wait("v1 served everywhere", lambda: all(world.serving(d, "detector") == "v1" for d in devices), 60)

    # Then stock tritonclient gets answers from v1
    client = triton.InferenceServerClient(url=f"127.0.0.1:{world.inference_port(devices[0])}")
    assert client.is_server_live() and client.is_model_ready("detector")
    meta = client.get_model_metadata("detector")
    assert meta.inputs[0].shape == [-1, 3, 32, 32]
    version, out = triton_infer(world, devices[0], "detector",
                                {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)},
                                ["probabilities"])
    assert version == "v1" and out["probabilities"].shape == (2, 10)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-4)

    # And an input of the wrong shape gets a clear error while the model keeps serving
    bad = triton.InferInput("input", [1, 3, 16, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"(?i)shape"):
        client.infer("detector", [bad])
    assert client.is_model_ready("detector")

    # When the good v2 goes out with a canary
    world.fleet("rollout", "detector:v2", "--canary", "34%", *GATE)
    good = world.wait_rollout("detector-v2", timeout=180)

    # Then it was promoted by the engine on evidence, and every device serves v2
    assert good["phase"] == "Completed", good.get("message")
    gates = [d for d in good["decisions"] if d["kind"] == "gate"]
    assert not [d for d in gates if d["verdict"] == "Fail"], gates
    passed_steps = {d["step_index"] for d in gates if d["verdict"] == "Pass" and d["actor"] == "engine"}
    assert passed_steps == {0, 1}, gates
    world.wait("v2 served everywhere", lambda: all(world.serving(d, "detector") == "v2" for d in devices), 60)
    assert world.json("models", "show", "detector")["aliases"].get("stable") == "v2"

    # When the bad v3 goes out
    world.fleet("rollout", "detector:v3", "--canary", "34%", *GATE)
    bad_rollout = world.wait_rollout("detector-v3", timeout=180)

    # Then the gate fails on agreement, the rollout is rolled back, and v2 keeps serving
    assert bad_rollout["phase"] == "RolledBack", bad_rollout.get("message")
    explained = world.json("rollout", "explain", "detector-v3")
    failed = [d for d in explained if d["kind"] == "gate" and d["verdict"] == "Fail"]
    assert failed, explained
    rows = failed[0]["metrics"]["metrics"]
    assert any(r["metric"].startswith("agreement") and r["ok"] is False for r in rows), rows
    world.wait("v2 served again everywhere", lambda: all(world.serving(d, "detector") == "v2" for d in devices), 60)
    version, _ = triton_infer(world, devices[1], "detector",
                              {"input": np.zeros((1, 3, 32, 32), dtype=np.float32)}, ["probabilities"])
    assert version == "v2"

    # And both sides expose what happened to Prometheus
    endpoint = json.loads((world.workdir / "agents" / devices[1] / "endpoint.json").read_text())
    agent_text = httpx.get(f"http://127.0.0.1:{endpoint['metrics_port']}/metrics").text
    served = [s for f in text_string_to_metric_families(agent_text) for s in f.samples
              if s.name == "fleet_agent_inference_requests_total" and s.labels["role"] == "serving"]
    assert sum(s.value for s in served) > 0
    controller_text = httpx.get(f"{world.cluster.url}/metrics", headers=world.auth).text
    verdicts = {s.labels["verdict"]: s.value for f in text_string_to_metric_families(controller_text)
                for s in f.samples if s.name == "fleet_gate_verdicts_total"}
    assert verdicts.get("Fail", 0) >= 1 and verdicts.get("Pass", 0) >= 2


def test_dynamic_dims_and_two_outputs_through_the_loop(world: FleetWorld) -> None:
    # Given a model with input [-1, 3, -1, -1] and two outputs, in two good versions
    world.push("segmenter:v1", sm.dynamic_two_output(1), task="segmentation")
    world.push("segmenter:v2", sm.dynamic_two_output(2), task="segmentation")
    devices = [d["id"] for d in world.json("devices", "ls")]

    # When v1 is deployed and v2 rolled out with shadow and gate
    world.fleet("rollout", "segmenter:v1", "--canary", "100%")
    assert world.wait_rollout("segmenter-v1")["phase"] == "Completed"
    world.wait("segmenter v1 everywhere", lambda: all(world.serving(d, "segmenter") == "v1" for d in devices), 60)
    for h, w in ((8, 8), (24, 40)):
        version, out = triton_infer(world, devices[0], "segmenter",
                                    {"image": np.ones((2, 3, h, w), dtype=np.float32)}, ["channel_mean", "mask"])
        assert version == "v1"
        assert out["channel_mean"].shape == (2, 3) and out["mask"].shape == (2, 1, h, w)
    world.fleet("rollout", "segmenter:v2", "--canary", "50%", *GATE)
    done = world.wait_rollout("segmenter-v2", timeout=180)

    # Then it completes on the evidence of both outputs
    assert done["phase"] == "Completed", done.get("message")
    world.wait("segmenter v2 everywhere", lambda: all(world.serving(d, "segmenter") == "v2" for d in devices), 60)
    version, out = triton_infer(world, devices[-1], "segmenter",
                                {"image": np.ones((1, 3, 5, 7), dtype=np.float32)}, ["channel_mean", "mask"])
    assert version == "v2" and out["mask"].shape == (1, 1, 5, 7)


def test_devices_keep_serving_while_the_controller_is_away(world: FleetWorld) -> None:
    # Given devices serving detector v2 (from the first scenario) and telemetry flowing
    devices = [d["id"] for d in world.json("devices", "ls")]
    device = devices[0]
    assert world.serving(device, "detector") == "v2"

    # When the controller goes down and a device restarts without it
    controller = world.cluster.procs.pop("controller")
    controller.terminate()
    controller.wait(timeout=20)
    agent = world.cluster.procs.pop(device)
    agent.terminate()
    agent.wait(timeout=20)
    (world.workdir / "agents" / device / "endpoint.json").unlink()
    world.start_agent(int(device.split("-")[1]), token=None)

    # Then it serves its last desired model from disk, and spools telemetry
    client = triton.InferenceServerClient(url=f"127.0.0.1:{world.inference_port(device)}")
    world.wait("detector ready offline", lambda: client.is_model_ready("detector"), 30, every=0.2)
    version, _ = triton_infer(world, device, "detector", {"input": np.zeros((1, 3, 32, 32), dtype=np.float32)},
                              ["probabilities"])
    assert version == "v2"
    spool = world.workdir / "agents" / device / "spool"
    world.wait("telemetry spooled on disk", lambda: any(p.stem.isdigit() for p in spool.glob("*.json")), 30)

    # And when the controller returns, the device reconnects and the spool drains
    world.cluster.start_controller()
    world.wait("device reconnected", lambda: world.device(device).get("connected"), 60)
    world.wait("spool drained", lambda: not any(p.stem.isdigit() for p in spool.glob("*.json")), 60)
    assert world.serving(device, "detector") == "v2"
