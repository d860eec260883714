"""Operator API tokens (`fleet.controller.access`) on a real SQLite database, and the CLI's credentials.

Given a migrated database, when tokens are made, used, revoked, expired and bootstrapped,
then only the hash is stored, each refusal says why, use is recorded at most once a minute,
and a controller always starts with a way in for an admin.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet.cli import client as cli_client
from fleet.cli.client import Client, CliError, load_config, write_config
from fleet.controller import access
from fleet.controller.db import make_engine, make_session_factory, migrate
from fleet.controller.models import ApiToken
from fleet.core.errors import AuthenticationError, InvalidInputError, NotFoundError, PermissionDeniedError

T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    migrate(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def make(factory: sessionmaker[Session], role: str = "viewer", **kw: object) -> tuple[str, str]:
    with factory() as session, session.begin():
        plaintext, row = access.create_token(session, name=f"t-{role}", role=role, **kw)  # type: ignore[arg-type]
        return plaintext, row.id


def test_token_format_and_only_the_hash_is_stored(factory: sessionmaker[Session]) -> None:
    plaintext, token_id = make(factory, "operator")
    assert access.TOKEN_RE.match(plaintext)
    assert plaintext.startswith(f"fleet_{token_id}_")
    secret = plaintext.split("_", 2)[2]
    assert len(secret) == 43  # 32 random bytes, base64url
    with factory() as session:
        row = session.get(ApiToken, token_id)
        assert row is not None and row.role == "operator"
        assert row.token_hash == access.hash_token(plaintext)
        assert plaintext not in str(vars(row))
    other, _ = make(factory, "operator")
    assert other != plaintext


def test_authenticate_accepts_the_token_and_refuses_others_with_distinct_reasons(
        factory: sessionmaker[Session]) -> None:
    good, good_id = make(factory, "admin")
    expiring, _ = make(factory, "admin", ttl_s=60, now=T0)
    revoked, revoked_id = make(factory, "admin")
    with factory() as session, session.begin():
        access.revoke_token(session, revoked_id)
    with factory() as session:
        assert access.authenticate(session, good).id == good_id
        assert access.authenticate(session, expiring, now=T0 + timedelta(seconds=59)).role == "admin"
        cases = {
            "expired": (expiring, T0 + timedelta(seconds=60)),
            "revoked": (revoked, None),
            "unknown": (good[:-1] + ("A" if good[-1] != "A" else "B"), None),  # forged secret, real id
        }
        for reason, (presented, now) in cases.items():
            with pytest.raises(AuthenticationError) as refused:
                access.authenticate(session, presented, now=now)
            assert refused.value.details["reason"] == reason
        with pytest.raises(AuthenticationError, match="not valid"):
            access.authenticate(session, "fleet_000000000000_" + "A" * 43)  # unknown id
        with pytest.raises(AuthenticationError, match="not valid"):
            access.authenticate(session, "something else entirely")


def test_roles_are_ordered() -> None:
    viewer = access.Principal(kind="token", id="a", name="v", role="viewer")
    operator = access.Principal(kind="token", id="b", name="o", role="operator")
    device = access.Principal(kind="device", id="cam-1", name="cam-1", role=None)
    access.authorize(operator, "viewer")
    access.authorize(operator, "operator")
    with pytest.raises(PermissionDeniedError, match="needs the admin role"):
        access.authorize(operator, "admin")
    with pytest.raises(PermissionDeniedError, match="has viewer"):
        access.authorize(viewer, "operator")
    with pytest.raises(PermissionDeniedError):
        access.authorize(device, "viewer")
    with pytest.raises(InvalidInputError):
        access.check_role("root")


def test_create_validates_name_role_and_ttl(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        for kwargs in ({"name": "", "role": "viewer"}, {"name": "a b", "role": "viewer"},
                       {"name": "ok", "role": "superuser"}, {"name": "ok", "role": "viewer", "ttl_s": 0},
                       {"name": "ok", "role": "viewer", "ttl_s": access.MAX_TTL_S + 1}):
            with pytest.raises(InvalidInputError):
                access.create_token(session, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(NotFoundError):
            access.revoke_token(session, "nope")


def test_last_used_is_written_at_most_once_a_minute(factory: sessionmaker[Session]) -> None:
    plaintext, token_id = make(factory)
    writes = []
    for seconds in (0, 10, 59, 60, 61, 125):
        with factory() as session, session.begin():
            row = access.authenticate(session, plaintext, now=T0)
            writes.append(access.touch(session, row, now=T0 + timedelta(seconds=seconds)))
    assert writes == [True, False, False, True, False, True]
    with factory() as session:
        row = session.get(ApiToken, token_id)
        assert row is not None and row.last_used_at == T0 + timedelta(seconds=125)


def test_bootstrap_writes_a_private_admin_token_once(factory: sessionmaker[Session], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    caplog.set_level("INFO")
    path = access.ensure_bootstrap_admin(factory, admin_token="", data_dir=data_dir)
    assert path == data_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert token not in caplog.text and str(path) in caplog.text
    with factory() as session:
        assert access.authenticate(session, token).role == "admin"
    # A second start finds a usable admin token and writes nothing
    path.unlink()
    assert access.ensure_bootstrap_admin(factory, admin_token="", data_dir=data_dir) is None
    assert not path.exists()


def test_bootstrap_makes_a_new_file_when_every_admin_token_is_revoked(factory: sessionmaker[Session],
                                                                     tmp_path: Path) -> None:
    first = access.ensure_bootstrap_admin(factory, admin_token="", data_dir=tmp_path)
    assert first is not None
    old = first.read_text().strip()
    with factory() as session, session.begin():
        for row in session.scalars(select(ApiToken)):
            row.revoked_at = datetime.now(UTC)
    second = access.ensure_bootstrap_admin(factory, admin_token="", data_dir=tmp_path)
    assert second == first and second.read_text().strip() != old
    assert stat.S_IMODE(second.stat().st_mode) == 0o600


def test_configured_admin_token_is_stored_hashed_and_rotates(factory: sessionmaker[Session], tmp_path: Path) -> None:
    value = "k8s-secret-" + "x" * 40
    assert access.ensure_bootstrap_admin(factory, admin_token=value, data_dir=tmp_path) is None
    assert not (tmp_path / "admin.token").exists()
    access.ensure_bootstrap_admin(factory, admin_token=value, data_dir=tmp_path)  # idempotent
    with factory() as session:
        rows = list(session.scalars(select(ApiToken)))
        assert len(rows) == 1 and rows[0].name == access.BOOTSTRAP_NAME and rows[0].token_hash != value
        assert access.authenticate(session, value).role == "admin"
    rotated = "k8s-secret-" + "y" * 40
    access.ensure_bootstrap_admin(factory, admin_token=rotated, data_dir=tmp_path)
    with factory() as session:
        assert access.authenticate(session, rotated).role == "admin"
        with pytest.raises(AuthenticationError, match="revoked"):
            access.authenticate(session, value)
    with pytest.raises(InvalidInputError, match="shorter"):
        access.ensure_bootstrap_admin(factory, admin_token="short", data_dir=tmp_path)


# -- the CLI's side ----------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("FLEET_TOKEN", "FLEET_URL", "FLEET_CA_CERT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli_client, "GLOBAL", cli_client.GlobalOptions())
    config = tmp_path / "cfg" / "config.toml"
    monkeypatch.setenv("FLEET_CONFIG", str(config))
    return config


def test_config_file_is_written_private_and_read_back(cli_env: Path) -> None:
    path = write_config({"url": "https://fleet.example:8443", "token": 'fleet_x_"quoted"\\'})
    assert path == cli_env
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config() == {"url": "https://fleet.example:8443", "token": 'fleet_x_"quoted"\\'}
    client = Client()
    assert client.base_url == "https://fleet.example:8443"
    assert client.http.headers["authorization"] == 'Bearer fleet_x_"quoted"\\'
    assert client.token_source == str(path)


def test_config_readable_by_others_is_refused(cli_env: Path) -> None:
    write_config({"token": "t"})
    for mode in (0o644, 0o640, 0o604):
        os.chmod(cli_env, mode)
        with pytest.raises(CliError, match="chmod 600"):
            load_config()
        with pytest.raises(CliError, match="chmod 600"):
            Client()


def test_token_precedence_option_then_env_then_config(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config({"token": "from-config", "url": "http://config:1"})
    assert Client().token == "from-config"
    monkeypatch.setenv("FLEET_TOKEN", "from-env")
    assert Client().token == "from-env" and Client().token_source == "FLEET_TOKEN"
    cli_client.GLOBAL.token = "from-option"
    assert Client().token == "from-option" and Client().token_source == "--token"
    assert Client(token="explicit").token == "explicit"
    assert Client("http://flag:2").base_url == "http://flag:2"


def test_no_credentials_anywhere_sends_no_header(cli_env: Path) -> None:
    client = Client()
    assert client.token is None and "authorization" not in client.http.headers
    assert client.base_url == cli_client.DEFAULT_URL


def test_missing_ca_certificate_is_a_clear_error(cli_env: Path, tmp_path: Path) -> None:
    with pytest.raises(CliError, match="CA certificate"):
        Client(ca_cert=str(tmp_path / "nope.pem"))
