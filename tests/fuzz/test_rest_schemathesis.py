"""Fuzz the controller's REST API from its own OpenAPI document (schemathesis).

Rule under test: whatever a client sends (any path, query, header or body the schema allows, and
schemathesis' negative cases that it does not), the controller never answers with a 5xx and never
lets an exception escape; a 2xx answer matches the response schema the API publishes.

Each API operation is one pytest test. The app is a real in-process controller (SQLite file, local
artifact store, TUF keys) seeded with a signed pushed model version, an enrolment token, an
enrolled device with actual state and telemetry, and a rollout, so that besides the random ids
schemathesis draws, every example is replayed once with its path ids pointed at those real
objects: the handlers behind the 404 are fuzzed too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from fleet.controller import access
from fleet.controller import devices as devices_svc
from fleet.controller.app import create_app
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.db import session_scope
from fleet.controller.settings import ControllerSettings
from fleet.core import synthetic_models, trust
from fleet.core.bundle import build_bundle, sha256_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Examples per operation; each example runs once as drawn and once against the seeded objects.
MAX_EXAMPLES = 30

MODEL, VERSION, DEVICE, ROLLOUT = "detector", "v1", "cam-1", "det-v1"


@dataclass
class World:
    """The seeded controller and the ids of its real objects."""

    ctx: ControllerContext
    app: Any
    # Path parameter name -> a value naming a real object.
    path_ids: dict[str, str]
    # Every fuzzed request is made as an admin: the handlers, not the access check, are under test.
    auth: dict[str, str]
    # A viewer API token that the access-token routes can find (and revoke).
    access_token_id: str


def _seed(tmp_path: Path) -> World:
    settings_ = ControllerSettings(
        data_dir=tmp_path / "controller",
        public_url="http://controller.test:8080",
        max_bundle_bytes=1024 * 1024,
        max_request_body_bytes=64 * 1024,
    )
    ctx = build_context(settings_)
    app = create_app(ctx)
    auth = access.admin_headers(ctx, name="fuzz-admin")
    with ctx.session_factory() as session, session.begin():
        _, viewer = access.create_token(session, name="fuzz-viewer", role="viewer")
        access_token_id = viewer.id
    with TestClient(app, headers=auth) as client:
        release_key = tmp_path / "ops" / "release.key"
        trust.generate_key_pair(release_key)
        signer = trust.load_signer(release_key)
        public = trust.load_public_key(trust.public_key_path(release_key))
        online = trust.load_public_key(client.get("/api/v1/trust/online-key").json()["public_key_pem"])
        root = trust.new_root(signer, public, online)
        assert client.post("/api/v1/trust/root", content=root).status_code == 200

        model = tmp_path / "model.onnx"
        model.write_bytes(synthetic_models.classifier(0, input_shape=(-1, 3, 8, 8), channels=4))
        bundle = tmp_path / "bundle.tar"
        manifest = build_bundle(
            bundle, name=MODEL, version=VERSION, task="classification", model_files={"any": model}
        )
        targets = trust.add_target(
            None, root, signer, target_path=trust.target_path_for(MODEL, VERSION),
            length=bundle.stat().st_size, sha256=sha256_file(bundle), custom=trust.target_custom(manifest),
        )
        pushed = client.post(
            f"/api/v1/models/{MODEL}/versions",
            files={"bundle": ("bundle.tar", bundle.read_bytes(), "application/x-tar"),
                   "targets": ("targets.json", targets, "application/json")},
        )
        assert pushed.status_code == 201, pushed.text

        token = client.post("/api/v1/enrollment-tokens", json={"max_uses": 2, "labels": {"site": "berlin"}})
        assert token.status_code == 201, token.text
        token_id = str(token.json()["id"])
        with session_scope(ctx.session_factory) as session:
            devices_svc.enroll(
                session, token=token.json()["token"], requested_id=DEVICE, labels={"tier": "edge"},
                hardware={"hardware_class": "cpu"}, agent_version="fuzz",
            )
            at_ms = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)
            devices_svc.record_actual(session, DEVICE, {
                "desired_generation": 1,
                "models": [{"model": MODEL, "slots": [{"role": "serving", "version": VERSION, "sha256": "a" * 64,
                                                      "loaded": True, "execution_providers": ["CPUExecutionProvider"]}],
                            "update": {"target_version": "", "target_role": "", "state": "Idle", "error": "",
                                       "failed_version": "", "attempt": 0, "updated_at_ms": at_ms,
                                       "bytes_done": 0, "bytes_total": 0}}],
            })
            devices_svc.store_telemetry(session, DEVICE, [{
                "seq": 1, "window_start_ms": at_ms, "window_end_ms": at_ms + 10_000,
                "windows": [{"model": MODEL, "version": VERSION, "role": "serving", "requests": 5, "errors": 0,
                             "latency_ms": None, "agreement": [], "mirrored": 0, "shadow_dropped": 0}],
                "events": [{"model": MODEL, "version": VERSION, "role": "serving", "state": "Idle",
                            "reason": "", "at_ms": at_ms}],
            }])
        rollout = client.post("/api/v1/rollouts", json={"model": MODEL, "version": VERSION, "name": ROLLOUT})
        assert rollout.status_code == 201, rollout.text
    path_ids = {
        "name": MODEL, "version": VERSION, "alias": "stable", "device_id": DEVICE, "token_id": token_id,
    }
    return World(ctx=ctx, app=app, path_ids=path_ids, auth=auth, access_token_id=access_token_id)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    seeded = _seed(tmp_path)
    yield seeded
    seeded.ctx.close()


@pytest.fixture
def api_schema(world: World) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", world.app)


schema = schemathesis.pytest.from_fixture("api_schema")


def _call_and_check(case: schemathesis.Case, world: World) -> None:
    case.headers = {**(case.headers or {}), **world.auth}
    response = case.call()
    assert response.status_code != 401, f"the admin token was refused: {response.text}"
    # Error bodies use the house shape ({"error", "message", "details"}), which FastAPI's generated
    # 422 schema does not describe; the schema is held to its word on successes only.
    checks: list[schemathesis.CheckFunction] = [not_a_server_error]
    if 200 <= response.status_code < 300:
        checks.append(response_schema_conformance)
    case.validate_response(response, checks=checks)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_never_answers_with_a_server_error(case: schemathesis.Case, world: World) -> None:
    _call_and_check(case, world)
    if case.path_parameters:
        # The same request against real objects: the handlers behind the lookups get fuzzed too.
        case.path_parameters = {key: _real_id(world, case, key, value) for key, value in case.path_parameters.items()}
        _call_and_check(case, world)


# Values that name real things, picked by the drawn value's hash so every one gets its turn.
ACTIONS = ("pause", "resume", "promote", "abort")
TUF_FILES = ("root.json", "1.root.json", "2.root.json", "timestamp.json", "snapshot.json", "targets.json")


def _real_id(world: World, case: schemathesis.Case, key: str, drawn: Any) -> Any:
    pick = sum(str(drawn).encode())
    if key == "action":
        return ACTIONS[pick % len(ACTIONS)]
    if key == "filename":
        return TUF_FILES[pick % len(TUF_FILES)]
    if key == "name" and case.operation.path.startswith("/api/v1/rollouts/"):
        return ROLLOUT
    if key == "token_id" and case.operation.path.startswith("/api/v1/access-tokens/"):
        return world.access_token_id
    return world.path_ids.get(key, drawn)
