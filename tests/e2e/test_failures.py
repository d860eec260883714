"""Bad input end to end: each is refused with a clear reason, the device keeps serving its model,
and the controller shows why.

Covered: a bundle tampered with in the artifact store, a bundle whose model file is not a valid
ONNX model, a bundle signed with the wrong key (refused at upload), a device provisioned with
another release root (refuses the controller's metadata).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton

from fleet.core import synthetic_models as sm
from fleet.core.bundle import manifest_json
from fleet.core.manifest import Manifest, Variant
from fleet.core.trust import (
    add_target,
    generate_key_pair,
    load_public_key,
    load_signer,
    new_root,
    target_path_for,
)

from .conftest import FleetWorld

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "guard"


def infer_version(world: FleetWorld, device: str) -> str:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{world.inference_port(device)}")
    item = triton.InferInput("input", [1, 3, 32, 32], "FP32")
    item.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    return str(client.infer(MODEL, [item]).get_response().model_version)


@pytest.fixture(scope="module")
def serving_v1(world: FleetWorld) -> list[str]:
    world.push(f"{MODEL}:v1", sm.classifier(1), task="classification")
    devices = world.add_agents(2)
    world.fleet("rollout", f"{MODEL}:v1", "--canary", "100%")
    assert world.wait_rollout(f"{MODEL}-v1")["phase"] == "Completed"
    world.wait("v1 everywhere", lambda: all(world.serving(d, MODEL) == "v1" for d in devices), 60)
    return devices


def rollout_and_expect_rollback(world: FleetWorld, devices: list[str], version: str) -> dict[str, Any]:
    world.fleet("rollout", f"{MODEL}:{version}", "--canary", "50%", "--min-samples", "30", "--deadline", "90s")
    result = world.wait_rollout(f"{MODEL}-{version}", timeout=120)
    assert result["phase"] == "RolledBack", result
    for device in devices:
        assert world.serving(device, MODEL) == "v1"
        assert infer_version(world, device) == "v1"
    return result


def failure_reasons(world: FleetWorld, rollout: dict[str, Any], devices: list[str], version: str) -> list[str]:
    reasons = [d.get("reason") or "" for d in rollout.get("devices", []) if d.get("state") == "Failed"]
    for device in devices:
        status = world.update_status(device, MODEL)
        if status.get("failed_version") == version:
            reasons.append(status.get("error") or "")
    return [r for r in reasons if r]


def test_tampered_bundle_in_the_artifact_store(world: FleetWorld, serving_v1: list[str]) -> None:
    # Given v2 was pushed and signed, then its bytes were changed in the artifact store
    world.push(f"{MODEL}:v2", sm.classifier(2), task="classification")
    stored = world.workdir / "controller" / "artifacts" / "bundles" / MODEL / "v2" / "bundle.tar"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    # When it is rolled out, then the cohort refuses it, keeps v1, and the controller says why
    result = rollout_and_expect_rollback(world, serving_v1, "v2")
    reasons = failure_reasons(world, result, serving_v1, "v2")
    assert any("sha" in r.lower() or "hash" in r.lower() for r in reasons), reasons
    gate = [d for d in result["decisions"] if d["kind"] == "gate" and d["verdict"] == "Fail"]
    assert gate and "install" in gate[-1]["reason"].lower()


def _garbage_bundle(path: Path, version: str) -> None:
    blob = b"this is not an onnx model " * 40
    manifest = Manifest(
        name=MODEL, version=version, task="classification",
        inputs=sm.signature(sm.classifier(1))[0], outputs=sm.signature(sm.classifier(1))[1],
        variants=(Variant(hardware="any", file="model.onnx", sha256=hashlib.sha256(blob).hexdigest(),
                          size=len(blob)),),
    )
    with tarfile.open(path, "w") as tar:
        for name, payload in (("manifest.json", manifest_json(manifest)), ("model.onnx", blob)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))


def test_bundle_that_is_not_a_valid_onnx_model(world: FleetWorld, serving_v1: list[str]) -> None:
    # Given a correctly signed bundle whose model file is garbage (the CLI would refuse to build it)
    bundle = world.workdir / "garbage.tar"
    _garbage_bundle(bundle, "v3")
    url = world.cluster.url
    current = httpx.get(f"{url}/api/v1/trust/targets", headers=world.auth).content
    targets = add_target(
        current, (world.keys / "root.json").read_bytes(), load_signer(world.keys / "release.key"),
        target_path=target_path_for(MODEL, "v3"), length=bundle.stat().st_size,
        sha256=hashlib.sha256(bundle.read_bytes()).hexdigest(), custom={"model": MODEL, "version": "v3"},
    )
    # When it is pushed, then the controller inspects the model file and refuses it before storing
    # anything (the device refuses such a file too: tests/attacks/test_hostile_input.py)
    response = httpx.post(f"{url}/api/v1/models/{MODEL}/versions",
                          files={"bundle": ("bundle.tar", bundle.read_bytes()), "targets": ("targets.json", targets)},
                          headers=world.auth)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_bundle" and "not an ONNX model" in response.json()["message"]
    listed = world.json("models", "show", MODEL)
    assert "v3" not in [v["version"] for v in listed["versions"]]
    assert all(world.serving(d, MODEL) == "v1" for d in serving_v1)


def test_push_signed_with_the_wrong_key_is_refused(world: FleetWorld, serving_v1: list[str]) -> None:
    other = world.workdir / "other-keys"
    world.fleet("keys", "init", "--keys-dir", str(other))
    path = world.models / "wrong-key.onnx"
    path.write_bytes(sm.classifier(4))
    proc = world.fleet("models", "push", f"{MODEL}:v4", str(path), "--keys-dir", str(other), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "sign" in proc.stderr.lower() or "key" in proc.stderr.lower(), proc.stderr
    listed = world.json("models", "show", MODEL)
    assert "v4" not in [v["version"] for v in listed["versions"]]
    for device in serving_v1:
        assert infer_version(world, device) == "v1"


def test_device_provisioned_with_another_root_refuses_metadata(world: FleetWorld, serving_v1: list[str]) -> None:
    # Given a device whose trusted root was made with a different release key
    rogue_keys = world.workdir / "rogue-keys"
    rogue_keys.mkdir()
    generate_key_pair(rogue_keys / "release.key")
    online = httpx.get(f"{world.cluster.url}/api/v1/trust/online-key", headers=world.auth).json()
    rogue_root = new_root(load_signer(rogue_keys / "release.key"), load_public_key(rogue_keys / "release.pub"),
                          load_public_key(online["public_key_pem"]))
    good_root = world.root.read_bytes()
    world.root.write_bytes(rogue_root)
    try:
        [device] = world.add_agents(1, labels={"site": "rogue"}, first_index=9)
    finally:
        world.root.write_bytes(good_root)

    # When a signed version is assigned to it, then it refuses and the controller shows the reason
    world.fleet("rollout", f"{MODEL}:v1", "--canary", "100%", "--selector", "site=rogue", "--name", "rogue-v1")
    result = world.wait_rollout("rogue-v1", timeout=120)
    assert result["phase"] == "RolledBack"
    status = world.update_status(device, MODEL)
    assert status.get("state") == "Failed"
    assert "sign" in (status.get("error") or "").lower(), status
    assert world.serving(device, MODEL) is None
