"""`fleet demo`: the whole loop on one machine, with real processes.

It starts a controller (SQLite, local artifacts) and several agent processes, builds three real
ONNX classifiers (v1; a good v2 that agrees with v1; a bad v3 whose answers diverge), signs and
pushes them with a fresh release key, deploys v1, rolls out v2 through a shadowed canary to
every device, then rolls out v3 and watches the fleet roll it back by itself. It exits 0 only
when the controller's own records show that story: v2 Completed and served by every device, v3
RolledBack by the engine with a failed gate, and every device serving v2 again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fleet.cli.client import Client, CliError, console, gate_table

MODEL = "detector"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fleet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet.cli.main", *args]


class Cluster:
    """A controller and N agents as child processes, logs in the work directory."""

    def __init__(self, workdir: Path, devices: int) -> None:
        self.workdir = workdir
        self.devices = devices
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.grpc_enroll_port = free_port()
        # Made by the controller on its first start; agents pin it to authenticate the controller.
        self.ca_cert = workdir / "controller" / "tls" / "ca.pem"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # The controller stores this admin token (hashed) at start; CLI calls present it.
        self.admin_token = secrets.token_urlsafe(32)
        self.env = {**os.environ, "FLEET_KEYS_DIR": str(workdir / "keys"), "FLEET_URL": self.url,
                    "PYTHONUNBUFFERED": "1", "FLEET_TOKEN": self.admin_token}

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                                            start_new_session=True)

    def client(self) -> Client:
        return Client(self.url, token=self.admin_token)

    def start_controller(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._spawn("controller", fleet_cmd(
            "controller", "serve", "--data-dir", str(self.workdir / "controller"),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--grpc-enroll-port", str(self.grpc_enroll_port), "--reconcile-interval", "0.5"),
            env={**self.env, "FLEET_ADMIN_TOKEN": self.admin_token})

    def agent_tls_args(self) -> list[str]:
        """How an agent finds and authenticates the controller: its CA and the enrolment port."""
        return ["--ca-cert", str(self.ca_cert), "--controller-enroll", f"127.0.0.1:{self.grpc_enroll_port}"]

    def start_agent(self, index: int, token: str, trust_root: Path) -> None:
        site = "north" if index % 2 == 0 else "south"
        self._spawn(f"cam-{index:02d}", fleet_cmd(
            "agent", "run", "--data-dir", str(self.workdir / "agents" / f"cam-{index:02d}"),
            "--controller-grpc", f"127.0.0.1:{self.grpc_port}", "--controller-url", self.url,
            "--trust-root", str(trust_root), "--token", token, "--device-id", f"cam-{index:02d}",
            "--label", f"site={site}", "--label", "kind=camera", "--inference-addr", "127.0.0.1:0",
            "--metrics-addr", "127.0.0.1:0",
            "--traffic", "synthetic", "--traffic-rate", "25", *self.agent_tls_args()))

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.workdir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
                raise CliError(f"{name} exited with code {proc.returncode}; last log lines:\n  " + "\n  ".join(tail))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for(what: str, check: Callable[[], Any], timeout: float, cluster: Cluster, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        cluster.check_alive()
        with contextlib.suppress(CliError):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise CliError(f"timed out waiting for {what}")
        time.sleep(every)


def serving_versions(client: Client) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for device in client.get("/api/v1/devices"):
        version = None
        for model in (device.get("actual") or {}).get("models", []):
            if model.get("model") == MODEL:
                slot = next((s for s in model.get("slots", []) if s.get("role") == "serving" and s.get("loaded")), None)
                version = slot.get("version") if slot else None
        out[device["id"]] = version
    return out


def follow(client: Client, cluster: Cluster, name: str, timeout: float) -> dict[str, Any]:
    """Print each change of phase, step and gate verdict until the rollout finishes."""
    last = None
    deadline = time.monotonic() + timeout
    while True:
        cluster.check_alive()
        data = client.get(f"/api/v1/rollouts/{name}")
        analysis = data.get("analysis") or {}
        samples = next((r.get("value") for r in analysis.get("metrics", []) if r.get("metric") == "samples"), None)
        key = (data["phase"], data.get("step_index"), data.get("step_phase"), analysis.get("verdict"))
        if key != last:
            steps = data.get("steps", [])
            idx = data.get("step_index", 0)
            pct = f"{steps[idx] * 100:g}%" if idx < len(steps) else ""
            console.print(f"  [dim]{time.strftime('%H:%M:%S')}[/] {name}: {data['phase']} step {idx + 1}/{len(steps)} "
                          f"({pct}) {data.get('step_phase', '')} gate={analysis.get('verdict', '-')}"
                          + (f" samples={samples}" if samples is not None else ""))
            last = key
        if data["phase"] in ("Completed", "RolledBack", "Aborted", "Paused"):
            return data
        if time.monotonic() > deadline:
            raise CliError(f"rollout {name} did not finish in time (phase {data['phase']})")
        time.sleep(0.5)


def print_decisions(data: dict[str, Any]) -> None:
    console.print(f"[bold]{data.get('name') or data.get('id')}[/] ended [bold]{data['phase']}[/]")
    for decision in data.get("decisions", []):
        console.print(f"  - step {decision.get('step_index', 0) + 1} {decision.get('kind')} "
                      f"{decision.get('verdict') or ''} ({decision.get('actor')}): {decision.get('reason')}")
        metrics = decision.get("metrics") or {}
        rows = metrics.get("metrics", []) if isinstance(metrics, dict) else []
        if rows and decision.get("verdict") != "Inconclusive":
            gate_table(rows, detail=False)


@contextlib.contextmanager
def work_directory(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    path = Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_demo(devices: int = 8, workdir: Path | None = None, timeout: float = 300.0) -> int:
    from fleet.core import synthetic_models as sm

    if devices < 2:
        raise CliError("the demo needs at least 2 devices (one canary, one more)", code=2)
    started = time.monotonic()
    with work_directory(workdir) as work:
        cluster = Cluster(work, devices)
        console.print(f"[bold]fleet demo[/]: {devices} devices, state in {work}")
        try:
            return _story(cluster, sm, started, timeout)
        finally:
            cluster.stop()


def _story(cluster: Cluster, sm: Any, started: float, timeout: float) -> int:
    work = cluster.workdir
    env_keys = work / "keys"
    console.print("1. release key, controller, three signed model versions")
    subprocess.run(fleet_cmd("keys", "init", "--keys-dir", str(env_keys)), check=True, env=cluster.env,
                   stdout=subprocess.DEVNULL)
    cluster.start_controller()
    client = cluster.client()
    wait_for("the controller", lambda: client.get("/readyz") is not None, 60, cluster)
    models_dir = work / "models"
    models_dir.mkdir(exist_ok=True)
    builds = {"v1": sm.classifier(1), "v2": sm.classifier(2), "v3": sm.classifier(3, divergent=True)}
    for version, blob in builds.items():
        path = models_dir / f"{MODEL}-{version}.onnx"
        path.write_bytes(blob)
        subprocess.run(fleet_cmd("models", "push", f"{MODEL}:{version}", str(path), "--task", "classification",
                                 "--keys-dir", str(env_keys), "--controller", cluster.url),
                       check=True, env=cluster.env, stdout=subprocess.DEVNULL)
        console.print(f"   pushed {MODEL}:{version} (signed on this machine; the controller holds no release key)")
    root = work / "root.json"
    subprocess.run(fleet_cmd("keys", "export-root", "--out", str(root), "--keys-dir", str(env_keys),
                             "--controller", cluster.url), check=True, env=cluster.env, stdout=subprocess.DEVNULL)

    console.print(f"2. {cluster.devices} agents enrol over TLS (bounded-use token, CSR), then sync over mutual TLS")
    token = client.post("/api/v1/enrollment-tokens", json={"max_uses": cluster.devices, "ttl_seconds": 3600,
                                                           "labels": {}})["token"]
    for index in range(cluster.devices):
        cluster.start_agent(index, token, root)
    wait_for("every device to connect",
             lambda: sum(1 for d in client.get("/api/v1/devices") if d.get("connected")) >= cluster.devices,
             90, cluster)

    def remaining() -> float:
        return max(30.0, timeout - (time.monotonic() - started))

    console.print(f"3. deploy {MODEL}:v1 to the whole fleet")
    client.post("/api/v1/rollouts", json={"model": MODEL, "version": "v1", "steps": [1.0], "selector": {}})
    first = follow(client, cluster, f"{MODEL}-v1", remaining())
    if first["phase"] != "Completed":
        raise CliError(f"initial deployment ended {first['phase']}: {first.get('message')}")
    wait_for("every device to serve v1", lambda: set(serving_versions(client).values()) == {"v1"}, remaining(), cluster)

    gate = {"min_samples": 150, "analysis_deadline_s": 120}
    console.print(f"4. roll out {MODEL}:v2 (a good model): canary 25% in shadow, gate, then 100%")
    client.post("/api/v1/rollouts", json={"model": MODEL, "version": "v2", "steps": [0.25, 1.0], "selector": {},
                                          "gate": gate, "shadow_sample_rate": 1.0})
    good = follow(client, cluster, f"{MODEL}-v2", remaining())
    wait_for("every device to serve v2", lambda: set(serving_versions(client).values()) == {"v2"}, remaining(), cluster)

    console.print(f"5. roll out {MODEL}:v3 (a bad model: its answers diverge): the fleet should roll it back")
    client.post("/api/v1/rollouts", json={"model": MODEL, "version": "v3", "steps": [0.25, 1.0], "selector": {},
                                          "gate": gate, "shadow_sample_rate": 1.0})
    bad = follow(client, cluster, f"{MODEL}-v3", remaining())
    wait_for("every device to serve v2 after the rollback",
             lambda: set(serving_versions(client).values()) == {"v2"}, remaining(), cluster)

    console.print("\n[bold]Decisions[/]")
    good = client.get(f"/api/v1/rollouts/{MODEL}-v2")
    bad = client.get(f"/api/v1/rollouts/{MODEL}-v3")
    print_decisions(good)
    print_decisions(bad)
    story_ok = (
        good["phase"] == "Completed"
        and any(d.get("kind") == "gate" and d.get("verdict") == "Pass" and d.get("actor") == "engine"
                for d in good.get("decisions", []))
        and bad["phase"] == "RolledBack"
        and any(d.get("kind") == "gate" and d.get("verdict") == "Fail" and d.get("actor") == "engine"
                for d in bad.get("decisions", []))
        and set(serving_versions(client).values()) == {"v2"}
    )
    elapsed = time.monotonic() - started
    if story_ok:
        console.print(f"\n[green]demo complete[/] in {elapsed:.0f}s: v2 promoted on evidence, "
                      f"v3 rolled back by itself, all {cluster.devices} devices serve v2")
        return 0
    console.print(f"\n[red]demo failed[/]: v2 {good['phase']}, v3 {bad['phase']}; logs in {work / 'logs'}")
    return 1
