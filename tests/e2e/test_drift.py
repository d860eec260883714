"""Input drift end to end: separate controller and agent processes, driven through the CLI.

Given a classifier pushed with `--reference DIR` (its inputs' and outputs' profile in the signed
manifest) and four devices in two label groups, all serving it,
when the two devices of group `site=dock` receive inputs shifted by +2 standard deviations
(their built-in traffic replays a folder of shifted `.npy` files) while the `site=lab` devices
receive in-distribution inputs,
then `fleet drift ls --group-by site -o json` marks exactly the two shifted devices and the
`dock` group as drifting, with an input channel as the top feature, and `lab` as not drifting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.cli.demo import fleet_cmd
from fleet.core import synthetic_models as sm

from .conftest import FleetWorld

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


BATCH = 4  # images per request: more samples per second of traffic
SAMPLES = 800  # per device before judging: PSI's sampling noise is ~15 * (1/1200 + 1/800) ~ 0.03


def _npy_folder(folder: Path, count: int, shift: float, seed: int) -> Path:
    """`count` requests of BATCH images each. Many distinct images: a replay of a few would itself
    look like drift against the reference (a handful of values cannot fill 16 quantile bins)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.save(folder / f"{i:04d}.npy", (rng.standard_normal((BATCH, 3, 32, 32)) + shift).astype(np.float32))
    return folder


def _start_agent(world: FleetWorld, index: int, token: str, site: str, traffic: Path) -> str:
    # As FleetWorld.start_agent, with a folder of .npy inputs as the built-in traffic.
    device_id = f"cam-{index:02d}"
    # Several agents on one machine: each Prometheus endpoint on a free port.
    world.cluster.env = {**world.cluster.env, "FLEET_AGENT_METRICS_ADDR": "127.0.0.1:0"}
    world.cluster._spawn(device_id, fleet_cmd(
        "agent", "run", "--data-dir", str(world.workdir / "agents" / device_id),
        "--controller-grpc", f"127.0.0.1:{world.cluster.grpc_port}", "--controller-url", world.cluster.url,
        "--trust-root", str(world.root), "--device-id", device_id, "--inference-addr", "127.0.0.1:0",
        "--token", token, "--label", f"site={site}", "--traffic", str(traffic), "--traffic-rate", "30",
        *world.cluster.agent_tls_args()))
    return device_id


def test_input_shift_on_two_devices_raises_drift_for_exactly_them_and_their_group(world: FleetWorld) -> None:
    # Given a classifier whose reference profile was recorded at push time
    data = world.workdir / "data"
    reference = _npy_folder(data / "reference", 300, 0.0, seed=1)
    model = world.models / "cls-v1.onnx"
    model.write_bytes(sm.classifier(1))
    world.fleet("models", "push", "cls:v1", str(model), "--task", "classification", "--reference", str(reference),
                "--keys-dir", str(world.keys))
    manifest = world.json("models", "show", "cls:v1")["manifest"]
    assert manifest["profile"]["source"] == "reference" and manifest["profile"]["samples"] == 300
    assert {f["samples"] for f in manifest["profile"]["features"] if f["kind"] == "input"} == {300 * BATCH}

    # And four devices: two in site=lab with in-distribution inputs, two in site=dock with shifted ones
    world.fleet("keys", "export-root", "--out", str(world.root), "--keys-dir", str(world.keys))
    token = world.json("tokens", "create", "--uses", "4", "--ttl", "1h")["token"]
    normal = _npy_folder(data / "normal", 400, 0.0, seed=2)
    shifted = _npy_folder(data / "shifted", 100, 2.0, seed=3)
    sites = {10: ("lab", normal), 11: ("lab", normal), 12: ("dock", shifted), 13: ("dock", shifted)}
    devices = [_start_agent(world, i, token, site, folder) for i, (site, folder) in sites.items()]
    world.wait("4 agents connected", lambda: all(world.device(d).get("connected") for d in devices), 90)

    # When the model is served everywhere
    world.fleet("rollout", "cls:v1", "--canary", "100%")
    assert world.wait_rollout("cls-v1")["phase"] == "Completed"

    # Then drift is raised for exactly the shifted devices and their group
    def settled() -> dict[str, Any] | None:
        report = world.json("drift", "ls", "--model", "cls", "--group-by", "site")
        ours = [d for d in report["devices"] if d["device_id"] in devices]
        if len(ours) < 4 or not all(d["eligible"] and d["samples"] >= SAMPLES for d in ours):
            return None
        return dict(report)

    report = world.wait("drift with enough samples on every device", settled, 120, every=2.0)
    by_device = {d["device_id"]: d for d in report["devices"] if d["device_id"] in devices}
    scores = {d: {f["feature"]: (round(f["psi"], 3), f["samples"]) for f in e["features"]}
              for d, e in by_device.items()}
    assert {d for d, e in by_device.items() if e["drifting"]} == {"cam-12", "cam-13"}, scores
    assert all(e["profile_source"] == "reference" for e in by_device.values())
    assert by_device["cam-12"]["top_feature"].startswith("input:input:c")
    assert by_device["cam-10"]["max_psi"] < report["psi_threshold"]

    groups = {g["group"]: g for g in report["groups"] if g["model"] == "cls"}
    assert groups["dock"]["drifting"] and groups["dock"]["drifting_devices"] == ["cam-12", "cam-13"]
    assert not groups["lab"]["drifting"] and groups["lab"]["drifting_devices"] == []

    # And the table form names them for a person
    table = world.fleet("drift", "ls", "--model", "cls", "--group-by", "site").stdout
    assert "DRIFTING" in table and "dock" in table

    # And Prometheus sees the same: the dock group's PSI over the threshold, two drifting devices
    families = text_string_to_metric_families(httpx.get(f"{world.cluster.url}/metrics", headers=world.auth).text)
    samples = [s for f in families for s in f.samples]
    psi = {s.labels["group"]: s.value for s in samples
           if s.name == "fleet_drift_psi" and s.labels["model"] == "cls" and s.labels["group"]}
    assert psi["dock"] >= report["psi_threshold"] > psi["lab"], psi
    drifting = [s.value for s in samples if s.name == "fleet_drifting_devices" and s.labels["model"] == "cls"]
    assert drifting == [2.0]


def test_push_with_pictures_as_reference_data(world: FleetWorld) -> None:
    # Given a folder of photos (PNG, another size than the model's input) for an image classifier
    from PIL import Image

    pictures = world.workdir / "data" / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(pictures / f"{i:03d}.png")
    model = world.models / "pics-v1.onnx"
    model.write_bytes(sm.classifier(1))

    # When it is pushed with them and the normalisation the model expects
    world.fleet("models", "push", "pics:v1", str(model), "--task", "classification", "--reference", str(pictures),
                "--reference-mean", "0.5", "--reference-std", "0.25", "--keys-dir", str(world.keys))

    # Then the signed manifest holds a reference profile of 60 requests, in normalised units
    profile = world.json("models", "show", "pics:v1")["manifest"]["profile"]
    assert profile["source"] == "reference" and profile["samples"] == 60
    channels = [f for f in profile["features"] if f["kind"] == "input"]
    assert len(channels) == 3 and all(f["min"] >= -2.0 - 1e-6 and f["max"] <= 2.0 + 1e-6 for f in channels)
    assert all(abs(f["mean"]) < 0.1 for f in channels)  # uniform pixels: (0.5 - 0.5) / 0.25 on average

    # And a bad option is refused with a clear error, nothing pushed
    bad = world.fleet("models", "push", "pics:v2", str(model), "--task", "classification", "--reference",
                      str(pictures), "--reference-mean", "0.5,oops", "--keys-dir", str(world.keys), check=False)
    assert bad.returncode == 2 and "--reference-mean expects comma-separated numbers" in bad.stderr + bad.stdout
    assert world.fleet("models", "show", "pics:v2", check=False).returncode != 0
