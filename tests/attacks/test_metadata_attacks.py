"""Attacks on the update metadata and bundles, end to end, with real processes.

Given one controller and one agent serving v1, the agent reaching the controller's REST URL (TUF
metadata and bundle downloads) through an attacker-controlled proxy, and, where the attack needs
it, the controller's online key (a broken-into controller has it): each test offers the device a
new version under attack and asserts that the device refuses it with a reason naming the check,
keeps serving v1 (asked on its inference endpoint), and that the controller shows the failure in
`fleet devices show`. Each test uses its own version names; the rollout is aborted afterwards.

Forged timestamps and snapshots carry the next version numbers; a device that trusted them is
brought back by two ordinary targets changes (`fleet models policy`), after which the
controller's own timestamp is newer again.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from e2e.conftest import FleetWorld
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from fleet.core import synthetic_models as sm
from fleet.core.trust import load_signer, next_root, target_path_for

from .proxy import AttackProxy, Upstream

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "cam"
DEVICE = "cam-00"
FIRST_TARGETS: list[bytes] = []


@pytest.fixture(scope="module")
def proxy() -> Iterator[AttackProxy]:
    # The upstream is set once the controller's port is known (below).
    p = AttackProxy("http://127.0.0.1:1")
    yield p
    p.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, proxy: AttackProxy) -> Iterator[FleetWorld]:
    w = FleetWorld(tmp_path_factory.mktemp("attacks"))
    proxy.upstream = w.cluster.url
    # Bundle URLs in desired state point at the proxy too; the agent's metadata URL follows --controller-url.
    w.cluster.env["FLEET_PUBLIC_URL"] = proxy.url
    w.agent_url = proxy.url
    w.start()
    try:
        w.push(f"{MODEL}:v1", sm.classifier(1), task="classification")
        # Kept for the replay attack; the device first sees a later targets version than this one.
        FIRST_TARGETS.append(published(w, "targets.json"))
        w.fleet("models", "policy", MODEL, "--min-release", "0", "--keys-dir", str(w.keys))
        w.add_agents(1, traffic=False)
        w.fleet("rollout", f"{MODEL}:v1", "--canary", "100%")
        assert w.wait_rollout(f"{MODEL}-v1")["phase"] == "Completed"
        w.wait("v1 serving", lambda: w.serving(DEVICE, MODEL) == "v1", 60)
        yield w
    finally:
        w.stop()


@pytest.fixture(autouse=True)
def clean_proxy(proxy: AttackProxy) -> Iterator[None]:
    proxy.clear()
    yield
    proxy.clear()


# -- helpers ----------------------------------------------------------------------------------------


def infer_version(world: FleetWorld) -> str:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{world.inference_port(DEVICE)}")
    item = triton.InferInput("input", [1, 3, 32, 32], "FP32")
    item.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    return str(client.infer(MODEL, [item]).get_response().model_version)


def push(world: FleetWorld, version: str, release: int = 0) -> None:
    path = world.models / f"{MODEL}-{version}.onnx"
    path.write_bytes(sm.classifier(int(version.strip("v").split("-")[0]) + 10))
    world.fleet("models", "push", f"{MODEL}:{version}", str(path), "--task", "classification",
                "--release", str(release), "--keys-dir", str(world.keys))


def published(world: FleetWorld, name: str) -> bytes:
    return httpx.get(f"{world.cluster.url}/tuf/{name}").content


def online_key(world: FleetWorld) -> CryptoSigner:
    return load_signer(world.workdir / "controller" / "keys" / "online.key")


def _bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False))


def _meta(data: bytes, version: int) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


def forge_chain(world: FleetWorld, targets: bytes, signer: Signer, *,
                timestamp_expires: timedelta = timedelta(hours=1), bump: int = 1) -> dict[str, bytes]:
    """Snapshot and timestamp over `targets`, signed by `signer`, one version past the published ones."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    current_ts = Metadata[Timestamp].from_bytes(published(world, "timestamp.json")).signed
    targets_version = Metadata[Targets].from_bytes(targets).signed.version
    snap_version = current_ts.snapshot_meta.version + bump
    snapshot = Metadata(Snapshot(version=snap_version, expires=now + timedelta(days=1),
                                 meta={"targets.json": _meta(targets, targets_version)}))
    snapshot.sign(signer)
    snapshot_bytes = _bytes(snapshot)
    timestamp = Metadata(Timestamp(version=current_ts.version + bump, expires=now + timestamp_expires,
                                   snapshot_meta=_meta(snapshot_bytes, snap_version)))
    timestamp.sign(signer)
    return {"timestamp.json": _bytes(timestamp), "snapshot.json": snapshot_bytes, "targets.json": targets}


def serve_chain(proxy: AttackProxy, chain: dict[str, bytes]) -> None:
    for name, body in chain.items():
        proxy.serve("^/tuf/" + re.escape(name) + "$", body)


def heal(world: FleetWorld) -> None:
    """Two ordinary targets changes: the controller's timestamp overtakes any forged one."""
    for _ in range(2):
        world.fleet("models", "policy", MODEL, "--min-release", "0", "--keys-dir", str(world.keys))


def roll_out_and_expect_refusal(world: FleetWorld, version: str, *words: str) -> str:
    """Roll `version` out; the device fails it with a reason containing `words`, keeps v1; abort."""
    world.fleet("rollout", f"{MODEL}:{version}", "--canary", "100%", "--name", f"r-{version}")

    def failed() -> str | None:
        status = world.update_status(DEVICE, MODEL)
        if status.get("state") == "Failed" and status.get("target_version") == version:
            return str(status.get("error") or "")
        return None

    try:
        reason = world.wait(f"{DEVICE} to refuse {version}", failed, 60)
    finally:
        if world.rollout(f"r-{version}")["phase"] not in ("Completed", "RolledBack", "Aborted"):
            world.fleet("rollout", "abort", f"r-{version}", "--reason", "attack test")
    for word in words:
        assert word.lower() in reason.lower(), reason
    assert world.serving(DEVICE, MODEL) == "v1"
    assert infer_version(world) == "v1"
    # The controller shows it: the device's update state, and its events.
    shown = world.device(DEVICE)
    text = str(shown)
    assert version in text and words[0].lower() in text.lower()
    return reason


# -- arbitrary software ------------------------------------------------------------------------------


def test_broken_into_controller_assigns_an_unsigned_version(world: FleetWorld) -> None:
    """Attack: a broken-into controller offers a version no release key signed.

    The attacker writes a bundle into the artifact store and a model_versions row straight into
    the controller's SQLite database, then rolls it out the normal way. The device finds no signed
    target for it and refuses.
    """
    stored = world.workdir / "controller" / "artifacts" / "bundles" / MODEL
    source = (stored / "v1" / "bundle.tar").read_bytes()
    (stored / "v90").mkdir(parents=True)
    (stored / "v90" / "bundle.tar").write_bytes(source)
    db = sqlite3.connect(world.workdir / "controller" / "fleet.db")
    try:
        row = db.execute("SELECT * FROM model_versions WHERE name = ? AND version = 'v1'", (MODEL,)).fetchone()
        columns = [c[1] for c in db.execute("PRAGMA table_info(model_versions)")]
        values = dict(zip(columns, row, strict=True))
        values.pop("id", None)
        values.update(version="v90", target_path=target_path_for(MODEL, "v90"))
        db.execute(f"INSERT INTO model_versions ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                   list(values.values()))
        db.commit()
    finally:
        db.close()
    roll_out_and_expect_refusal(world, "v90", "no release-signed target")


def test_targets_signed_by_a_wrong_key(world: FleetWorld, proxy: AttackProxy) -> None:
    """Attack: arbitrary bundle, signed into targets by a key the root does not trust.

    The broken-into controller signs snapshot and timestamp with its real online key over targets
    it signed itself with another key; the device refuses the targets.
    """
    push(world, "v2")
    current = Metadata[Targets].from_bytes(published(world, "targets.json"))
    forged = Metadata(Targets(version=current.signed.version + 1, expires=current.signed.expires,
                              targets=dict(current.signed.targets)))
    forged.sign(CryptoSigner.generate_ed25519())
    serve_chain(proxy, forge_chain(world, _bytes(forged), online_key(world)))
    try:
        roll_out_and_expect_refusal(world, "v2", "not signed by the trusted keys")
    finally:
        proxy.clear()
        heal(world)


def test_targets_signed_by_the_online_key(world: FleetWorld, proxy: AttackProxy) -> None:
    """Attack: arbitrary bundle, the broken-into controller signs targets with its own online key.

    The online key may sign only snapshot and timestamp: below the targets threshold (0 of 1
    targets-key signatures), the device refuses.
    """
    push(world, "v3")
    online = online_key(world)
    current = Metadata[Targets].from_bytes(published(world, "targets.json"))
    forged = Metadata(Targets(version=current.signed.version + 1, expires=current.signed.expires,
                              targets=dict(current.signed.targets)))
    forged.sign(online)
    serve_chain(proxy, forge_chain(world, _bytes(forged), online))
    try:
        roll_out_and_expect_refusal(world, "v3", "not signed by the trusted keys")
    finally:
        proxy.clear()
        heal(world)


# -- bundle bytes -------------------------------------------------------------------------------------


def test_endless_data_bundle_longer_than_signed(world: FleetWorld, proxy: AttackProxy) -> None:
    """Attack: endless data, the mirror sends more bytes than the signed length.

    The download is capped at the signed length and refused.
    """
    push(world, "v4")
    proxy.on(r"/versions/v4/bundle", lambda _p, up: Upstream(200, (up.body if up else b"") + b"\0" * 5_000_000,
                                                              "application/x-tar"))
    roll_out_and_expect_refusal(world, "v4", "larger")
    assert proxy.served(r"/versions/v4/bundle")


def test_malicious_mirror_tampered_bundle(world: FleetWorld, proxy: AttackProxy) -> None:
    """Attack: malicious mirror, the bundle bytes are changed in transit.

    The SHA-256 of the download does not match the signed one; the device refuses.
    """
    push(world, "v5")

    def flip(_path: str, up: Upstream | None) -> Upstream:
        assert up is not None
        body = bytearray(up.body)
        body[len(body) // 2] ^= 0xFF
        return Upstream(200, bytes(body), "application/x-tar")

    proxy.on(r"/versions/v5/bundle", flip)
    roll_out_and_expect_refusal(world, "v5", "sha")


# -- rollback, freeze, mix-and-match ------------------------------------------------------------------


def test_rollback_older_targets_replayed(world: FleetWorld, proxy: AttackProxy) -> None:
    """Attack: rollback, an older targets metadata is replayed (under fresh snapshot and timestamp).

    The device has seen a newer targets version and refuses the older one.
    """
    push(world, "v6")
    serve_chain(proxy, forge_chain(world, FIRST_TARGETS[0], online_key(world)))
    try:
        roll_out_and_expect_refusal(world, "v6", "rollback")
    finally:
        proxy.clear()
        heal(world)


def test_indefinite_freeze_expired_timestamp(world: FleetWorld, proxy: AttackProxy) -> None:
    """Attack: indefinite freeze, the device is kept on an expired timestamp.

    The timestamp is crafted with the controller's online key (from its data dir), expired an
    hour ago; the device refuses to act on expired metadata.
    """
    push(world, "v7")
    chain = forge_chain(world, published(world, "targets.json"), online_key(world),
                        timestamp_expires=timedelta(hours=-1))
    proxy.serve(r"^/tuf/timestamp\.json$", chain["timestamp.json"])
    proxy.serve(r"^/tuf/snapshot\.json$", chain["snapshot.json"])
    try:
        roll_out_and_expect_refusal(world, "v7", "expired")
    finally:
        proxy.clear()
        heal(world)


def test_mix_and_match_snapshot_and_timestamp(world: FleetWorld, proxy: AttackProxy) -> None:
    """Attack: mix-and-match, a snapshot from an older version served with the current timestamp.

    The snapshot's hash is not the one the timestamp signs; the device refuses.
    """
    old_snapshot = published(world, "snapshot.json")
    push(world, "v8")
    proxy.serve(r"^/tuf/snapshot\.json$", old_snapshot)
    roll_out_and_expect_refusal(world, "v8", "does not match the length or hash")


def test_release_below_the_signed_minimum_is_refused_by_the_controller(world: FleetWorld) -> None:
    """Attack: rollback to an older release counter than the signed minimum.

    With a signed minimum release of 5, the controller refuses to start a rollout of a release-3
    version (409, naming the minimum); the device-side refusal of the same is tested in
    tests/integration/test_updater.py (the controller here never assigns it).
    """
    push(world, "v9", release=3)
    world.fleet("models", "policy", MODEL, "--min-release", "5", "--keys-dir", str(world.keys))
    try:
        proc = world.fleet("rollout", f"{MODEL}:v9", "--canary", "100%", check=False)
        assert proc.returncode == 1
        assert "409" in proc.stderr and "below the signed minimum release 5" in proc.stderr
        assert world.serving(DEVICE, MODEL) == "v1"
    finally:
        world.fleet("models", "policy", MODEL, "--min-release", "0", "--keys-dir", str(world.keys))


# -- root rotation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed_by", ["new keys only", "old keys only"])
def test_root_rotation_needs_both_thresholds(world: FleetWorld, proxy: AttackProxy, signed_by: str) -> None:
    """Attack: root rotation to attacker keys, signed by only one side.

    A root v2 that replaces the root and targets keys is served as 2.root.json, signed by the new
    keys only, or by the old release key only; the device refuses it (and so every update).
    """
    version = "v10" if signed_by == "new keys only" else "v11"
    push(world, version)
    root_v1 = published(world, "1.root.json")
    old = load_signer(world.keys / "release.key")
    new = CryptoSigner.generate_ed25519()
    rotated = next_root(root_v1, [], add_keys={"root": [new.public_key], "targets": [new.public_key]},
                        revoke_keys={"root": [old.public_key.keyid], "targets": [old.public_key.keyid]},
                        require_threshold=False)
    md = Metadata[Root].from_bytes(rotated)
    md.sign(new if signed_by == "new keys only" else old)
    proxy.serve(r"^/tuf/2\.root\.json$", _bytes(md))
    roll_out_and_expect_refusal(world, version, "not signed by the trusted keys")


