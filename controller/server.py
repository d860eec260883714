"""The controller process: REST (uvicorn) and gRPC (grpc.aio) on one event loop, plus the reconciler.

gRPC listens on two ports, both TLS with the controller's server certificate (issued by its own
CA, `fleet.controller.pki`): the device port requires a client certificate from that CA (mutual
TLS), the enrolment port does not, so a new device can trade a token and a CSR for one there.
No plaintext gRPC port exists.

The reconciler's passes are blocking database work, so they run on a worker thread, one at a
time; `kick()` asks for a pass as soon as possible (after a report, a CLI action, a connect),
and a timer runs one every `reconcile_interval_s` in any case, so time-based rules (deadlines,
expiring timestamps) fire without any event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fleet.controller import access, pki
from fleet.controller import devices as devices_svc
from fleet.controller.app import create_app
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.coordination import LocalCoordinator, PostgresCoordinator
from fleet.controller.engine import Reconciler
from fleet.controller.grpc_service import AgentService, DesiredStateHub, RejectMalformedInterceptor
from fleet.controller.settings import ControllerSettings
from fleet.core.errors import InvalidInputError, NotFoundError
from fleet.proto.fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
GRPC_MAX_MESSAGE = 16 * 1024 * 1024
# The enrolment port carries one small request per device (token, CSR, labels, hardware).
GRPC_ENROLL_MAX_MESSAGE = 64 * 1024


# Housekeeping that needs no event: re-sign the online metadata before it expires, drop old telemetry.
TRUST_REFRESH_S = 60.0
PRUNE_EVERY_S = 600.0


@dataclass
class ReconcileLoop:
    """Runs reconciler passes on a worker thread: one at a time, on a timer and on demand."""

    reconciler: Reconciler
    interval_s: float
    ctx: ControllerContext | None = None
    # Whether this replica may reconcile now (leader election); always true for one process.
    is_leader: Callable[[], bool] = lambda: True
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    passes: int = 0
    _last_trust: float = 0.0
    _last_prune: float = 0.0

    def housekeeping(self, now: float) -> None:
        """Blocking; runs on the worker thread between passes."""
        if self.ctx is None:
            return
        if now - self._last_trust >= TRUST_REFRESH_S:
            self._last_trust = now
            with contextlib.suppress(NotFoundError):  # no root yet: nothing is signed, nothing expires
                self.ctx.trust.refresh()
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            cutoff = datetime.now(timezone.utc) - timedelta(hours=self.ctx.settings.telemetry_retention_hours)
            with self.ctx.session_factory() as session, session.begin():
                removed = devices_svc.prune_telemetry(session, older_than=cutoff)
            if removed:
                log.info("pruned %d telemetry windows older than %s", removed, cutoff.isoformat())

    def kick(self) -> None:
        """Thread-safe: ask for a pass soon."""
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            self._wake.clear()
            if not self.is_leader():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
                continue
            try:
                await asyncio.to_thread(self.reconciler.reconcile_once)
                self.passes += 1
            except Exception:
                log.exception("reconciler pass failed; retrying on the next tick")
            try:
                await asyncio.to_thread(self.housekeeping, time.monotonic())
            except Exception:
                log.exception("housekeeping failed; retrying later")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            # Coalesce bursts of kicks (a report from every device) into one pass.
            await asyncio.sleep(0.05)


class _EmbeddedHttpServer(uvicorn.Server):
    """uvicorn without signal handlers of its own: the controller's event loop owns SIGINT/SIGTERM
    and stops REST, gRPC and the reconciler together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Controller:
    """Everything the controller process runs, startable in-process (tests) or from the CLI."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.http_tls = http_tls_options(settings)  # before any state: a bad TLS setting fails at once
        self.ctx: ControllerContext = build_context(settings)
        # Always leave a way in: the configured admin token, or a fresh one in <data_dir>/admin.token.
        access.ensure_bootstrap_admin(self.ctx.session_factory, admin_token=settings.admin_token,
                                      data_dir=settings.data_dir)
        self.hub = DesiredStateHub()
        self.reconciler = Reconciler(self.ctx)
        self.loop = ReconcileLoop(self.reconciler, settings.reconcile_interval_s, self.ctx)
        self.coordinator: LocalCoordinator | PostgresCoordinator
        if self.settings.db_url.startswith("postgresql"):
            self.coordinator = PostgresCoordinator(settings.db_url, on_desired=self.hub.notify, on_kick=self.loop.kick)
        else:
            self.coordinator = LocalCoordinator()
        self.loop.is_leader = lambda: self.coordinator.is_leader
        self.ctx.on_desired_changed = self._desired_changed
        self.ctx.kick = self._kick
        # The device CA and the controller's server certificate: made on first start, re-issued
        # when the configured names change or the certificate nears expiry.
        self.ca = pki.load_or_create_ca(settings.tls_dir, settings.ca_cert_file, settings.ca_key_file)
        self.server_key_pem, self.server_cert_pem = pki.ensure_server_certificate(
            self.ca, settings.tls_dir, pki.parse_server_names(settings.tls_server_names)
        )
        self.grpc_port: int | None = None
        self.grpc_enroll_port: int | None = None
        self.stop_event: asyncio.Event | None = None
        self.started = threading.Event()

    def _desired_changed(self, device_ids: list[str]) -> None:
        self.hub.notify(device_ids)  # this replica's streams at once
        self.coordinator.publish_desired(device_ids)  # every other replica's

    def _kick(self) -> None:
        if self.coordinator.is_leader:
            self.loop.kick()
        else:
            self.coordinator.publish_kick()  # only the leader reconciles

    def _grpc_server(self, max_message: int) -> grpc.aio.Server:
        interceptors: list[grpc.aio.ServerInterceptor] = (
            [self.ctx.metrics.grpc_interceptor()] if self.ctx.metrics is not None else []
        )
        interceptors.append(RejectMalformedInterceptor())
        return grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )

    async def _start_grpc(self) -> list[grpc.aio.Server]:
        """The device port (mutual TLS) and the enrolment port (server TLS), one servicer for both."""
        service = AgentService(self.ctx, self.hub, self.loop.kick, self.ca,
                               timedelta(hours=self.settings.device_cert_ttl_hours))
        identity = [(self.server_key_pem, self.server_cert_pem)]
        servers = []
        for port, max_message, require_client_auth in (
            (self.settings.grpc_port, GRPC_MAX_MESSAGE, True),
            (self.settings.grpc_enroll_port, GRPC_ENROLL_MAX_MESSAGE, False),
        ):
            server = self._grpc_server(max_message)
            pb_grpc.add_AgentServiceServicer_to_server(service, server)
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            credentials = grpc.ssl_server_credentials(
                identity, root_certificates=self.ca.cert_pem if require_client_auth else None,
                require_client_auth=require_client_auth,
            )
            address = f"{self.settings.grpc_host}:{port}"
            bound = server.add_secure_port(address, credentials)
            if not bound:
                raise OSError(f"cannot listen for gRPC on {address}")
            if require_client_auth:
                self.grpc_port = bound
            else:
                self.grpc_enroll_port = bound
            await server.start()
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            await health_servicer.set("fleet.v1.AgentService", health_pb2.HealthCheckResponse.SERVING)
            servers.append(server)
        return servers

    async def serve(self) -> None:
        self.stop_event = asyncio.Event()
        self.hub.bind(asyncio.get_running_loop())
        await self.coordinator.start()
        grpc_servers = await self._start_grpc()
        app = create_app(self.ctx)
        config = uvicorn.Config(
            app,
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
            ssl_certfile=self.http_tls.get("ssl_certfile"),
            ssl_keyfile=self.http_tls.get("ssl_keyfile"),
        )
        http = _EmbeddedHttpServer(config)
        http_task = asyncio.create_task(http.serve())
        loop_task = asyncio.create_task(self.loop.run(self.stop_event))
        gitops_task: asyncio.Task[None] | None = None
        if self.settings.gitops_enabled:
            from fleet.controller.gitops import GitOpsLoop
            from fleet.controller.k8s import KubernetesApi

            # Only the leader reconciles ModelRollouts: two replicas would race on the same status.
            gitops = GitOpsLoop(self.ctx, KubernetesApi, namespace=self.settings.gitops_namespace or None,
                                resync_s=self.settings.gitops_resync_s,
                                is_leader=lambda: self.coordinator.is_leader)
            gitops_task = asyncio.create_task(gitops.run(self.stop_event))
        log.info(
            "controller serving REST on %s://%s:%s, gRPC on %s:%s (mutual TLS) and enrolment on %s:%s (TLS); "
            "device CA %s valid until %s",
            "https" if self.http_tls else "http", self.settings.http_host, self.settings.http_port,
            self.settings.grpc_host, self.grpc_port, self.settings.grpc_host, self.grpc_enroll_port,
            self.settings.ca_cert_file or self.settings.tls_dir / pki.CA_CERT_NAME,
            self.ca.cert.not_valid_after_utc.isoformat(),
        )
        self.started.set()
        try:
            await self.stop_event.wait()
        finally:
            http.should_exit = True
            await asyncio.gather(*(server.stop(grace=1.0) for server in grpc_servers))
            with contextlib.suppress(Exception):
                await http_task
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            if gitops_task is not None:
                gitops_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gitops_task
            await self.coordinator.stop()

    def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()


def http_tls_options(settings: ControllerSettings) -> dict[str, str]:
    """uvicorn's TLS arguments for REST: empty for plain HTTP, the certificate and key files for HTTPS."""
    if not settings.http_tls:
        return {}
    cert, key = settings.http_tls_cert, settings.http_tls_key
    if cert is None and key is None:
        # The controller's own server certificate, issued by its CA (the one agents already trust);
        # `Controller.__init__` makes or renews it before anything is served.
        return {"ssl_certfile": str(settings.tls_dir / pki.SERVER_CERT_NAME),
                "ssl_keyfile": str(settings.tls_dir / pki.SERVER_KEY_NAME)}
    if cert is None or key is None:
        raise InvalidInputError(
            "http_tls_cert and http_tls_key go together: set both FLEET_HTTP_TLS_CERT and FLEET_HTTP_TLS_KEY "
            "(certificate chain and its private key), or neither to use a certificate from the controller's CA"
        )
    for what, path in (("http_tls_cert", cert), ("http_tls_key", key)):
        if not path.expanduser().is_file():
            raise InvalidInputError(f"{what} {path} is not a readable file")
    return {"ssl_certfile": str(cert.expanduser()), "ssl_keyfile": str(key.expanduser())}


def run(settings: ControllerSettings) -> None:
    """Serve until SIGINT or SIGTERM."""
    controller = Controller(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, controller.stop)
        await controller.serve()

    asyncio.run(main())
