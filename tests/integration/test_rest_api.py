"""The controller's REST API over a real app: real SQLite file, real signed bundles, real TUF keys.

Given a controller with a temporary data dir and an operator with a release key,
when the operator installs a root and pushes signed bundles, enrols devices and inspects them,
then the API answers with the documented shapes, statuses and error bodies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from securesystemslib.signer import Key, Signer

from fleet.controller import devices as devices_svc
from fleet.controller.access import admin_headers
from fleet.controller.app import create_app
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.db import session_scope
from fleet.controller.models import Device
from fleet.controller.settings import ControllerSettings
from fleet.core import synthetic_models, trust
from fleet.core.bundle import build_bundle, sha256_file
from fleet.core.errors import AuthenticationError, ConflictError, PermissionDeniedError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@dataclass
class Operator:
    """The operator's side: a release key, the installed root, and the latest targets."""

    signer: Signer
    public: Key
    root: bytes
    targets: bytes | None = None

    def sign(self, bundle: Path, name: str, version: str, manifest_custom: dict[str, Any]) -> bytes:
        self.targets = trust.add_target(
            self.targets,
            self.root,
            self.signer,
            target_path=trust.target_path_for(name, version),
            length=bundle.stat().st_size,
            sha256=sha256_file(bundle),
            custom=manifest_custom,
        )
        return self.targets


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ControllerContext]:
    settings = ControllerSettings(
        data_dir=tmp_path / "controller",
        public_url="http://controller.test:8080",
        max_bundle_bytes=4 * 1024 * 1024,
        max_request_body_bytes=64 * 1024,
    )
    context = build_context(settings)
    yield context
    context.close()


@pytest.fixture
def client(ctx: ControllerContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), headers=admin_headers(ctx)) as test_client:
        yield test_client


def _make_key(path: Path) -> tuple[Signer, Key]:
    trust.generate_key_pair(path)
    return trust.load_signer(path), trust.load_public_key(trust.public_key_path(path))


@pytest.fixture
def operator(client: TestClient, tmp_path: Path) -> Operator:
    signer, public = _make_key(tmp_path / "ops" / "release.key")
    online = trust.load_public_key(client.get("/api/v1/trust/online-key").json()["public_key_pem"])
    root = trust.new_root(signer, public, online)
    response = client.post("/api/v1/trust/root", content=root, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 1
    return Operator(signer=signer, public=public, root=root)


def _bundle(tmp_path: Path, name: str, version: str, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    model = tmp_path / f"{name}-{version}-{seed}.onnx"
    model.write_bytes(synthetic_models.classifier(seed, input_shape=(-1, 3, 8, 8), channels=4))
    out = tmp_path / f"{name}-{version}-{seed}.tar"
    manifest = build_bundle(
        out, name=name, version=version, task="classification", model_files={"any": model}
    )
    return out, trust.target_custom(manifest)


def _push(
    client: TestClient, name: str, bundle: Path, targets: bytes, url_name: str | None = None
) -> httpx.Response:
    return client.post(
        f"/api/v1/models/{url_name or name}/versions",
        files={
            "bundle": ("bundle.tar", bundle.read_bytes(), "application/x-tar"),
            "targets": ("targets.json", targets, "application/json"),
        },
    )


def _assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error", "message", "details"}
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], dict)
    return body


# -- registry ---------------------------------------------------------------------------------------


def test_push_signed_bundle_then_download_with_ranges(
    client: TestClient, operator: Operator, ctx: ControllerContext, tmp_path: Path
) -> None:
    bundle, custom = _bundle(tmp_path, "detector", "v1")
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    response = _push(client, "detector", bundle, operator.sign(bundle, "detector", "v1", custom))
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["sha256"] == sha and created["size"] == len(data)
    assert created["target_path"] == "detector/v1/bundle.tar"
    assert created["url"] == "http://controller.test:8080/api/v1/models/detector/versions/v1/bundle"
    assert created["manifest"]["name"] == "detector"

    listed = client.get("/api/v1/models").json()
    assert [(m["name"], m["latest"]) for m in listed] == [("detector", "v1")]
    # The repository now publishes the targets, and snapshot/timestamp signed by the online key.
    assert client.get("/api/v1/trust/targets").content == operator.targets
    timestamp = client.get("/tuf/timestamp.json")
    assert timestamp.status_code == 200 and timestamp.headers["cache-control"] == "no-store"

    url = "/api/v1/models/detector/versions/v1/bundle"
    full = client.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{sha}"'
    assert full.headers["accept-ranges"] == "bytes"
    assert int(full.headers["content-length"]) == len(data)

    part = client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"

    tail = client.get(url, headers={"Range": f"bytes={len(data) - 100}-"})
    assert tail.status_code == 206 and tail.content == data[-100:]
    suffix = client.get(url, headers={"Range": "bytes=-7"})
    assert suffix.status_code == 206 and suffix.content == data[-7:]
    clamped = client.get(url, headers={"Range": f"bytes=5-{len(data) * 2}"})
    assert clamped.status_code == 206 and clamped.content == data[5:]

    unsatisfiable = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    _assert_error(unsatisfiable, 416, "range_not_satisfiable")
    assert unsatisfiable.headers["content-range"] == f"bytes */{len(data)}"

    # A stale partial copy (other ETag) gets the whole, current file.
    stale = client.get(url, headers={"Range": "bytes=10-19", "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == data
    head = client.head(url, headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head.headers["content-length"] == "10" and head.content == b""

    # Resolving through an alias.
    alias = client.put("/api/v1/models/detector/aliases/stable", json={"version": "v1"})
    assert alias.status_code == 200 and alias.json()["version"] == "v1"
    assert client.get("/api/v1/models/detector/versions/stable").json()["version"] == "v1"
    assert client.get("/api/v1/models/detector").json()["aliases"] == {"stable": "v1"}


def test_push_before_any_root_is_a_clear_conflict(client: TestClient, tmp_path: Path) -> None:
    bundle, _ = _bundle(tmp_path, "detector", "v1")
    body = _assert_error(_push(client, "detector", bundle, b"{}"), 409, "conflict")
    assert "fleet keys init" in body["message"]


def test_push_refusals_leave_nothing_behind(
    client: TestClient, operator: Operator, ctx: ControllerContext, tmp_path: Path
) -> None:
    bundle, custom = _bundle(tmp_path, "detector", "v1")
    artifact_root = ctx.settings.artifact_root

    def stored_files() -> list[Path]:
        return [p for p in artifact_root.rglob("*") if p.is_file()]

    # Signed by a key the root does not trust for targets.
    rogue_signer, rogue_public = _make_key(tmp_path / "rogue" / "rogue.key")
    online = ctx.trust.online_public_key()
    rogue_root = trust.new_root(rogue_signer, rogue_public, online)
    forged = trust.add_target(
        None, rogue_root, rogue_signer, target_path="detector/v1/bundle.tar",
        length=bundle.stat().st_size, sha256=sha256_file(bundle), custom=custom,
    )
    _assert_error(_push(client, "detector", bundle, forged), 400, "bad_signature")

    # Properly signed, but for other bytes.
    other, other_custom = _bundle(tmp_path, "detector", "v1", seed=5)
    signed_other = trust.add_target(
        None, operator.root, operator.signer, target_path="detector/v1/bundle.tar",
        length=other.stat().st_size, sha256=sha256_file(other), custom=other_custom,
    )
    body = _assert_error(_push(client, "detector", bundle, signed_other), 400, "bad_bundle")
    assert body["details"]["signed_sha256"] == sha256_file(other)

    # Properly signed targets that do not list this bundle at all.
    unrelated, unrelated_custom = _bundle(tmp_path, "other", "v9")
    signed_unrelated = trust.add_target(
        None, operator.root, operator.signer, target_path="other/v9/bundle.tar",
        length=unrelated.stat().st_size, sha256=sha256_file(unrelated), custom=unrelated_custom,
    )
    _assert_error(_push(client, "detector", bundle, signed_unrelated), 400, "bad_signature")

    # Not a bundle at all.
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file" * 100)
    _assert_error(_push(client, "detector", junk, signed_other), 400, "bad_bundle")

    # Posted under another model's URL.
    targets = operator.sign(bundle, "detector", "v1", custom)
    _assert_error(_push(client, "detector", bundle, targets, url_name="classifier"), 400, "bad_bundle")

    assert stored_files() == []
    _assert_error(client.get("/api/v1/models/detector/versions/v1"), 404, "not_found")
    # None of the refused targets became the published one.
    _assert_error(client.get("/api/v1/trust/targets"), 404, "not_found")

    # The good push still works afterwards, and a duplicate is a conflict that keeps the original.
    assert _push(client, "detector", bundle, targets).status_code == 201
    _assert_error(_push(client, "detector", bundle, targets), 409, "conflict")
    assert len(stored_files()) == 1
    assert client.get("/api/v1/models/detector/versions/v1/bundle").content == bundle.read_bytes()


def test_oversize_upload_is_refused_while_streaming(client: TestClient, operator: Operator) -> None:
    too_big = b"\0" * (4 * 1024 * 1024 + 17 * 1024 * 1024 + 1)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must be enforced on the stream
        view = memoryview(too_big)
        for start in range(0, len(view), 1024 * 1024):
            yield bytes(view[start : start + 1024 * 1024])

    response = client.post(
        "/api/v1/models/detector/versions",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    _assert_error(response, 413, "payload_too_large")


def test_delete_version_in_use_is_a_conflict(
    client: TestClient, operator: Operator, ctx: ControllerContext, tmp_path: Path
) -> None:
    bundle, custom = _bundle(tmp_path, "detector", "v1")
    pushed = _push(client, "detector", bundle, operator.sign(bundle, "detector", "v1", custom))
    assert pushed.status_code == 201
    token_plain = _enrol_token(client)
    with session_scope(ctx.session_factory) as session:
        device, _secret = devices_svc.enroll(
            session, token=token_plain, requested_id="cam-1", labels={}, hardware={}, agent_version="t"
        )
        device.desired = {
            "models": [{"model": "detector", "serving": {"version": "v1"}, "shadow": None}]
        }
    body = _assert_error(client.delete("/api/v1/models/detector/versions/v1"), 409, "conflict")
    assert any("cam-1" in user for user in body["details"]["users"])

    with session_scope(ctx.session_factory) as session:
        stored = session.get(Device, "cam-1")
        assert stored is not None
        stored.desired = {"models": []}
        stored.actual = {"models": [{"model": "detector", "slots": [{"role": "serving", "version": "v1"}]}]}
    _assert_error(client.delete("/api/v1/models/detector/versions/v1"), 409, "conflict")

    with session_scope(ctx.session_factory) as session:
        stored = session.get(Device, "cam-1")
        assert stored is not None
        stored.actual = {"models": []}
    assert client.delete("/api/v1/models/detector/versions/v1").status_code == 204
    _assert_error(client.get("/api/v1/models/detector/versions/v1/bundle"), 404, "not_found")
    assert not ctx.artifacts.exists("bundles/detector/v1/bundle.tar")


def test_unpublished_and_unknown_metadata(client: TestClient, operator: Operator, tmp_path: Path) -> None:
    key = client.get("/api/v1/trust/online-key").json()
    assert trust.load_public_key(key["public_key_pem"]).keyid == key["keyid"]
    assert client.get("/tuf/root.json").content == operator.root
    assert client.get("/tuf/1.root.json").content == operator.root
    assert client.get("/api/v1/trust/root").content == operator.root
    _assert_error(client.get("/tuf/2.root.json"), 404, "not_found")
    _assert_error(client.get("/tuf/secrets.json"), 404, "not_found")
    _assert_error(client.get("/tuf/targets.json"), 404, "not_found")  # nothing pushed yet
    # A root not naming this controller's online key is refused with a clear reason.
    signer, public = _make_key(tmp_path / "other" / "release.key")
    _other_online_signer, other_online = _make_key(tmp_path / "other" / "online.key")
    wrong = trust.new_root(signer, public, other_online)
    _assert_error(client.post("/api/v1/trust/root", content=wrong), 400, "invalid_input")


# -- enrolment and devices ------------------------------------------------------------------------


def _enrol_token(client: TestClient, **body: Any) -> str:
    response = client.post("/api/v1/enrollment-tokens", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def test_enrolment_token_lifecycle(
    client: TestClient, ctx: ControllerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = client.post(
        "/api/v1/enrollment-tokens", json={"max_uses": 1, "ttl_seconds": 600, "labels": {"site": "berlin"}}
    ).json()
    token = created["token"]
    assert created["uses"] == 0 and created["expired"] is False

    def enrol(requested: str, labels: dict[str, str] | None = None, tok: str = token) -> tuple[Device, str]:
        with session_scope(ctx.session_factory) as session:
            return devices_svc.enroll(
                session, token=tok, requested_id=requested, labels=labels or {},
                hardware={"hardware_class": "cpu"}, agent_version="0.1",
            )

    device, secret = enrol("Cam 01!", {"site": "paris", "tier": "edge"})
    assert device.id == "cam-01"
    assert device.labels == {"site": "berlin", "tier": "edge"}  # the token's labels win

    with pytest.raises(AuthenticationError, match="used up"):
        enrol("cam-02")
    with pytest.raises(AuthenticationError, match="not valid"):
        enrol("cam-02", tok="made-up")

    listed = client.get("/api/v1/enrollment-tokens").json()
    assert [t["uses"] for t in listed] == [1]
    assert "token" not in listed[0] and "token_hash" not in listed[0]

    # Expiry, with the clock moved past it.
    later_token = _enrol_token(client, max_uses=5, ttl_seconds=60)
    real_now = devices_svc._now
    monkeypatch.setattr(devices_svc, "_now", lambda: real_now() + timedelta(seconds=61))
    with pytest.raises(AuthenticationError, match="expired"):
        enrol("cam-03", tok=later_token)
    monkeypatch.setattr(devices_svc, "_now", real_now)

    # Revocation.
    revoke_id = next(t["id"] for t in client.get("/api/v1/enrollment-tokens").json() if t["max_uses"] == 5)
    assert client.post(f"/api/v1/enrollment-tokens/{revoke_id}/revoke").json()["revoked"] is True
    with pytest.raises(AuthenticationError, match="revoked"):
        enrol("cam-03", tok=later_token)

    # The same id cannot be taken twice, and a refused enrolment does not burn a use.
    spare = _enrol_token(client, max_uses=1)
    with pytest.raises(ConflictError, match="already enrolled"):
        enrol("cam-01", tok=spare)
    enrol("cam-04", tok=spare)

    # Credentials: right secret works, wrong one does not, decommissioned is denied.
    with session_scope(ctx.session_factory) as session:
        assert devices_svc.authenticate(session, "cam-01", secret).id == "cam-01"
        with pytest.raises(AuthenticationError):
            devices_svc.authenticate(session, "cam-01", "wrong")
        with pytest.raises(AuthenticationError):
            devices_svc.authenticate(session, "nobody", secret)
    assert client.post("/api/v1/devices/cam-01/decommission").json()["decommissioned"] is True
    with session_scope(ctx.session_factory) as session, pytest.raises(PermissionDeniedError):
        devices_svc.authenticate(session, "cam-01", secret)
    # ... and a decommissioned id may be enrolled again, with a new secret.
    device, new_secret = enrol("cam-01", tok=_enrol_token(client))
    assert new_secret != secret and device.decommissioned is False


def test_token_request_validation(client: TestClient) -> None:
    _assert_error(client.post("/api/v1/enrollment-tokens", json={"max_uses": 0}), 422, "invalid_input")
    _assert_error(
        client.post("/api/v1/enrollment-tokens", json={"labels": {"bad key!": "x"}}), 400, "invalid_input"
    )
    _assert_error(
        client.post("/api/v1/enrollment-tokens", content=b"{" + b" " * 70_000 + b"}",
                    headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
    )


def test_device_listing_with_selectors_and_detail(client: TestClient, ctx: ControllerContext) -> None:
    fleet = {
        "cam-a": {"site": "berlin", "tier": "edge"},
        "cam-b": {"site": "berlin", "tier": "lab"},
        "cam-c": {"site": "paris", "tier": "edge"},
    }
    token = _enrol_token(client, max_uses=3)
    with session_scope(ctx.session_factory) as session:
        for device_id, labels in fleet.items():
            devices_svc.enroll(
                session, token=token, requested_id=device_id, labels=labels, hardware={}, agent_version="0.1"
            )
        devices_svc.set_connected(session, "cam-b", True)

    def ids(query: str = "") -> list[str]:
        response = client.get(f"/api/v1/devices{query}")
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()]

    assert ids() == ["cam-a", "cam-b", "cam-c"]
    assert ids("?selector=site=berlin") == ["cam-a", "cam-b"]
    assert ids("?selector=site=berlin,tier=edge") == ["cam-a"]
    assert ids("?selector=site=tokyo") == []
    assert ids("?connected=true") == ["cam-b"]
    assert ids("?connected=false&selector=tier=edge") == ["cam-a", "cam-c"]
    _assert_error(client.get("/api/v1/devices?selector=site"), 400, "invalid_input")

    actual = {
        "desired_generation": 3,
        "models": [{
            "model": "detector",
            "slots": [{"role": "serving", "version": "v1", "sha256": "a" * 64, "loaded": True,
                       "execution_providers": ["CPUExecutionProvider"]}],
            "update": {"target_version": "v2", "target_role": "shadow", "state": "Downloading", "error": "",
                       "failed_version": "", "attempt": 1, "updated_at_ms": 0, "bytes_done": 10,
                       "bytes_total": 100},
        }],
    }
    at_ms = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)
    batch = {
        "seq": 7, "window_start_ms": at_ms, "window_end_ms": at_ms + 10_000,
        "windows": [{"model": "detector", "version": "v1", "role": "serving", "requests": 5, "errors": 0,
                     "latency_ms": None, "agreement": [], "mirrored": 0, "shadow_dropped": 0}],
        "events": [{"model": "detector", "version": "v2", "role": "shadow", "state": "Downloading",
                    "reason": "", "at_ms": at_ms}],
    }
    with session_scope(ctx.session_factory) as session:
        devices_svc.record_actual(session, "cam-a", actual)
        assert devices_svc.store_telemetry(session, "cam-a", [batch]) == [7]
    with session_scope(ctx.session_factory) as session:
        # A replay (the agent never saw the ack) is acknowledged but not stored twice.
        assert devices_svc.store_telemetry(session, "cam-a", [batch, {**batch, "seq": 8}]) == [7, 8]

    detail = client.get("/api/v1/devices/cam-a").json()
    assert detail["labels"] == fleet["cam-a"]
    assert detail["acked_generation"] == 3
    assert detail["actual"]["desired_generation"] == 3
    assert detail["desired"]["generation"] == 0
    assert detail["last_seen_at"] is not None
    (model,) = detail["models"]
    assert (model["model"], model["serving"], model["update_state"]) == ("detector", "v1", "Downloading")
    assert [e["state"] for e in detail["events"]] == ["Downloading", "Downloading"]  # seq 7 once, seq 8 once
    _assert_error(client.get("/api/v1/devices/nope"), 404, "not_found")

    assert client.post("/api/v1/devices/cam-a/decommission").status_code == 200
    assert ids() == ["cam-b", "cam-c"]
    assert ids("?include_decommissioned=true") == ["cam-a", "cam-b", "cam-c"]


# -- rollouts, health, docs -------------------------------------------------------------------------


def test_rollout_routes(client: TestClient, operator: Operator, tmp_path: Path) -> None:
    _assert_error(
        client.post("/api/v1/rollouts", json={"model": "detector", "version": "v9"}), 404, "not_found"
    )
    bundle, custom = _bundle(tmp_path, "detector", "v2")
    pushed = _push(client, "detector", bundle, operator.sign(bundle, "detector", "v2", custom))
    assert pushed.status_code == 201
    created = client.post(
        "/api/v1/rollouts",
        json={"model": "detector", "version": "v2", "steps": [0.5, 1.0], "name": "det-v2"},
    )
    assert created.status_code == 201, created.text
    assert client.get("/api/v1/rollouts/det-v2").status_code == 200
    assert [r["name"] for r in client.get("/api/v1/rollouts?model=detector").json()] == ["det-v2"]
    assert client.get("/api/v1/rollouts?model=other").json() == []
    paused = client.post("/api/v1/rollouts/det-v2/pause", json={"reason": "lunch"})
    assert paused.status_code == 200, paused.text
    assert paused.json()["phase"] == "Paused"
    _assert_error(client.post("/api/v1/rollouts/det-v2/pause"), 409, "conflict")
    _assert_error(client.post("/api/v1/rollouts/det-v2/explode"), 400, "invalid_input")
    # The candidate of an unfinished rollout cannot be deleted.
    _assert_error(client.delete("/api/v1/models/detector/versions/v2"), 409, "conflict")


def test_health_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    assert "/api/v1/models/{name}/versions" in spec["paths"]
    assert client.get("/docs").status_code == 200
    _assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
