"""`fleet keys` against a real controller over HTTP: thresholds, key changes, policies, and a device following them.

Given a controller (the REST app under uvicorn on a free port) and an operator's key directory,
when the operator runs `fleet keys ...` the controller's root changes version by version, and a
device's metadata client provisioned with root v1 follows every change and still verifies the
signed bundles; an under-signed root change is refused before it is uploaded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from fleet.agent.trust import TrustedMetadataClient
from fleet.cli.main import main
from fleet.controller.access import admin_headers
from fleet.controller.app import create_app
from fleet.controller.context import build_context
from fleet.controller.settings import ControllerSettings
from fleet.core import synthetic_models

MODEL = "det"


class Controller:
    def __init__(self, data_dir: Path) -> None:
        self.ctx = build_context(ControllerSettings(data_dir=data_dir))
        config = uvicorn.Config(create_app(self.ctx), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "controller did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.auth = admin_headers(self.ctx)

    def root(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/tuf/root.json").json()["signed"])

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.ctx.close()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(tmp_path / "controller")
    yield ctl
    ctl.close()


class Operator:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], keys: Path,
                 url: str, auth: dict[str, str]) -> None:
        self.monkeypatch, self.capsys, self.keys = monkeypatch, capsys, keys
        monkeypatch.setenv("FLEET_URL", url)
        monkeypatch.setenv("FLEET_TOKEN", auth["Authorization"].removeprefix("Bearer "))
        monkeypatch.setenv("FLEET_KEYS_DIR", str(keys))

    def run(self, *args: str) -> tuple[int, str, str]:
        self.monkeypatch.setattr("sys.argv", ["fleet", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *args: str) -> Any:
        code, out, err = self.run(*args)
        assert code == 0, f"fleet {' '.join(args)} failed ({code}): {out}\n{err}"
        return json.loads(out) if "-o" in args else out

    def push(self, version: str, *extra: str, release: int = 0) -> None:
        model = self.keys.parent / f"{version}.onnx"
        model.write_bytes(synthetic_models.classifier(int(version[1:]), input_shape=(-1, 3, 8, 8), channels=4))
        self.ok("models", "push", f"{MODEL}:{version}", str(model), "--release", str(release), *extra)


def device_sees(controller: Controller, root_v1: bytes, where: Path, *versions: str) -> TrustedMetadataClient:
    client = TrustedMetadataClient(where, controller.url + "/tuf/", root_v1, max_age_s=0)
    client.refresh()
    for version in versions:
        length, _, custom = client.target_info(f"{MODEL}/{version}/bundle.tar")
        assert length > 0 and custom["version"] == version
    return client


def test_thresholds_key_changes_and_a_device_that_follows_them(
    controller: Controller, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    op = Operator(monkeypatch, capsys, tmp_path / "keys", controller.url, controller.auth)
    made = op.ok("keys", "init", "--root-keys", "3", "--root-threshold", "2", "--targets-keys", "2",
                 "--targets-threshold", "1", "-o", "json")
    assert [k["name"] for k in made["keys"]] == ["root-1", "root-2", "root-3", "targets-1", "targets-2"]
    assert oct((op.keys / "root-1.key").stat().st_mode & 0o777) == "0o600"
    root = controller.root()
    assert root["version"] == 1 and root["roles"]["root"]["threshold"] == 2
    assert len(root["roles"]["targets"]["keyids"]) == 2
    root_v1 = (op.keys / "root.json").read_bytes()

    listing = op.ok("keys", "ls", "-o", "json")
    roles = {k["name"]: k["roles"] for k in listing["keys"]}
    assert roles == {"root-1": ["root"], "root-2": ["root"], "root-3": ["root"], "targets-1": ["targets"],
                     "targets-2": ["targets"]}
    assert listing["root_version"] == 1 and listing["root_source"] == "controller"

    # Either targets key signs alone (1-of-2).
    op.push("v1", "--key", "targets-2")
    device_sees(controller, root_v1, tmp_path / "device", "v1")

    # A new targets key, then 2-of-3 targets: the published targets are re-signed each time.
    op.ok("keys", "create", "ops2")
    added = op.ok("keys", "add", "ops2", "--role", "targets", "-o", "json")
    assert added["version"] == 2 and added["targets_version"] is not None
    assert sorted(added["signed_by"]) == ["root-1", "root-2", "root-3"]
    raised = op.ok("keys", "threshold", "2", "--role", "targets", "--sign-with", "root-1", "--sign-with", "root-3",
                   "-o", "json")
    assert raised["version"] == 3 and raised["roles"]["targets"]["threshold"] == 2
    assert raised["signed_by"] == ["root-1", "root-3"]
    device = device_sees(controller, root_v1, tmp_path / "device", "v1")

    # One targets key is no longer enough; two are.
    code, _, err = op.run("models", "push", f"{MODEL}:v2", str(op.keys.parent / "v1.onnx"), "--key", "targets-1")
    assert code == 1 and "targets need 2 signatures" in err
    op.push("v2", "--key", "targets-1", "--key", "ops2")

    # Revoke a targets key by name: it no longer signs, the others carry on.
    revoked = op.ok("keys", "revoke", "targets-1", "--role", "targets", "-o", "json")
    assert revoked["version"] == 4
    code, _, err = op.run("models", "push", f"{MODEL}:v3", str(op.keys.parent / "v1.onnx"), "--key", "targets-1",
                          "--key", "ops2")
    assert code == 1 and "not a targets key of root v4" in err
    op.push("v3")  # default: every local targets key of the current root
    device.refresh()
    assert device.target_info(f"{MODEL}/v3/bundle.tar")[0] > 0
    device_sees(controller, root_v1, tmp_path / "fresh-device", "v1", "v2", "v3")

    # An under-signed root change is refused here, and nothing is uploaded.
    code, _, err = op.run("keys", "threshold", "3", "--role", "root", "--sign-with", "root-1")
    assert code == 1
    assert "refusing to upload" in err and "1 of the 2 required signatures by root v4" in err
    assert controller.root()["version"] == 4
    code, _, err = op.run("keys", "threshold", "4", "--role", "root")
    assert code == 2 and "root threshold 4 must be between 1 and the number of root keys (3)" in err

    listing = op.ok("keys", "ls", "-o", "json")
    roles = {k["name"]: k["roles"] for k in listing["keys"]}
    assert roles["targets-1"] == [] and roles["ops2"] == ["targets"] and listing["root_version"] == 4


def test_signed_minimum_release_gates_rollouts(
    controller: Controller, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    op = Operator(monkeypatch, capsys, tmp_path / "keys", controller.url, controller.auth)
    op.ok("keys", "init")
    op.push("v1", release=1)
    op.push("v2", release=2)
    assert op.ok("models", "policy", MODEL, "--min-release", "2", "-o", "json")["min_release"] == 2
    targets = httpx.get(f"{controller.url}/api/v1/trust/targets", headers=controller.auth).json()["signed"]["targets"]
    assert targets[f"{MODEL}/policy.json"]["custom"] == {"model": MODEL, "min_release": 2}

    code, _, err = op.run("rollout", f"{MODEL}:v1", "--canary", "50%")
    assert code == 1 and "409" in err and "below the signed minimum release 2" in err
    rollout = op.ok("rollout", f"{MODEL}:v2", "--canary", "50%", "-o", "json")
    assert rollout["version"] == "v2"
    op.ok("rollout", "abort", rollout["name"], "-o", "json")

    # `--min-release` on the rollout signs the policy first, then creates the rollout.
    op.push("v3", release=3)
    code, _, err = op.run("rollout", f"{MODEL}:v2", "--min-release", "3")
    assert code == 1 and "below the signed minimum release 3" in err
    assert op.ok("rollout", f"{MODEL}:v3", "--min-release", "3", "-o", "json")["version"] == "v3"

    device = TrustedMetadataClient(tmp_path / "device", controller.url + "/tuf/",
                                   (op.keys / "root.json").read_bytes(), max_age_s=0)
    device.refresh()
    assert device.min_release(MODEL) == 3 and device.min_release("other") == 0


def test_keys_help_explains_each_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    op = Operator(monkeypatch, capsys, tmp_path / "keys", "http://127.0.0.1:9", {"Authorization": "Bearer x"})
    out = op.ok("keys", "--help")
    for word in ("init", "create", "ls", "add", "revoke", "threshold", "rotate-root", "export-root"):
        assert word in out
    assert "--sign-with" in op.ok("keys", "rotate-root", "--help")
    assert "--min-release" in op.ok("models", "policy", "--help")
    code, _, err = op.run("keys", "create", "bad.name")
    assert code == 2 and "no dots" in err
