"""Attacks on operator access to the REST API, generated from the app's own routes.

Given a controller (real SQLite file, real app) with API tokens of every role, a revoked and an
expired token, and an enrolled device, every route the app serves is called with each kind of
bad or too-weak credential. The route list comes from `app.routes`, so a new endpoint is tested
the day it is added, and a route without a declared role fails `test_every_route_declares_who_may_call_it`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fleet.controller import access
from fleet.controller import devices as devices_svc
from fleet.controller.api.deps import METRICS_ROUTE, PUBLIC_ROUTES, access_table
from fleet.controller.app import create_app
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.settings import ControllerSettings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Plausible values for every path parameter the API uses; an unknown name fails the test below.
# (The device id is not the enrolled camera's: the role checks call decommission with it.)
PATH_VALUES = {
    "name": "detector", "version": "v1", "alias": "stable", "device_id": "cam-9", "token_id": "0123456789ab",
    "action": "pause", "filename": "timestamp.json",
}
RANK = {"viewer": 0, "operator": 1, "admin": 2}


@dataclass
class World:
    ctx: ControllerContext
    app: FastAPI
    client: TestClient
    tokens: dict[str, str]  # viewer, operator, admin, revoked, expired
    device_secret: str
    enrolment_token: str

    def call(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        response = self.client.request(method, fill(path), headers=headers or {}, follow_redirects=False)
        return response.status_code, dict(response.headers), response.text


def fill(path: str) -> str:
    names = re.findall(r"{(\w+)}", path)
    unknown = [n for n in names if n not in PATH_VALUES]
    assert not unknown, f"add a plausible value for path parameter(s) {unknown} of {path}"
    return path.format(**PATH_VALUES)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_world(tmp_path: Path, **settings: object) -> World:
    ctx = build_context(ControllerSettings(data_dir=tmp_path / "controller", **settings))  # type: ignore[arg-type]
    now = datetime.now(UTC)
    tokens: dict[str, str] = {}
    with ctx.session_factory() as session, session.begin():
        for role in ("viewer", "operator", "admin"):
            tokens[role], _ = access.create_token(session, name=f"attack-{role}", role=role)
        tokens["revoked"], revoked = access.create_token(session, name="attack-revoked", role="admin")
        access.revoke_token(session, revoked.id)
        tokens["expired"], _ = access.create_token(session, name="attack-expired", role="admin",
                                                   ttl_s=60, now=now - timedelta(hours=1))
        enrolment, _ = devices_svc.create_enrollment_token(session, max_uses=2)
        _, secret = devices_svc.enroll(session, token=enrolment, requested_id="cam-1", labels={},
                                       hardware={"hardware_class": "cpu"}, agent_version="attack")
    app = create_app(ctx)
    return World(ctx=ctx, app=app, client=TestClient(app), tokens=tokens, device_secret=secret,
                 enrolment_token=enrolment)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("access"))
    yield w
    w.ctx.close()


def routes(app: FastAPI) -> dict[tuple[str, str], list[str]]:
    return access_table(app)


def required(decl: list[str]) -> str:
    [rule] = decl
    return rule.split("|")[-1]


def protected(app: FastAPI) -> list[tuple[str, str]]:
    return sorted(k for k, decl in routes(app).items() if decl and required(decl) != "public")


def test_every_route_declares_who_may_call_it(world: World) -> None:
    """Attack: a route added without an access rule (forgotten check = open endpoint).

    Every FastAPI route declares exactly one rule (public, viewer, operator, admin, device|viewer);
    a route with no dependency tree at all (docs, schema) must be in the public list.
    """
    table = routes(world.app)
    assert len(table) > 30  # the walk found the routers' routes, not only the app's own
    for key, decl in table.items():
        if not decl:
            assert key in PUBLIC_ROUTES, f"{key} declares no access rule and is not listed as public"
            continue
        assert len(decl) == 1, f"{key} declares {decl}: exactly one access rule per route"
        assert required(decl) in ("public", "viewer", "operator", "admin"), (key, decl)
        assert (required(decl) == "public") == (key in PUBLIC_ROUTES), (
            f"{key} is declared {decl[0]} but PUBLIC_ROUTES says otherwise")


def test_without_a_token_only_the_public_list_answers(world: World) -> None:
    """Attack: call every route with no credentials at all.

    Each protected route answers 401 in the API's error shape with `WWW-Authenticate: Bearer`;
    the routes that answer anything else are exactly PUBLIC_ROUTES (the metrics route is
    protected by default).
    """
    answered: set[tuple[str, str]] = set()
    for (method, path) in routes(world.app):
        status, headers, body = world.call(method, path)
        if status == 401:
            assert headers.get("www-authenticate", "").startswith("Bearer"), (method, path, headers)
            if method != "HEAD":
                error = json.loads(body)
                assert error["error"] == "unauthenticated" and "needs an API token" in error["message"], (method, path)
                assert error["details"]["reason"] == "missing"
        else:
            answered.add((method, path))
    assert answered == set(PUBLIC_ROUTES) & set(routes(world.app)), answered ^ set(PUBLIC_ROUTES)
    assert METRICS_ROUTE not in answered


def test_metrics_public_only_when_configured(tmp_path: Path) -> None:
    """Attack: scrape /metrics anonymously (fleet layout, device counts, request rates).

    Refused (401) by default; allowed only when the operator set metrics_public.
    """
    closed = make_world(tmp_path / "closed")
    assert closed.call("GET", "/metrics")[0] == 401
    assert closed.call("GET", "/metrics", bearer(closed.tokens["viewer"]))[0] == 200
    opened = make_world(tmp_path / "open", metrics_public=True)
    assert opened.call("GET", "/metrics")[0] == 200
    assert tuple(routes(opened.app)[METRICS_ROUTE]) == ("public",)


@pytest.mark.parametrize("weak", ["viewer", "operator"])
def test_too_weak_a_role_is_forbidden(world: World, weak: str) -> None:
    """Attack: use a low-privilege token (a dashboard's viewer, a CI operator) for stronger actions.

    Every route whose rule is above the token's role answers 403, naming the role it needs.
    """
    checked = 0
    for (method, path) in protected(world.app):
        need = required(routes(world.app)[(method, path)])
        if RANK[need] <= RANK[weak]:
            continue
        status, _, body = world.call(method, path, bearer(world.tokens[weak]))
        assert status == 403, (method, path, status, body)
        assert f"needs the {need} role" in body and f"has {weak}" in body, body
        checked += 1
    assert checked >= (4 if weak == "operator" else 10)


def test_the_required_role_is_enough(world: World) -> None:
    """Attack (control): make sure the refusals above are about roles, not broken routes.

    With exactly the declared role, no route answers 401 or 403.
    """
    for (method, path) in protected(world.app):
        need = required(routes(world.app)[(method, path)])
        status, _, body = world.call(method, path, bearer(world.tokens[need]))
        assert status not in (401, 403), (method, path, status, body)


BAD_HEADERS = {
    "revoked": lambda w: bearer(w.tokens["revoked"]),
    "expired": lambda w: bearer(w.tokens["expired"]),
    "malformed-no-token": lambda w: {"Authorization": "Bearer"},
    "malformed-scheme": lambda w: {"Authorization": f"Basic {w.tokens['admin']}"},
    "malformed-two-parts": lambda w: {"Authorization": f"Bearer {w.tokens['admin']} extra"},
    "forged-secret": lambda w: bearer(w.tokens["admin"][:-6] + "AAAAAA"),
    "enrolment-token": lambda w: bearer(w.enrolment_token),
    "device-secret-as-token": lambda w: bearer(w.device_secret),
    "random-string": lambda w: bearer("hunter2"),
}
EXPECTED_MESSAGE = {
    "revoked": "was revoked", "expired": "expired at", "malformed-no-token": "malformed Authorization",
    "malformed-scheme": "malformed Authorization", "malformed-two-parts": "malformed Authorization",
}


@pytest.mark.parametrize("kind", sorted(BAD_HEADERS))
def test_bad_credentials_are_refused_everywhere(world: World, kind: str) -> None:
    """Attack: present a revoked, expired, malformed, forged or other-format credential.

    Every protected route answers 401 with `WWW-Authenticate: Bearer ... invalid_token`, and the
    message says which problem it is (revoked, expired, malformed, not valid).
    """
    headers = BAD_HEADERS[kind](world)
    for (method, path) in protected(world.app):
        status, answer_headers, body = world.call(method, path, headers)
        assert status == 401, (kind, method, path, status, body)
        assert 'error="invalid_token"' in answer_headers.get("www-authenticate", ""), answer_headers
        if method != "HEAD":
            assert EXPECTED_MESSAGE.get(kind, "not valid") in body, (kind, body)


def test_device_credentials_open_bundle_downloads_only(world: World) -> None:
    """Attack: use a device's own credentials (stolen from a camera) against the operator API.

    They open the bundle download (GET and HEAD) and nothing else; a wrong secret and a
    decommissioned device are refused.
    """
    creds = {"x-fleet-device-id": "cam-1", **bearer(world.device_secret)}
    for (method, path), decl in routes(world.app).items():
        if not decl or required(decl) == "public":
            continue
        status, _, body = world.call(method, path, creds)
        if decl == ["device|viewer"]:
            assert status not in (401, 403), (method, path, status, body)  # 404: no such bundle, but let in
        else:
            assert status == 401 and "device credentials are not accepted here" in body, (method, path, status)
    bundle = "/api/v1/models/{name}/versions/{version}/bundle"
    wrong = {"x-fleet-device-id": "cam-1", **bearer(world.device_secret[:-4] + "AAAA")}
    assert world.call("GET", bundle, wrong)[0] == 401
    assert world.call("GET", bundle, {"x-fleet-device-id": "cam-404", **bearer(world.device_secret)})[0] == 401


def test_decommissioned_device_cannot_download(tmp_path: Path) -> None:
    """Attack: a decommissioned (stolen, retired) camera keeps downloading model bundles.

    Its credentials are refused with 403 once the admin decommissions it.
    """
    w = make_world(tmp_path)
    creds = {"x-fleet-device-id": "cam-1", **bearer(w.device_secret)}
    bundle = "/api/v1/models/{name}/versions/{version}/bundle"
    assert w.call("GET", bundle, creds)[0] == 404
    assert w.client.post("/api/v1/devices/cam-1/decommission", headers=bearer(w.tokens["admin"])).status_code == 200
    status, _, body = w.call("GET", bundle, creds)
    assert status == 403 and "decommissioned" in body


def test_anonymous_upload_is_refused_before_its_body_is_read(world: World) -> None:
    """Attack: stream a huge anonymous upload to fill the controller's disk.

    The upload route answers 401 (and 403 for a viewer) from the request headers alone, before
    FastAPI would parse (and spool) the multipart body: the body iterator is never drained.
    """
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(64):
            sent += 1
            yield b"x" * 65536

    for headers, expected in (({}, 401), (bearer(world.tokens["viewer"]), 403)):
        sent = 0
        response = world.client.post("/api/v1/models/detector/versions", content=body(),
                                     headers={"content-type": "multipart/form-data; boundary=x", **headers})
        assert response.status_code == expected, response.text
        assert sent < 64, f"the controller read {sent} chunks of an unauthenticated upload"


def test_revoked_token_stops_working_at_once(world: World) -> None:
    """Attack: keep using a token after an admin revoked it (a leaked CI token).

    The next request after `POST /api/v1/access-tokens/{id}/revoke` is refused with 401.
    """
    admin = world.client
    made = admin.post("/api/v1/access-tokens", json={"name": "leaked-ci", "role": "operator"},
                      headers=bearer(world.tokens["admin"]))
    assert made.status_code == 201
    token, token_id = made.json()["token"], made.json()["id"]
    assert admin.get("/api/v1/whoami", headers=bearer(token)).json()["name"] == "leaked-ci"
    assert admin.post(f"/api/v1/access-tokens/{token_id}/revoke", headers=bearer(world.tokens["admin"])).json()[
        "revoked_at"]
    refused = admin.get("/api/v1/whoami", headers=bearer(token))
    assert refused.status_code == 401 and "revoked" in refused.json()["message"]


def test_token_listing_never_shows_secrets(world: World) -> None:
    """Attack: read other operators' tokens (or their hashes) from the listing.

    `GET /api/v1/access-tokens` shows ids, names and roles; no token text and no hash.
    """
    listing = world.client.get("/api/v1/access-tokens", headers=bearer(world.tokens["admin"]))
    assert listing.status_code == 200
    text = listing.text
    for token in world.tokens.values():
        assert token not in text
        assert access.hash_token(token) not in text
    assert "token_hash" not in text and '"token"' not in text


def test_cli_refuses_a_config_file_others_can_read(tmp_path: Path) -> None:
    """Attack: a token left in a world-readable CLI config file (mode 0644).

    The CLI refuses to use it and says how to fix it (chmod 600); nothing is sent.
    """
    config = tmp_path / "config.toml"
    config.write_text('url = "http://127.0.0.1:9"\ntoken = "fleet_0123456789ab_secret"\n')
    config.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k not in ("FLEET_TOKEN", "FLEET_URL", "FLEET_CA_CERT")}
    env["FLEET_CONFIG"] = str(config)
    proc = subprocess.run([sys.executable, "-m", "fleet.cli.main", "whoami"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert proc.returncode == 1, proc
    assert "chmod 600" in proc.stderr and "0644" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    config.chmod(0o600)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    proc = subprocess.run([sys.executable, "-m", "fleet.cli.main", "whoami"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    # Now the file is read: the CLI gets as far as trying the (unreachable) URL from it.
    assert "chmod" not in proc.stderr and "127.0.0.1:9" in proc.stderr, proc.stderr
