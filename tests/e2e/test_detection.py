"""Detection agreement end to end: boxes matched by IoU decide a detector's rollout.

Given a controller, two agents with built-in traffic and a detector v1 pushed with an outputs
layout (which tensors hold boxes, scores and classes),
when a close v2 is rolled out, then it is promoted;
when a v3 whose boxes are shifted by half a cell is rolled out, then it is rolled back, and the
decision record names the "detections" agreement (box match rate) as what failed, even though
the raw output tensors still look alike by cosine similarity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton

from fleet.core import synthetic_models as sm

from .conftest import FleetWorld

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GATE = ["--min-samples", "60", "--deadline", "90s", "--sample-rate", "1.0"]
LAYOUT = "boxes=boxes,scores=scores,classes=classes,score_threshold=0.5,iou_threshold=0.5,matching=greedy"


def push_detector(world: FleetWorld, ref: str, blob: bytes) -> None:
    path = world.models / (ref.replace(":", "-") + ".onnx")
    path.write_bytes(blob)
    world.fleet("models", "push", ref, str(path), "--task", "detection", "--layout", LAYOUT,
                "--keys-dir", str(world.keys))


def gate_rows(decisions: list[dict[str, Any]], verdict: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for decision in decisions:
        if decision.get("kind") == "gate" and decision.get("verdict") == verdict:
            rows += (decision.get("metrics") or {}).get("metrics") or []
    return rows


def test_detector_rollout_is_judged_by_box_agreement(world: FleetWorld) -> None:
    # Given a detector in three versions: v2 close to v1, v3 with every box moved by 8 px
    push_detector(world, "detector:v1", sm.detector(1))
    push_detector(world, "detector:v2", sm.detector(2))
    push_detector(world, "detector:v3", sm.detector(3, shifted_boxes=8))
    # The layout travels in the signed manifest, typed (thresholds are numbers)
    layout = world.json("models", "show", "detector:v1")["manifest"]["outputs_layout"]
    assert layout == {"boxes": "boxes", "scores": "scores", "classes": "classes", "score_threshold": 0.5,
                      "iou_threshold": 0.5, "matching": "greedy"}
    bad = world.fleet("models", "push", "detector:v9", str(world.models / "detector-v1.onnx"), "--task",
                      "detection", "--layout", "boxes=nope", "--keys-dir", str(world.keys), check=False)
    assert bad.returncode == 2 and "must name one of the model's outputs" in bad.stderr + bad.stdout
    devices = world.add_agents(2)

    # When v1 is deployed everywhere
    world.fleet("rollout", "detector:v1", "--canary", "100%")
    assert world.wait_rollout("detector-v1")["phase"] == "Completed"
    world.wait("v1 served everywhere", lambda: all(world.serving(d, "detector") == "v1" for d in devices), 60)

    # Then a stock client gets boxes, scores and classes
    client = triton.InferenceServerClient(url=f"127.0.0.1:{world.inference_port(devices[0])}")
    image = triton.InferInput("image", [1, 3, 64, 64], "FP32")
    image.set_data_from_numpy(np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32))
    result = client.infer("detector", [image])
    assert result.as_numpy("boxes").shape == (1, 8, 4)
    assert result.as_numpy("scores").shape == (1, 8) and result.as_numpy("classes").shape == (1, 8)

    # When the close v2 goes out with a canary
    world.fleet("rollout", "detector:v2", "--canary", "50%", *GATE)
    good = world.wait_rollout("detector-v2", timeout=180)

    # Then it is promoted, and the gate saw the detection agreement pass
    assert good["phase"] == "Completed", good.get("message")
    passed = [r for r in gate_rows(good["decisions"], "Pass") if r.get("output") == "detections"]
    assert passed and all(r["ok"] for r in passed), gate_rows(good["decisions"], "Pass")
    assert passed[0]["value"] > 0.95
    world.wait("v2 served everywhere", lambda: all(world.serving(d, "detector") == "v2" for d in devices), 60)

    # When v3, whose boxes miss their twins by half a cell, goes out
    world.fleet("rollout", "detector:v3", "--canary", "50%", *GATE)
    bad = world.wait_rollout("detector-v3", timeout=180)

    # Then it is rolled back on the detection agreement, not on the raw tensors
    assert bad["phase"] == "RolledBack", bad.get("message")
    explained = world.json("rollout", "explain", "detector-v3")
    rows = gate_rows(explained, "Fail")
    failing = {r.get("output") for r in rows if r.get("metric", "").startswith("agreement") and r["ok"] is False}
    assert failing == {"detections"}, rows
    detection_row = next(r for r in rows if r.get("output") == "detections")
    assert detection_row["value"] < 0.5
    components = {c["name"]: c["value"] for c in detection_row.get("components", [])}
    if components:  # the task-aware detail the decision record carries
        assert components["match_rate"] < 0.5 and components["only_serving"] > 1
    world.wait("v2 served again", lambda: all(world.serving(d, "detector") == "v2" for d in devices), 60)
