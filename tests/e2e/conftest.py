"""Real processes for end-to-end scenarios: a controller and agents, driven through the CLI.

Given/When/Then helpers: `FleetWorld` starts `fleet controller serve` and `fleet agent run`
processes (the same way `fleet demo` does), runs `fleet ...` commands as subprocesses and
reads their `-o json` output, and calls agents' inference endpoints with stock tritonclient.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.cli.demo import Cluster, fleet_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class FleetWorld:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cluster = Cluster(workdir, devices=0)
        self.keys = workdir / "keys"
        self.models = workdir / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self.root = workdir / "root.json"
        self.token: str | None = None
        # Where agents reach the controller's REST URL (metadata, bundles): the controller, or a proxy.
        self.agent_url: str | None = None

    @property
    def auth(self) -> dict[str, str]:
        """Headers for direct REST calls: the admin token the controller was started with."""
        return {"Authorization": f"Bearer {self.cluster.admin_token}"}

    # -- processes ------------------------------------------------------------------------

    def start(self) -> None:
        self.fleet("keys", "init", "--keys-dir", str(self.keys))
        self.cluster.start_controller()
        self.wait("controller ready", lambda: self.fleet_ok("models", "ls", "-o", "json"), 60)

    def fleet(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(fleet_cmd(*args), capture_output=True, text=True, env=self.cluster.env, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"fleet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def fleet_ok(self, *args: str) -> bool:
        return self.fleet(*args, check=False).returncode == 0

    def json(self, *args: str) -> Any:
        return json.loads(self.fleet(*args, "-o", "json").stdout)

    def push(self, ref: str, blob: bytes, task: str = "generic") -> None:
        path = self.models / (ref.replace(":", "-") + ".onnx")
        path.write_bytes(blob)
        self.fleet("models", "push", ref, str(path), "--task", task, "--keys-dir", str(self.keys))

    def add_agents(self, count: int, *, traffic: bool = True, labels: dict[str, str] | None = None,
                   extra_env: dict[str, str] | None = None, first_index: int = 0,
                   traffic_rate: float = 30.0) -> list[str]:
        if not self.root.exists():
            self.fleet("keys", "export-root", "--out", str(self.root), "--keys-dir", str(self.keys))
        token = self.json("tokens", "create", "--uses", str(count), "--ttl", "1h")["token"]
        ids = []
        for i in range(first_index, first_index + count):
            ids.append(self.start_agent(i, token, traffic=traffic, labels=labels, extra_env=extra_env,
                                        traffic_rate=traffic_rate))
        self.wait(f"{count} agents connected",
                  lambda: all(self.device(d).get("connected") for d in ids), 90)
        return ids

    def start_agent(self, index: int, token: str | None, *, traffic: bool = True,
                    labels: dict[str, str] | None = None, extra_env: dict[str, str] | None = None,
                    traffic_rate: float = 30.0) -> str:
        device_id = f"cam-{index:02d}"
        args = ["agent", "run", "--data-dir", str(self.workdir / "agents" / device_id),
                "--controller-grpc", f"127.0.0.1:{self.cluster.grpc_port}",
                "--controller-url", self.agent_url or self.cluster.url,
                "--trust-root", str(self.root), "--device-id", device_id, "--inference-addr", "127.0.0.1:0",
                "--metrics-addr", "127.0.0.1:0", *self.cluster.agent_tls_args()]
        if token:
            args += ["--token", token]
        for key, value in (labels or {"site": "lab"}).items():
            args += ["--label", f"{key}={value}"]
        if traffic:
            args += ["--traffic", "synthetic", "--traffic-rate", f"{traffic_rate:g}"]
        env_backup = self.cluster.env
        if extra_env:
            self.cluster.env = {**env_backup, **extra_env}
        try:
            self.cluster._spawn(device_id, fleet_cmd(*args))
        finally:
            self.cluster.env = env_backup
        return device_id

    def inference_port(self, device_id: str) -> int:
        path = self.workdir / "agents" / device_id / "endpoint.json"
        self.wait(f"{device_id} endpoint", path.exists, 30)
        return int(json.loads(path.read_text())["inference_port"])

    def stop(self) -> None:
        self.cluster.stop()

    # -- observations ---------------------------------------------------------------------

    def device(self, device_id: str) -> dict[str, Any]:
        return self.json("devices", "show", device_id)

    def serving(self, device_id: str, model: str) -> str | None:
        for entry in (self.device(device_id).get("actual") or {}).get("models", []):
            if entry["model"] == model:
                for slot in entry.get("slots", []):
                    if slot.get("role") == "serving" and slot.get("loaded"):
                        return str(slot["version"])
        return None

    def update_status(self, device_id: str, model: str) -> dict[str, Any]:
        for entry in (self.device(device_id).get("actual") or {}).get("models", []):
            if entry["model"] == model:
                return dict(entry.get("update") or {})
        return {}

    def rollout(self, name: str) -> dict[str, Any]:
        return self.json("rollout", "status", name)

    def wait_rollout(self, name: str, timeout: float = 120) -> dict[str, Any]:
        return self.wait(f"rollout {name} to finish",
                         lambda: (r := self.rollout(name))["phase"] in ("Completed", "RolledBack", "Aborted", "Paused")
                         and r, timeout)

    def wait(self, what: str, check: Callable[[], Any], timeout: float, every: float = 0.5,
             check_alive: bool = True) -> Any:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if check_alive:
                self.cluster.check_alive()
            try:
                result = check()
                if result:
                    return result
            except (AssertionError, json.JSONDecodeError, KeyError) as exc:
                last_error = exc
            time.sleep(every)
        logs = self.workdir / "logs"
        tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-20:])
                          for p in sorted(logs.glob("*.log")))
        raise AssertionError(f"timed out waiting for {what} (last error: {last_error})\n{tails}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetWorld]:
    w = FleetWorld(tmp_path_factory.mktemp("fleet"))
    w.start()
    try:
        yield w
    finally:
        w.stop()
