"""How fast a rollout reaches the fleet: from `POST /api/v1/rollouts` to every device's desired state.

The claim under test (fleet.controller.grpc_service): desired state is pushed, not polled. A
rollout's changes wake exactly the affected devices' Sync streams, so the time from an
operator's `fleet rollout` to the last device holding its new desired state should be a small
multiple of one reconciler pass, not of a polling interval.

What runs, all real:

- a controller process (`fleet controller serve`, SQLite in a temporary `--data-dir`, free ports,
  `--reconcile-interval 0.5`), a release key made by `fleet keys init` and two model versions
  signed and pushed with `fleet models push`, as an operator would;
- an enrolment token with N uses (REST), then N simulated devices in ONE asyncio process, each
  with its own gRPC channel (its own TCP connection): `Enroll`, then a `Sync` stream that sends a
  hello with an empty actual state and records the arrival time of every desired state. A device
  that is told to serve or shadow a version reports it loaded at once (an instant installer), so
  the figures are the control plane's alone: no downloads, no ONNX Runtime.

Measured in one run:

- enrolment rate (devices/s, Enroll calls with bounded concurrency) and time to all connected;
- (a) first deployment of v1 with `steps [1.0]`: per-device latency from just before the POST
  and from the POST's return to the arrival of a desired state serving v1 (p50/p95/max), the
  time until the last device has it, and until the rollout is `Completed` (every device confirmed);
- (b) a canary of v2 with `steps [0.1, 1.0]`: the same for the 10% cohort receiving v2 as shadow,
  with a check that no device outside the cohort received it.

Baseline in the same run: the REST round trip of a cheap read (`GET /api/v1/rollouts`) under the
same load, and the reconcile interval, so the fan-out reads as a multiple of both.

Run: `python benchmarks/bench_rollout_fanout.py` (about 30-60 s on 2 cores with 200 devices);
`--devices N`, `--quick` for a smoke run. Processes are stopped on exit and on Ctrl-C. The last
line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "detector"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    return {"p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
            "max_ms": round(max(ms), 1) if ms else float("nan"), "n": len(ms)}


class Fleet:
    """N simulated devices: arrival times of desired states, keyed by (role, version)."""

    def __init__(self) -> None:
        self.arrivals: dict[tuple[str, str], dict[str, float]] = {}
        self.connected: dict[str, float] = {}
        self.errors: list[str] = []
        self.changed = asyncio.Event()

    def record(self, device: str, role: str, version: str, at: float) -> None:
        seen = self.arrivals.setdefault((role, version), {})
        if device not in seen:
            seen[device] = at
            self.changed.set()

    async def wait_count(self, key: tuple[str, str], count: int, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while len(self.arrivals.get(key, {})) < count:
            if self.errors:
                raise RuntimeError(f"a simulated device failed: {self.errors[0]}")
            left = deadline - time.perf_counter()
            if left <= 0:
                got = len(self.arrivals.get(key, {}))
                raise TimeoutError(f"only {got} of {count} devices received {key[1]} as {key[0]} in {timeout:g}s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(left, 1.0))


class Device:
    def __init__(self, index: int, grpc_addr: str, enroll_addr: str, ca_pem: bytes, fleet: Fleet, *,
                 confirm: bool) -> None:
        self.requested_id = f"sim-{index:04d}"
        self.fleet = fleet
        self.confirm = confirm
        self.grpc_addr, self.enroll_addr, self.ca_pem = grpc_addr, enroll_addr, ca_pem
        self.channel: Any = None
        self.stub: Any = None
        self.device_id = ""
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()

    async def enroll(self, token: str) -> None:
        """As a real agent does: a key made here, a CSR and the token over server TLS, then mutual TLS."""
        import grpc

        from fleet.agent.identity import make_key_and_csr
        from fleet.proto.fleet.v1 import fleet_pb2 as pb
        from fleet.proto.fleet.v1 import fleet_pb2_grpc as pb_grpc

        key_pem, csr_pem = make_key_and_csr(self.requested_id)
        # A local subchannel pool: each simulated device gets its own TCP connection, as real
        # devices would, instead of gRPC multiplexing all of them over one.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(self.enroll_addr, grpc.ssl_channel_credentials(self.ca_pem),
                                           options=options) as channel:
            response = await pb_grpc.AgentServiceStub(channel).Enroll(pb.EnrollRequest(
                token=token, requested_id=self.requested_id, labels={"bench": "fanout"}, csr_pem=csr_pem,
                hardware=pb.HardwareProfile(hardware_class="cpu", arch="x86_64",
                                            execution_providers=["CPUExecutionProvider"], cpu_count=2),
                agent_version="bench"), timeout=60)
        self.device_id = response.device_id
        credentials = grpc.ssl_channel_credentials(self.ca_pem, key_pem, response.certificate_pem)
        self.channel = grpc.aio.secure_channel(self.grpc_addr, credentials, options=options)
        self.stub = pb_grpc.AgentServiceStub(self.channel)

    async def _outgoing(self) -> AsyncIterator[Any]:
        from fleet.proto.fleet.v1 import fleet_pb2 as pb

        yield pb.AgentMessage(hello=pb.Hello(device_id=self.device_id, labels={"bench": "fanout"},
                                             agent_version="bench", state=pb.ActualState()))
        while True:
            message = await self.outbox.get()
            if message is None:
                return
            yield message

    def _report(self, desired: Any) -> Any:
        """The actual state of an instant installer: whatever it was told to run is loaded."""
        from fleet.proto.fleet.v1 import fleet_pb2 as pb

        state = pb.ActualState(desired_generation=desired.generation)
        for assignment in desired.models:
            model = state.models.add(model=assignment.model)
            for role in ("serving", "shadow"):
                if assignment.HasField(role):
                    ref = getattr(assignment, role)
                    model.slots.add(role=role, version=ref.version, sha256=ref.sha256, loaded=True,
                                    execution_providers=["CPUExecutionProvider"])
            model.update.state = "Shadowing" if assignment.HasField("shadow") else "Idle"
            model.update.updated_at_ms = int(time.time() * 1000)
        return pb.AgentMessage(state=state)

    async def sync(self) -> None:
        import grpc

        try:
            call = self.stub.Sync(self._outgoing())
            async for message in call:
                now = time.perf_counter()
                self.fleet.connected.setdefault(self.device_id, now)
                if message.WhichOneof("kind") != "desired":
                    continue
                for assignment in message.desired.models:
                    for role in ("serving", "shadow"):
                        if assignment.HasField(role):
                            self.fleet.record(self.device_id, role, getattr(assignment, role).version, now)
                self.fleet.changed.set()
                if self.confirm:
                    self.outbox.put_nowait(self._report(message.desired))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.fleet.errors.append(f"{self.device_id}: Sync ended {exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        if self.channel is not None:
            await self.channel.close(grace=0.5)


async def _timed_post(http: Any, path: str, body: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    before = time.perf_counter()
    response = await http.post(path, json=body)
    after = time.perf_counter()
    if response.status_code >= 400:
        raise RuntimeError(f"POST {path} refused ({response.status_code}): {response.text}")
    return before, after, dict(response.json())


async def _wait_phase(http: Any, name: str, phases: set[str], timeout: float) -> tuple[float, dict[str, Any]]:
    deadline = time.perf_counter() + timeout
    while True:
        data = (await http.get(f"/api/v1/rollouts/{name}")).json()
        if data.get("phase") in phases:
            return time.perf_counter(), data
        if time.perf_counter() > deadline:
            raise TimeoutError(f"rollout {name} still {data.get('phase')} after {timeout:g}s: {data.get('message')}")
        await asyncio.sleep(0.1)


def _latencies(arrivals: dict[str, float], origin: float) -> list[float]:
    return sorted(t - origin for t in arrivals.values())


async def _simulate(args: argparse.Namespace, controller: Controller, token: str) -> dict[str, Any]:
    import httpx

    from fleet.core.rollout import cohort_size

    fleet = Fleet()
    url = controller.url
    ca_pem = controller.ca_path.read_bytes()
    devices = [Device(i, f"127.0.0.1:{controller.grpc_port}", f"127.0.0.1:{controller.enroll_port}", ca_pem, fleet,
                      confirm=True) for i in range(args.devices)]
    tasks: list[asyncio.Task[None]] = []
    result: dict[str, Any] = {"devices": args.devices, "reconcile_interval_s": args.reconcile_interval}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=controller.auth) as http:
        try:
            # Enrolment with bounded concurrency, each device opening its stream right after.
            gate = asyncio.Semaphore(args.enroll_concurrency)

            async def join(device: Device) -> None:
                async with gate:
                    await device.enroll(token)
                tasks.append(asyncio.create_task(device.sync()))

            started = time.perf_counter()
            await asyncio.gather(*(join(d) for d in devices))
            enroll_s = time.perf_counter() - started
            deadline = time.perf_counter() + args.timeout
            while len(fleet.connected) < args.devices:
                if fleet.errors:
                    raise RuntimeError(fleet.errors[0])
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"only {len(fleet.connected)} of {args.devices} Sync streams opened")
                await asyncio.sleep(0.05)
            connected_s = max(fleet.connected.values()) - started
            result["enrolment"] = {"seconds": round(enroll_s, 2), "devices_per_s": round(args.devices / enroll_s, 1),
                                   "all_connected_s": round(connected_s, 2),
                                   "concurrency": args.enroll_concurrency}
            await asyncio.sleep(1.0)  # let the connect-time reconciler passes settle

            # Baseline: a cheap REST read under the same load.
            reads = []
            for _ in range(20):
                t0 = time.perf_counter()
                (await http.get("/api/v1/rollouts")).raise_for_status()
                reads.append(time.perf_counter() - t0)
            result["baseline_rest_read"] = summary_ms(reads)

            # (a) First deployment of v1 to the whole fleet.
            before, after, _ = await _timed_post(http, "/api/v1/rollouts", {
                "model": MODEL, "version": "v1", "steps": [1.0], "selector": {}})
            await fleet.wait_count(("serving", "v1"), args.devices, args.timeout)
            arrivals = fleet.arrivals[("serving", "v1")]
            # Polled every 0.1 s: `completed_s` is exact to about that.
            completed_at, done = await _wait_phase(http, f"{MODEL}-v1", {"Completed", "RolledBack", "Aborted",
                                                                         "Paused"}, args.timeout)
            if done["phase"] != "Completed":
                raise RuntimeError(f"deployment of v1 ended {done['phase']}: {done.get('message')}")
            result["deploy_v1"] = {
                "post_ms": round((after - before) * 1000, 1),
                "from_post_return": summary_ms(_latencies(arrivals, after)),
                "from_before_post": summary_ms(_latencies(arrivals, before)),
                "last_device_s": round(max(arrivals.values()) - before, 3),
                "completed_s": round(completed_at - before, 3),
            }

            # (b) A canary of v2: the first 10% cohort gets v2 as shadow.
            if args.canary:
                expected = cohort_size(0.1, args.devices)
                before, after, _ = await _timed_post(http, "/api/v1/rollouts", {
                    "model": MODEL, "version": "v2", "steps": [0.1, 1.0], "selector": {},
                    "shadow_sample_rate": 1.0})
                await fleet.wait_count(("shadow", "v2"), expected, args.timeout)
                # Anything more than the cohort arriving in the next moment would be a bug.
                await asyncio.sleep(1.0)
                arrivals = fleet.arrivals[("shadow", "v2")]
                served_v2 = len(fleet.arrivals.get(("serving", "v2"), {}))
                result["canary_v2"] = {
                    "cohort_expected": expected, "cohort_received": len(arrivals), "serving_v2_devices": served_v2,
                    "post_ms": round((after - before) * 1000, 1),
                    "from_post_return": summary_ms(_latencies(arrivals, after)),
                    "from_before_post": summary_ms(_latencies(arrivals, before)),
                    "last_device_s": round(max(arrivals.values()) - before, 3),
                }
                if len(arrivals) != expected or served_v2:
                    raise RuntimeError(f"canary reached {len(arrivals)} devices as shadow (expected {expected}) "
                                       f"and {served_v2} as serving (expected 0)")
            result["sync_errors"] = len(fleet.errors)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
    return result


class Controller:
    """`fleet controller serve` as a child process in its own session, log in the work directory."""

    def __init__(self, work: Path, reconcile_interval: float) -> None:
        from fleet.cli.demo import free_port

        self.work = work
        self.reconcile_interval = reconcile_interval
        self.http_port, self.grpc_port, self.enroll_port = free_port(), free_port(), free_port()
        self.admin_token = secrets.token_urlsafe(32)
        self.auth = {"Authorization": f"Bearer {self.admin_token}"}
        self.ca_path = work / "controller" / "tls" / "ca.pem"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = work / "controller.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from fleet.cli.demo import fleet_cmd

        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                fleet_cmd("controller", "serve", "--data-dir", str(self.work / "controller"),
                          "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                          "--grpc-enroll-port", str(self.enroll_port),
                          "--reconcile-interval", str(self.reconcile_interval), "--log-level", "warning"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "FLEET_ADMIN_TOKEN": self.admin_token})

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"the controller exited with code {code}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the controller did not become ready in {timeout:g} s")
            time.sleep(0.2)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # A second Ctrl-C must not cut this short and leave the controller running.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:] if self.log.exists() else []
        return "\n  ".join(text)


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx

    from fleet.cli.demo import fleet_cmd
    from fleet.core import synthetic_models as sm

    keys = work / "keys"
    # Made before anything starts, so that an interrupt at any point finds it to stop.
    controller = Controller(work, args.reconcile_interval)

    def fleet(*cli_args: str) -> None:
        env = {**os.environ, "FLEET_KEYS_DIR": str(keys), "FLEET_URL": controller.url,
               "FLEET_TOKEN": controller.admin_token}
        proc = subprocess.run(fleet_cmd(*cli_args), capture_output=True, text=True, env=env, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"fleet {' '.join(cli_args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    try:
        fleet("keys", "init", "--keys-dir", str(keys))
        controller.start()
        controller.wait_ready(60)
        models = work / "models"
        models.mkdir()
        for version, seed in (("v1", 1), ("v2", 2)):
            path = models / f"{MODEL}-{version}.onnx"
            path.write_bytes(sm.classifier(seed))
            fleet("models", "push", f"{MODEL}:{version}", str(path), "--task", "classification",
                  "--keys-dir", str(keys), "--controller", controller.url)
        response = httpx.post(controller.url + "/api/v1/enrollment-tokens",
                              json={"max_uses": args.devices, "ttl_seconds": 3600, "labels": {}}, timeout=30,
                              headers=controller.auth)
        response.raise_for_status()
        token = response.json()["token"]
        return asyncio.run(_simulate(args, controller, token))
    except BaseException:
        print("controller log (last lines):\n  " + controller.log_tail(), file=sys.stderr)
        raise
    finally:
        controller.stop()


def _print_table(res: dict[str, Any]) -> None:
    enrol = res["enrolment"]
    base = res["baseline_rest_read"]
    print(f"rollout fan-out: {res['devices']} simulated devices (one process, real gRPC), reconcile interval "
          f"{res['reconcile_interval_s']:g} s")
    print(f"enrolment: {enrol['devices_per_s']:.1f} devices/s ({enrol['seconds']:.2f} s, concurrency "
          f"{enrol['concurrency']}), all Sync streams open after {enrol['all_connected_s']:.2f} s; "
          f"baseline REST read p50 {base['p50_ms']:.1f} ms")
    header = f"{'phase':<26} {'devices':>7} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'last s':>7} {'done s':>7}"
    print(header)
    print("-" * len(header))
    rows = [("deploy v1 [1.0]", res.get("deploy_v1")), ("canary v2 [0.1,1.0] shadow", res.get("canary_v2"))]
    for label, data in rows:
        if not data:
            continue
        lat = data["from_post_return"]
        done = f"{data['completed_s']:.2f}" if "completed_s" in data else "-"
        print(f"{label:<26} {lat['n']:>7} {lat['p50_ms']:>8.1f} {lat['p95_ms']:>8.1f} {lat['max_ms']:>8.1f} "
              f"{data['last_device_s']:>7.2f} {done:>7}")
    print("latencies from the POST's return to the desired state's arrival on each device; "
          "last s / done s: from just before the POST to the last arrival / to the rollout Completed.")


def _interrupt(signum: int, frame: Any) -> None:
    # SIGTERM (a CI runner, `kill`) unwinds like Ctrl-C, so the controller is stopped too.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, default=200, help="simulated devices")
    parser.add_argument("--enroll-concurrency", type=int, default=16, help="Enroll calls in flight at once")
    parser.add_argument("--reconcile-interval", type=float, default=0.5, help="controller --reconcile-interval (s)")
    parser.add_argument("--no-canary", dest="canary", action="store_false", help="skip the v2 canary phase")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds allowed for each phase")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the controller's data and logs")
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests (5 devices)")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices = 5
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    try:
        res = _run(args, work)
    except KeyboardInterrupt:
        print("interrupted: the controller was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_workdir:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    _print_table(res)
    print("RESULT " + json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
