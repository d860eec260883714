"""A real SIGKILL in the middle of an update, at every point of the device state machine.

Given a device serving v1 of a model,
when a rollout of v2 reaches a given update state and the agent process is SIGKILLed there,
then the restarted agent answers inference from a valid model straight away (v1 or v2, never
nothing and never a half-written file), and the rollout still completes with v2 serving.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton

from fleet.core import synthetic_models as sm

from .conftest import FleetWorld

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Every point where the agent writes its update record, plus the instant after the serving switch.
CRASH_POINTS = ["Downloading", "Verifying", "Staging", "Loading", "Shadowing", "Committing", "Committing.switched"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_mid_update_comes_back_serving(world: FleetWorld, point: str) -> None:
    index = CRASH_POINTS.index(point)
    model = f"crash{index}"
    device = f"cam-{20 + index:02d}"
    unit = f"u{index}"
    world.push(f"{model}:v1", sm.classifier(1), task="classification")
    world.push(f"{model}:v2", sm.classifier(2), task="classification")
    world.add_agents(1, labels={"unit": unit}, first_index=20 + index,
                     extra_env={"FLEET_AGENT_CRASH_AT": f"{point}@v2"})
    world.fleet("rollout", f"{model}:v1", "--canary", "100%", "--selector", f"unit={unit}")
    assert world.wait_rollout(f"{model}-v1")["phase"] == "Completed"
    world.wait("v1 serving", lambda: world.serving(device, model) == "v1", 60)

    # When v2 rolls out and the agent is killed at `point`
    world.fleet("rollout", f"{model}:v2", "--canary", "100%", "--selector", f"unit={unit}",
                "--min-samples", "30", "--sample-rate", "1.0", "--deadline", "120s")
    proc = world.cluster.procs[device]
    world.wait(f"the agent to be killed at {point}", lambda: proc.poll() is not None, 90, check_alive=False)
    assert proc.returncode == -9, f"expected SIGKILL, got exit code {proc.returncode}"
    del world.cluster.procs[device]
    (world.workdir / "agents" / device / "endpoint.json").unlink()

    # Then the restarted agent serves a valid model at once
    world.start_agent(20 + index, token=None, labels={"unit": unit})
    client = triton.InferenceServerClient(url=f"127.0.0.1:{world.inference_port(device)}")
    world.wait("the model ready after restart", lambda: client.is_model_ready(model), 30, every=0.2)
    item = triton.InferInput("input", [1, 3, 32, 32], "FP32")
    item.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    answer = client.infer(model, [item])
    assert answer.get_response().model_version in ("v1", "v2")
    assert answer.as_numpy("probabilities").shape == (1, 10)

    # And the rollout finishes with v2 serving
    done = world.wait_rollout(f"{model}-v2", timeout=120)
    assert done["phase"] == "Completed", done.get("message")
    world.wait("v2 serving", lambda: world.serving(device, model) == "v2", 60)
