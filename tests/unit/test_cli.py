"""The CLI's contract with people and scripts: one clear line for bad input, exit codes, help."""

from __future__ import annotations

import json
import socket

import pytest

from fleet.cli.main import main


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.argv", ["fleet", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dead_controller(monkeypatch: pytest.MonkeyPatch) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("FLEET_URL", url)
    return url


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rollout", "detector:v3", "--canary", "250%"], "cannot exceed 100%"),
        (["rollout", "detector:v3", "--canary", "ten"], "ten"),
        (["rollout", "detector", "--canary", "10%"], "NAME:VERSION"),
        (["rollout", "detector:v3", "--steps", "50,10"], "grow strictly"),
        (["rollout", "status", "x", "-o", "yaml"], "--output"),
        (["tokens", "create", "--ttl", "soon"], "duration"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dead_controller: str,
    args: list[str], message: str,
) -> None:
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2
    assert message.lower() in err.lower()
    assert "Traceback" not in err
    assert err.strip().count("\n") <= 2


def test_unreachable_controller_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dead_controller: str
) -> None:
    code, _, err = run(monkeypatch, capsys, "rollout", "detector:v3", "--canary", "0.1")
    assert code == 1
    assert dead_controller in err and "FLEET_URL" in err and "Traceback" not in err


def test_rollout_help_explains_the_canary(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(monkeypatch, capsys, "rollout", "--help")
    assert code == 0
    for word in ("--canary", "status", "explain", "promote", "pause", "resume", "abort"):
        assert word in out


def test_keys_init_and_show_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                 tmp_path: object) -> None:
    keys = f"{tmp_path}/keys"
    assert run(monkeypatch, capsys, "keys", "init", "--keys-dir", keys)[0] == 0
    code, out, _ = run(monkeypatch, capsys, "keys", "show", "--keys-dir", keys, "-o", "json")
    assert code == 0
    shown = json.loads(out)
    assert len(shown["keyid"]) == 64 and shown["private"].endswith("release.key")
    code, _, err = run(monkeypatch, capsys, "keys", "init", "--keys-dir", keys)
    assert code == 1 and "already exists" in err
