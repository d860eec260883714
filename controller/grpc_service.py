"""The agents' gRPC service: enrolment, the long-lived Sync stream, batched telemetry.

Thin by design: every rule lives in `fleet.controller.devices`, `fleet.controller.desired` and
the reconciler; this module authenticates the caller, converts protobuf at the edge
(`fleet.proto.convert`) and runs blocking database work off the event loop.

Who the caller is comes from one place only: the client certificate the TLS layer verified
(`context.auth_context()`), read by `fleet.controller.pki.peer_identity`. Device ids in
messages (`Hello.device_id`, `TelemetryReport.device_id`) or metadata are never trusted; a
message naming another device than the certificate is refused. A call without a client
certificate (the enrolment port) may only Enroll.

Desired state is pushed, not polled: when the reconciler (or an enrolment) changes the desired
state of some devices it calls `DesiredStateHub.notify`, which wakes exactly those devices'
streams; each stream then reads the stored state and sends it if its generation moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc

from fleet.controller import desired as desired_svc
from fleet.controller import devices as devices_svc
from fleet.controller import pki
from fleet.controller.context import ControllerContext
from fleet.core.errors import AuthenticationError, FleetError, InvalidInputError, PermissionDeniedError
from fleet.proto import convert
from fleet.proto.errors import status_for
from fleet.proto.fleet.v1 import fleet_pb2 as pb
from fleet.proto.fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# A stream with nothing to say still sends a keep-alive notice this often, so dead peers are noticed.
KEEPALIVE_S = 15.0


class DesiredStateHub:
    """Wakes the Sync streams of devices whose desired state changed. Thread-safe `notify`."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self, device_id: str) -> asyncio.Event:
        event = asyncio.Event()
        with self._lock:
            self._events.setdefault(device_id, set()).add(event)
        return event

    def unsubscribe(self, device_id: str, event: asyncio.Event) -> None:
        with self._lock:
            events = self._events.get(device_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[device_id]

    def connected(self) -> list[str]:
        with self._lock:
            return list(self._events)

    def notify(self, device_ids: Iterable[str]) -> None:
        """Wake these devices' streams; "*" wakes every stream (after a missed-change window)."""
        with self._lock:
            ids = list(device_ids)
            if "*" in ids:
                targets = [e for events in self._events.values() for e in events]
            else:
                targets = [e for d in ids for e in self._events.get(d, ())]
        if not targets or self._loop is None:
            return
        for event in targets:
            self._loop.call_soon_threadsafe(event.set)


def peer_certificate(context: grpc.aio.ServicerContext) -> pki.PeerIdentity:
    """The identity in the client certificate the TLS handshake verified; no certificate, no identity."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise AuthenticationError(
            "no client certificate: call the device port with the certificate from enrolment (mutual TLS)"
        )
    return pki.peer_identity(bytes(pems[0]))


class _Malformed:
    def __init__(self, error: Exception) -> None:
        self.error = error


def _malformed_message(method: str, request: _Malformed) -> str:
    return f"request to {method} is not a valid protobuf message ({request.error}); check the client's fleet.v1 stubs"


class RejectMalformedInterceptor(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the method's request become INVALID_ARGUMENT, not UNKNOWN.

    grpc.aio reports a request deserialization failure as UNKNOWN with a logged traceback; here
    the deserializer returns a marker instead and the handler refuses it with a clear status.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = str(handler_call_details.method)
        parse = handler.request_deserializer

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # any parse failure of untrusted bytes
                return _Malformed(exc)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _malformed_message(method, request))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=safe_parse, response_serializer=handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, _Malformed):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _malformed_message(method, request))
                    yield request

            async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in inner_stream(checked(requests, context), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=safe_parse, response_serializer=handler.response_serializer
            )
        return handler


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        ctx: ControllerContext,
        hub: DesiredStateHub,
        kick: Callable[[], None],
        ca: pki.CertificateAuthority,
        cert_ttl: timedelta,
    ) -> None:
        self.ctx = ctx
        self.hub = hub
        self.kick = kick
        self.ca = ca
        self.cert_ttl = cert_ttl

    # -- helpers --------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(session, ...)` in one transaction on a worker thread."""

        def work() -> T:
            with self.ctx.session_factory() as session, session.begin():
                return fn(session, *args, **kwargs)

        return await asyncio.to_thread(work)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> pki.PeerIdentity:
        peer = peer_certificate(context)
        await self._db(devices_svc.authenticate_certificate, peer)
        return peer

    def _issuer(self, csr_pem: bytes) -> Callable[[str], pki.IssuedCertificate]:
        csr = pki.load_csr(csr_pem)  # checked before any database work, so a bad CSR burns no token

        def issue(device_id: str) -> pki.IssuedCertificate:
            return pki.sign_device_csr(self.ca, csr, device_id, datetime.now(UTC), self.cert_ttl)

        return issue

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # the status is set already (e.g. a malformed request message)
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("agent RPC failed", exc_info=exc)
        await context.abort(code, message)

    def _changed(self, ids: list[str]) -> None:
        if ids:
            self.hub.notify(ids)

    # -- RPCs -----------------------------------------------------------------------------

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        try:
            hardware = convert.hardware_from_pb(request.hardware)
            issue = self._issuer(request.csr_pem)
            issued: list[pki.IssuedCertificate] = []

            def issue_once(device_id: str) -> pki.IssuedCertificate:
                issued.append(issue(device_id))
                return issued[-1]

            def enroll(session: Any) -> tuple[Any, str, list[str]]:
                device, secret = devices_svc.enroll(
                    session,
                    token=request.token,
                    requested_id=request.requested_id,
                    labels=dict(request.labels),
                    hardware=hardware,
                    agent_version=request.agent_version,
                    issue=issue_once,
                )
                changed = desired_svc.refresh_desired(self.ctx, session, [device.id])
                return device, secret, changed

            device, secret, changed = await self._db(enroll)
        except Exception as exc:
            await self._abort(context, exc)
            raise  # unreachable: abort raises
        cert = issued[-1]
        log.info("device %s enrolled (certificate %s until %s)", device.id, cert.serial, cert.not_after.isoformat())
        # A stream still open under an earlier identity of this id re-checks its certificate and ends.
        self._changed(sorted({*changed, device.id}))
        self.kick()
        return pb.EnrollResponse(
            device_id=device.id, device_secret=secret, labels=dict(device.labels or {}),
            certificate_pem=cert.pem, ca_pem=self.ca.cert_pem, not_after_ms=int(cert.not_after.timestamp() * 1000),
        )

    async def RenewCertificate(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext) -> pb.RenewResponse:
        try:
            peer = peer_certificate(context)
            issue = self._issuer(request.csr_pem)
            cert = await self._db(devices_svc.renew_certificate, peer, issue)
        except Exception as exc:
            await self._abort(context, exc)
            raise
        log.info("device %s renewed its certificate (%s until %s)", peer.device_id, cert.serial,
                 cert.not_after.isoformat())
        return pb.RenewResponse(certificate_pem=cert.pem, ca_pem=self.ca.cert_pem,
                                not_after_ms=int(cert.not_after.timestamp() * 1000))

    async def Sync(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ControllerMessage]:
        try:
            peer = await self._authenticate(context)
            device_id = peer.device_id
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("kind") != "hello":
                raise InvalidInputError("the first Sync message must be a hello")
            hello = first.hello
            if hello.device_id and hello.device_id != device_id:
                raise PermissionDeniedError(
                    f"hello names device {hello.device_id!r} but the client certificate is {device_id!r}"
                )

            def on_hello(session: Any) -> list[str]:
                devices_svc.record_hello(
                    session,
                    device_id,
                    labels=dict(hello.labels),
                    hardware=convert.hardware_from_pb(hello.hardware),
                    agent_version=hello.agent_version,
                    actual=convert.actual_from_pb(hello.state),
                )
                devices_svc.set_connected(session, device_id, True)
                return desired_svc.refresh_desired(self.ctx, session, [device_id])

            changed = await self._db(on_hello)
        except Exception as exc:
            await self._abort(context, exc)
            return
        self._changed([c for c in changed if c != device_id])
        self.kick()
        wake = self.hub.subscribe(device_id)
        reader = asyncio.create_task(self._read_states(device_id, request_iterator))
        sent_generation = -1
        log.info("device %s connected", device_id)
        try:
            wake.set()  # send the current desired state at once
            while not reader.done():
                waiter = asyncio.create_task(wake.wait())
                done, _ = await asyncio.wait({waiter, reader}, timeout=KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reader in done:
                    break
                if not wake.is_set():
                    if peer.not_after <= datetime.now(UTC):
                        # The handshake checked the certificate once; the stream must not outlive it.
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                            f"certificate of device {device_id} expired; renew or enrol again")
                    yield pb.ControllerMessage(notice=pb.Notice(message="keepalive"))
                    continue
                wake.clear()
                # Decommissioned, re-enrolled or superseded since the stream opened: end it.
                try:
                    await self._db(devices_svc.authenticate_certificate, peer)
                except FleetError as exc:
                    code, message = status_for(exc)
                    await context.abort(code, message)
                state = await self._db(desired_svc.desired_state, device_id)
                if state and int(state.get("generation", 0)) != sent_generation:
                    sent_generation = int(state["generation"])
                    yield pb.ControllerMessage(desired=convert.desired_to_pb(state))
        finally:
            self.hub.unsubscribe(device_id, wake)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            with contextlib.suppress(Exception):
                await self._db(devices_svc.set_connected, device_id, False)
            self.kick()
            log.info("device %s disconnected", device_id)

    async def _read_states(self, device_id: str, request_iterator: AsyncIterator[pb.AgentMessage]) -> None:
        async for message in request_iterator:
            if message.WhichOneof("kind") != "state":
                continue
            actual = convert.actual_from_pb(message.state)
            try:
                await self._db(devices_svc.record_actual, device_id, actual)
            except FleetError as exc:
                log.warning("state report from %s refused: %s", device_id, exc)
                continue
            self.kick()

    async def ReportTelemetry(
        self, request: pb.TelemetryReport, context: grpc.aio.ServicerContext
    ) -> pb.TelemetryAck:
        try:
            device_id = (await self._authenticate(context)).device_id
            if request.device_id and request.device_id != device_id:
                raise PermissionDeniedError(
                    f"telemetry names device {request.device_id!r} but the client certificate is {device_id!r}"
                )
            batches = [convert.batch_from_pb(b) for b in request.batches]
            actual = convert.actual_from_pb(request.state) if request.HasField("state") else None

            def store(session: Any) -> list[int]:
                stored = devices_svc.store_telemetry(session, device_id, batches)
                if actual is not None:
                    devices_svc.record_actual(session, device_id, actual)
                return stored

            stored = await self._db(store)
        except Exception as exc:
            await self._abort(context, exc)
            raise
        self.kick()
        return pb.TelemetryAck(stored=stored)
