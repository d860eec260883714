"""The agent process: enrol, hold the Sync stream, apply desired state, serve, report.

Rules this module keeps:
- the device keeps serving from its last known desired state while the controller is away:
  desired state is persisted on arrival and re-applied at start-up before any connection;
- the Sync stream reconnects with capped exponential backoff and jitter;
- telemetry is written to a bounded on-disk spool first and deleted only once the controller
  acknowledges it, so an outage loses nothing but the oldest batches beyond the bound;
- updates of one model never block another model or the inference endpoint;
- the device's identity is a client certificate over a key made here (`fleet.agent.identity`):
  it enrols over server-authenticated TLS on the enrolment port, then speaks only mutual TLS to
  the device port, renews at two thirds of the certificate's life with a new key and reconnects
  with it; an expired certificate (or none) stops syncing, with a clear message, never serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
from prometheus_client import start_http_server

from fleet.agent.atomic import read_json, write_json_atomic
from fleet.agent.hardware import choose_providers, detect_hardware
from fleet.agent.identity import CredentialStore, DeviceCredentials, make_key_and_csr
from fleet.agent.inference import ModelHost, bound_port, start_inference_server
from fleet.agent.metrics import AgentMetrics
from fleet.agent.slots import ModelStore
from fleet.agent.traffic import TrafficSource
from fleet.agent.trust import TrustedMetadataClient
from fleet.agent.updater import ModelUpdater
from fleet.core.errors import FleetError
from fleet.proto import convert
from fleet.proto.fleet.v1 import fleet_pb2 as pb
from fleet.proto.fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
AGENT_VERSION = "0.1.0"
GRPC_MAX_MESSAGE = 16 * 1024 * 1024
DEFAULT_ENROLL_PORT = 50052
# A failed renewal is retried after this long (doubling), well before the certificate runs out.
RENEW_RETRY_S = (5.0, 300.0)


@dataclass
class AgentConfig:
    data_dir: Path
    controller_grpc: str = "127.0.0.1:50051"
    controller_url: str = "http://127.0.0.1:8080"
    trust_root: Path | None = None
    # The controller's CA (PEM), provisioned with the device: it authenticates the controller
    # at enrolment. After enrolment the agent keeps its own copy under <data_dir>/tls/ca.pem.
    ca_cert: Path | None = None
    # Enrolment address (server-authenticated TLS); default: controller_grpc's host, port 50052.
    controller_enroll: str | None = None
    # Name to check the controller's certificate against when the address is not one of its names.
    tls_server_name: str | None = None
    enroll_token: str | None = None
    device_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    hardware_class: str | None = None
    inference_addr: str = "127.0.0.1:8001"
    metrics_addr: str = "127.0.0.1:9101"  # Prometheus exposition; "" turns it off, port 0 picks one
    threads: int = 1
    telemetry_interval_s: float = 2.0
    spool_max_batches: int = 2000
    traffic: str | None = None  # "synthetic", a folder of .npy files, or None
    traffic_rate: float = 20.0
    traffic_model: str | None = None


class TelemetrySpool:
    """Batches on disk, oldest first, bounded; a batch is deleted once acknowledged."""

    def __init__(self, directory: Path, max_batches: int) -> None:
        self.directory = directory
        self.max_batches = max_batches
        directory.mkdir(parents=True, exist_ok=True)
        self.dropped = 0
        seqs = self.pending()
        state = read_json(directory / "seq.json", {"next": 1})
        self._next = max([int(state.get("next", 1)), *(s + 1 for s in seqs)])

    def pending(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*.json") if p.stem.isdigit())

    def add(self, windows: list[dict[str, Any]], events: list[dict[str, Any]], start_ms: int, end_ms: int) -> int:
        seq = self._next
        self._next += 1
        write_json_atomic(self.directory / "seq.json", {"next": self._next})
        batch = {"seq": seq, "window_start_ms": start_ms, "window_end_ms": end_ms, "windows": windows,
                 "events": events}
        write_json_atomic(self.directory / f"{seq}.json", batch)
        pending = self.pending()
        for old in pending[: max(0, len(pending) - self.max_batches)]:
            (self.directory / f"{old}.json").unlink(missing_ok=True)
            self.dropped += 1
        return seq

    def load(self, limit: int) -> list[dict[str, Any]]:
        out = []
        for seq in self.pending()[:limit]:
            try:
                out.append(json.loads((self.directory / f"{seq}.json").read_text()))
            except (OSError, ValueError):
                log.warning("dropping unreadable telemetry batch %s", seq)
                (self.directory / f"{seq}.json").unlink(missing_ok=True)
        return out

    def ack(self, seqs: list[int]) -> None:
        for seq in seqs:
            (self.directory / f"{seq}.json").unlink(missing_ok=True)


class ModelWorker:
    """Applies the newest assignment of one model; a newer one waits for the current apply."""

    def __init__(self, updater: ModelUpdater) -> None:
        self.updater = updater
        self._pending: dict[str, Any] | None = None
        self._has_pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, assignment: dict[str, Any] | None) -> None:
        self._pending = assignment
        self._has_pending.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"update-{self.updater.model}")

    async def _run(self) -> None:
        while True:
            await self._has_pending.wait()
            self._has_pending.clear()
            assignment = self._pending
            try:
                await self.updater.apply(assignment)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("update of %s failed unexpectedly", self.updater.model)
                await asyncio.sleep(1.0)
            retry_in = self.updater.next_retry_in()
            if retry_in is not None and not self._has_pending.is_set():
                # A failed target is tried again after the updater's backoff, unless a newer
                # desired state arrives first (which resets the backoff).
                self._schedule_retry(assignment, retry_in)

    def _schedule_retry(self, assignment: dict[str, Any] | None, delay: float) -> None:
        def retry() -> None:
            if not self._has_pending.is_set() and self._pending is assignment:
                self._has_pending.set()

        asyncio.get_running_loop().call_later(max(0.5, delay), retry)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.hardware = detect_hardware(config.hardware_class)
        self.providers = choose_providers(self.hardware)
        # Learned drift profiles persist here, so a restart does not start learning again.
        self.host = ModelHost(profile_dir=self.data_dir / "profiles")
        self.store = ModelStore(self.data_dir)
        self.spool = TelemetrySpool(self.data_dir / "spool", config.spool_max_batches)
        self.credentials = CredentialStore(self.data_dir)
        self.creds: DeviceCredentials | None = self.credentials.load()
        self.ca_pem: bytes | None = config.ca_cert.read_bytes() if config.ca_cert else self.credentials.load_ca()
        self.creds_changed = asyncio.Event()
        self.identity: dict[str, str] = read_json(self.data_dir / "identity.json", {})
        self.http = httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), follow_redirects=True,
                                 verify=self._http_verify(),
                                 event_hooks={"request": [self._device_credentials]})
        self.trust = self._trust_client()
        self.updaters: dict[str, ModelUpdater] = {}
        self.workers: dict[str, ModelWorker] = {}
        self.desired: dict[str, Any] = read_json(self.data_dir / "desired.json", {})
        self.events: list[dict[str, Any]] = []
        self.state_changed = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.connected = False
        self.inference_port: int | None = None
        self.metrics = AgentMetrics(updates=lambda: {m: u.status() for m, u in list(self.updaters.items())})
        self.metrics_port: int | None = None
        self.traffic: dict[str, TrafficSource] = {}
        self._window_start_ms = int(time.time() * 1000)

    def _trust_client(self) -> TrustedMetadataClient:
        root = self.config.trust_root
        cached = self.data_dir / "tuf" / "root.json"
        if root is None and not cached.exists():
            raise FleetError(
                "the agent needs the release root metadata it should trust: pass --trust-root root.json "
                "(made by `fleet keys init` on the operator's machine) or set FLEET_TRUST_ROOT"
            )
        trusted = root.read_bytes() if root is not None else cached.read_bytes()
        return TrustedMetadataClient(
            metadata_dir=self.data_dir / "tuf",
            metadata_url=self.config.controller_url.rstrip("/") + "/tuf/",
            trusted_root=trusted,
            client=self.http,
        )

    def _http_verify(self) -> ssl.SSLContext | bool:
        """HTTPS to the controller is checked against its CA when the agent has it."""
        if self.config.controller_url.startswith("https://") and self.ca_pem:
            return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        return True

    # -- identity -------------------------------------------------------------------------

    def _grpc_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if self.config.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.config.tls_server_name))
        return options

    def _require_ca(self) -> bytes:
        if not self.ca_pem:
            raise FleetError(
                "the agent needs the controller's CA certificate to connect: pass --ca-cert ca.pem (from "
                "`fleet controller ca --out ca.pem` or GET /api/v1/trust/ca) or set FLEET_CA_CERT"
            )
        return self.ca_pem

    def _device_credentials(self, request: httpx.Request) -> None:
        """Bundle downloads from the controller carry the device's credentials; a redirect to another
        origin (an S3 presigned URL) never sees them."""
        controller = httpx.URL(self.config.controller_url)
        if not self.identity.get("secret") or (request.url.scheme, request.url.host, request.url.port) != (
                controller.scheme, controller.host, controller.port):
            return
        request.headers["x-fleet-device-id"] = self.identity["device_id"]
        request.headers["authorization"] = f"Bearer {self.identity['secret']}"

    def _channel(self) -> grpc.aio.Channel:
        """Mutual TLS to the device port, with the current certificate."""
        if self.creds is None:
            raise FleetError("this device has no certificate yet: it must enrol first")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._require_ca(), private_key=self.creds.key_pem, certificate_chain=self.creds.cert_pem
        )
        return grpc.aio.secure_channel(self.config.controller_grpc, credentials, options=self._grpc_options())

    def enroll_address(self) -> str:
        if self.config.controller_enroll:
            return self.config.controller_enroll
        host, _, _port = self.config.controller_grpc.rpartition(":")
        return f"{host or self.config.controller_grpc}:{DEFAULT_ENROLL_PORT}"

    def _identity_problem(self) -> str | None:
        """Why the agent cannot use its identity as it stands; None when it can."""
        if self.creds is not None and self.identity.get("device_id"):
            if self.creds.expired(datetime.now(UTC)):
                return (f"the device certificate expired at {self.creds.not_after.isoformat()} and can no longer "
                        "be renewed: this device must be enrolled again with a new token "
                        f"(`fleet tokens create --device-id {self.identity['device_id']}`, then --token); "
                        "it keeps serving its models meanwhile")
            return None
        if self.identity.get("device_id"):
            return (f"device {self.identity['device_id']} was enrolled before the controller issued device "
                    "certificates: it must be enrolled again with a new token "
                    f"(`fleet tokens create --device-id {self.identity['device_id']}`, then --token)")
        return "this device has no identity yet: pass an enrolment token (--token or FLEET_ENROLL_TOKEN)"

    async def ensure_identity(self) -> None:
        """Enrol when the device has no usable certificate (and a token to do it with)."""
        problem = self._identity_problem()
        if problem is None:
            return
        if not self.config.enroll_token:
            raise FleetError(problem)
        ca = self._require_ca()
        requested = self.config.device_id or self.identity.get("device_id") or os.uname().nodename
        key_pem, csr_pem = make_key_and_csr(requested)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(self.enroll_address(), credentials, options=self._grpc_options()) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            try:
                response = await stub.Enroll(
                    pb.EnrollRequest(
                        token=self.config.enroll_token,
                        requested_id=requested,
                        labels=self.config.labels,
                        hardware=convert.hardware_to_pb(self.hardware),
                        agent_version=AGENT_VERSION,
                        csr_pem=csr_pem,
                    ),
                    timeout=15,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                    raise FleetError(f"enrolment refused: {exc.details()}. Before that: {problem}") from exc
                raise
        creds = DeviceCredentials(key_pem, bytes(response.certificate_pem))
        self.credentials.save(creds)
        if response.ca_pem and not self.config.ca_cert:
            self.credentials.save_ca(bytes(response.ca_pem))
            self.ca_pem = bytes(response.ca_pem)
        self.creds = creds
        self.identity = {"device_id": response.device_id, "secret": response.device_secret}
        path = self.data_dir / "identity.json"
        write_json_atomic(path, self.identity)
        os.chmod(path, 0o600)
        log.info("enrolled as %s (certificate valid until %s)", response.device_id, creds.not_after.isoformat())

    async def renew(self) -> None:
        """A new key and certificate over the current mutual-TLS identity; streams reconnect with it."""
        if self.creds is None:
            raise FleetError("no certificate to renew: the device must enrol first")
        if self.creds.expired(datetime.now(UTC)):
            raise FleetError(self._identity_problem() or "the device certificate expired")
        key_pem, csr_pem = make_key_and_csr(self.identity.get("device_id", ""))
        async with self._channel() as channel:
            response = await pb_grpc.AgentServiceStub(channel).RenewCertificate(
                pb.RenewRequest(csr_pem=csr_pem), timeout=15
            )
        creds = DeviceCredentials(key_pem, bytes(response.certificate_pem))
        self.credentials.save(creds)
        self.creds = creds
        self.creds_changed.set()
        log.info("renewed the device certificate (valid until %s)", creds.not_after.isoformat())

    async def renew_forever(self) -> None:
        retry = RENEW_RETRY_S[0]
        while not self.stop_event.is_set():
            creds = self.creds
            now = datetime.now(UTC)
            # Without a usable certificate the sync loop enrols (or says why it cannot): look again soon.
            usable = creds is not None and not creds.expired(now)
            delay = max(0.0, (creds.renew_at - now).total_seconds()) if creds is not None and usable else 5.0
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=min(delay, 3600.0))
                continue
            try:
                await self.renew()
                retry = RENEW_RETRY_S[0]
                continue
            except grpc.aio.AioRpcError as exc:
                log.warning("certificate renewal failed (%s): %s; retrying in %.0fs", exc.code().name,
                            exc.details(), retry)
            except FleetError as exc:
                log.error("certificate renewal failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=retry)
            retry = min(retry * 2, RENEW_RETRY_S[1])

    # -- desired and actual state ---------------------------------------------------------

    def _on_status(self, event: dict[str, Any] | None = None) -> None:
        """Called by updaters (maybe from a worker thread) whenever a model's state moves."""
        if event and event.get("state") in ("Failed", "Shadowing", "Idle", "RollingBack", "Committing"):
            self.events.append({**event, "at_ms": event.get("at_ms") or int(time.time() * 1000)})
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.state_changed.set)

    def _crash_hook(self, model: str) -> Any:
        """Test hook: FLEET_AGENT_CRASH_AT=<point>[@<version>] makes the agent SIGKILL itself when an
        update (of that version) reaches the point, so crash recovery is tested with a real kill
        at an exact place in the state machine."""
        spec = os.environ.get("FLEET_AGENT_CRASH_AT")
        if not spec:
            return None
        point, _, version = spec.partition("@")

        def fault(reached: str) -> None:
            target = self.updaters[model].record.target_version if model in self.updaters else ""
            if reached == point and (not version or version == target):
                log.warning("FLEET_AGENT_CRASH_AT=%s reached: killing this process", spec)
                os.kill(os.getpid(), signal.SIGKILL)

        return fault

    def _updater(self, model: str) -> ModelUpdater:
        if model not in self.updaters:
            self.updaters[model] = ModelUpdater(
                model=model,
                store=self.store,
                host=self.host,
                trust=self.trust,
                client=self.http,
                base_url=self.config.controller_url,
                hardware=self.hardware,
                providers=self.providers,
                threads=self.config.threads,
                on_status=self._on_status,
                fault=self._crash_hook(model),
            )
            self.workers[model] = ModelWorker(self.updaters[model])
        return self.updaters[model]

    def actual_state(self) -> dict[str, Any]:
        return {
            "desired_generation": int(self.desired.get("generation", 0)),
            "models": [
                {"model": name, "slots": updater.slots(), "update": updater.status()}
                for name, updater in sorted(self.updaters.items())
            ],
        }

    def apply_desired(self, desired: dict[str, Any], persist: bool = True) -> None:
        if persist:
            write_json_atomic(self.data_dir / "desired.json", desired)
        self.desired = desired
        wanted = {m["model"]: m for m in desired.get("models", [])}
        self.host.set_expected([name for name, m in wanted.items() if m.get("serving")])
        for model in sorted(set(wanted) | set(self.updaters)):
            self._updater(model)
            self.workers[model].submit(wanted.get(model))
        self._start_traffic(sorted(wanted))
        interval = int(desired.get("telemetry_interval_ms") or 0)
        if interval > 0:
            self.config.telemetry_interval_s = interval / 1000
        self.state_changed.set()

    def _start_traffic(self, models: list[str]) -> None:
        """The built-in traffic source: one sender per served model (or the one asked for)."""
        if not self.config.traffic or self.inference_port is None:
            return
        for model in models:
            if model in self.traffic or (self.config.traffic_model and model != self.config.traffic_model):
                continue
            npy_dir = None if self.config.traffic == "synthetic" else Path(self.config.traffic)
            seed = zlib.crc32(self.identity.get("device_id", "").encode()) & 0xFFFF
            source = TrafficSource(f"127.0.0.1:{self.inference_port}", model, rate=self.config.traffic_rate,
                                   npy_dir=npy_dir, seed=seed)
            source.start()
            self.traffic[model] = source

    async def recover(self) -> None:
        """Bring back every model found on disk before talking to anyone."""
        for model in self.store.models():
            await self._updater(model).recover()
        if self.desired:
            self.apply_desired(self.desired, persist=False)

    # -- sync -----------------------------------------------------------------------------

    async def _outgoing(self) -> AsyncIterator[pb.AgentMessage]:
        hello = pb.Hello(
            device_id=self.identity["device_id"],
            labels=self.config.labels,
            hardware=convert.hardware_to_pb(self.hardware),
            agent_version=AGENT_VERSION,
        )
        convert.actual_to_pb(self.actual_state(), hello.state)
        yield pb.AgentMessage(hello=hello)
        while True:
            await self.state_changed.wait()
            self.state_changed.clear()
            await asyncio.sleep(0.1)  # coalesce bursts of state changes into one report
            yield pb.AgentMessage(state=convert.actual_to_pb(self.actual_state()))

    async def sync_forever(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            channel: grpc.aio.Channel | None = None
            try:
                await self.ensure_identity()
                self.creds_changed.clear()
                channel = self._channel()
                stub = pb_grpc.AgentServiceStub(channel)
                call = stub.Sync(self._outgoing())
                renewed = asyncio.create_task(self.creds_changed.wait())
                try:
                    while True:
                        read = asyncio.ensure_future(call.read())
                        done, _ = await asyncio.wait({read, renewed}, return_when=asyncio.FIRST_COMPLETED)
                        if read not in done:
                            # A new certificate: reconnect with it (the old one stays valid meanwhile).
                            call.cancel()
                            read.cancel()
                            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                                await read
                            log.info("reconnecting with the renewed certificate")
                            backoff = 0.0
                            break
                        message = read.result()
                        if message is grpc.aio.EOF:
                            break
                        if not self.connected:
                            self.connected = True
                            backoff = 0.5
                            log.info("connected to controller %s", self.config.controller_grpc)
                        if message.WhichOneof("kind") == "desired":
                            desired = convert.desired_from_pb(message.desired)
                            if desired.get("generation") != self.desired.get("generation") or desired != self.desired:
                                log.info("desired state generation %s", desired.get("generation"))
                                self.apply_desired(desired)
                finally:
                    renewed.cancel()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("controller refused this device: %s", exc.details())
                else:
                    log.warning("sync stream lost (%s): %s", exc.code().name, exc.details())
            except FleetError as exc:
                log.error("%s", exc)
            finally:
                self.connected = False
                if channel is not None:
                    await channel.close()
            delay = backoff * (0.5 + random.random())
            backoff = min(max(backoff, 0.25) * 2, 30.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=delay)

    # -- telemetry ------------------------------------------------------------------------

    def _cut_batch(self) -> None:
        now_ms = int(time.time() * 1000)
        windows = self.host.drain_windows()
        self.metrics.observe_windows(windows)
        events, self.events = self.events, []
        if windows or events:
            self.spool.add(windows, events, self._window_start_ms, now_ms)
        self._window_start_ms = now_ms

    async def telemetry_forever(self) -> None:
        channel: grpc.aio.Channel | None = None
        channel_creds: DeviceCredentials | None = None
        while not self.stop_event.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=self.config.telemetry_interval_s)
            self._cut_batch()
            if not self.identity.get("device_id"):
                continue
            batches = self.spool.load(limit=50)
            if not batches:
                continue
            try:
                if channel is not None and channel_creds is not self.creds:
                    await channel.close()  # renewed: use the new certificate
                    channel = None
                if channel is None:
                    channel, channel_creds = self._channel(), self.creds
                stub = pb_grpc.AgentServiceStub(channel)
                report = convert.report_to_pb(self.identity["device_id"], batches, self.actual_state())
                ack = await stub.ReportTelemetry(report, timeout=10)
                self.spool.ack(list(ack.stored))
            except FleetError as exc:
                log.debug("telemetry kept in the spool: %s", exc)
            except grpc.aio.AioRpcError as exc:
                log.debug("telemetry not delivered (%s); kept in the spool", exc.code().name)
                if channel is not None:
                    await channel.close()
                    channel = None
        if channel is not None:
            await channel.close()

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        server = await start_inference_server(self.host, self.config.inference_addr)
        self.inference_port = bound_port(server)
        metrics_server = None
        if self.config.metrics_addr:
            host, _, port = self.config.metrics_addr.rpartition(":")
            metrics_server, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.metrics.registry)
            self.metrics_port = int(metrics_server.server_port)
        write_json_atomic(self.data_dir / "endpoint.json",
                          {"inference_port": self.inference_port, "metrics_port": self.metrics_port,
                           "pid": os.getpid()})
        log.info("inference endpoint on port %s", self.inference_port)
        await self.recover()
        tasks = [asyncio.create_task(self.sync_forever()), asyncio.create_task(self.telemetry_forever()),
                 asyncio.create_task(self.renew_forever())]
        try:
            await self.stop_event.wait()
        finally:
            for source in self.traffic.values():
                source.stop()
            self._cut_batch()
            for task in tasks:
                task.cancel()
            for worker in self.workers.values():
                await worker.stop()
            await server.stop(grace=1.0)
            if metrics_server is not None:
                metrics_server.shutdown()
            self.host.close()
            self.http.close()

    def stop(self) -> None:
        self.stop_event.set()
