"""Attacks on device identity: the controller's two gRPC ports, real TLS, an in-process controller.

Each test names one attack and asserts the controller refuses it with a clear status, never acts
on it, and keeps serving honest devices afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.agent.identity import make_key_and_csr
from fleet.controller import pki
from fleet.controller.server import Controller
from fleet.proto import convert
from fleet.proto.fleet.v1 import fleet_pb2 as pb
from fleet.proto.fleet.v1 import fleet_pb2_grpc as pb_grpc
from tests.integration.agent_client import (
    AUTH,
    DeviceIdentity,
    device_json,
    enroll_channel,
    hello_stream,
    mtls_channel,
    run_with_controller,
    token,
)

REPORT_METHOD = "/fleet.v1.AgentService/ReportTelemetry"
ENROLL_METHOD = "/fleet.v1.AgentService/Enroll"


async def refused(awaitable: object, *codes: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(awaitable, 15)  # type: ignore[arg-type]
    assert caught.value.code() in codes, (caught.value.code(), caught.value.details())
    return caught.value


async def still_serving(controller: Controller, url: str, cam: DeviceIdentity) -> None:
    """An honest device can still enrol-free call the device port, and new devices still enrol."""
    async with cam.channel() as channel:
        ack = await cam.stub(channel).ReportTelemetry(convert.report_to_pb(cam.device_id, [], None), timeout=10)
        assert list(ack.stored) == []
    fresh = DeviceIdentity(controller, f"fresh-{time.monotonic_ns() % 100000}")
    assert (await fresh.enroll(await token(url))).certificate_pem


async def enrolled(controller: Controller, url: str, name: str) -> DeviceIdentity:
    cam = DeviceIdentity(controller, name)
    await cam.enroll(await token(url))
    return cam


def test_device_claiming_another_devices_id_acts_as_itself_or_is_refused(tmp_path: Path) -> None:
    """Attack: cam-1's certificate with messages and metadata naming cam-2.

    The Sync hello and the telemetry naming cam-2 are refused; metadata naming cam-2 is ignored
    (the call counts for cam-1); cam-2's state and telemetry are never written.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam1, cam2 = await enrolled(controller, url, "cam-1"), await enrolled(controller, url, "cam-2")
        before = await device_json(url, "cam-2")
        actual = {"desired_generation": 999, "models": [{"model": "detector", "slots": [], "update": {}}]}
        batch = {"seq": 1, "window_start_ms": 1, "window_end_ms": 2, "windows": [], "events": [
            {"model": "detector", "version": "v9", "role": "serving", "state": "Failed", "reason": "forged"}]}
        async with cam1.channel() as channel:
            stub = cam1.stub(channel)
            spoofed_metadata = (("x-fleet-device-id", "cam-2"), ("authorization", f"Bearer {cam2.secret}"))
            hello = stub.Sync(hello_stream("cam-2", asyncio.Queue()), metadata=spoofed_metadata)
            error = await refused(hello.read(), grpc.StatusCode.PERMISSION_DENIED)
            assert "cam-2" in (error.details() or "") and "cam-1" in (error.details() or "")
            error = await refused(stub.ReportTelemetry(convert.report_to_pb("cam-2", [batch], actual),
                                                       metadata=spoofed_metadata), grpc.StatusCode.PERMISSION_DENIED)
            # Metadata alone claims nothing: with no id in the message the call is cam-1's
            ack = await stub.ReportTelemetry(convert.report_to_pb("", [batch], actual), metadata=spoofed_metadata)
            assert list(ack.stored) == [1]
        after = await device_json(url, "cam-2")
        assert after["actual"] == before["actual"] and after["acked_generation"] == before["acked_generation"]
        assert after["events"] == []
        assert (await device_json(url, "cam-1"))["events"][0]["reason"] == "forged"
        await still_serving(controller, url, cam1)

    run_with_controller(tmp_path, scenario)


def test_client_certificate_from_a_foreign_ca(tmp_path: Path) -> None:
    """Attack: a certificate naming cam-1, with the right URI, signed by a CA the controller did not make.

    The TLS handshake on the device port fails (the call never reaches a handler); honest devices go on.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam = await enrolled(controller, url, "cam-1")
        foreign_ca = pki.create_ca(datetime.now(UTC), common_name="edge-fleet device CA")  # same name, other key
        key_pem, csr_pem = make_key_and_csr("cam-1")
        forged = pki.sign_device_csr(foreign_ca, pki.load_csr(csr_pem), "cam-1", datetime.now(UTC), timedelta(hours=1))
        async with mtls_channel(controller, key_pem, forged.pem) as channel:
            await refused(pb_grpc.AgentServiceStub(channel).ReportTelemetry(convert.report_to_pb("", [], None)),
                          grpc.StatusCode.UNAVAILABLE)
        await still_serving(controller, url, cam)

    run_with_controller(tmp_path, scenario)


def test_no_client_certificate(tmp_path: Path) -> None:
    """Attack: calling device RPCs without a client certificate, on either port.

    The device port's handshake fails; on the enrolment port (no client certificates there) every
    RPC but Enroll is UNAUTHENTICATED, whatever metadata claims.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam = await enrolled(controller, url, "cam-1")
        report = convert.report_to_pb("cam-1", [], None)
        creds = (("x-fleet-device-id", "cam-1"), ("authorization", f"Bearer {cam.secret}"))
        async with mtls_channel(controller, None, None) as channel:
            await refused(pb_grpc.AgentServiceStub(channel).ReportTelemetry(report, metadata=creds),
                          grpc.StatusCode.UNAVAILABLE)
        async with enroll_channel(controller) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            for call in (stub.ReportTelemetry(report, metadata=creds),
                         stub.Sync(hello_stream("cam-1", asyncio.Queue()), metadata=creds).read(),
                         stub.RenewCertificate(pb.RenewRequest(csr_pem=cam.csr_pem), metadata=creds)):
                error = await refused(call, grpc.StatusCode.UNAUTHENTICATED)
                assert "no client certificate" in (error.details() or "")
        async with grpc.aio.insecure_channel(target) as plain:  # and no plaintext at all
            await refused(pb_grpc.AgentServiceStub(plain).ReportTelemetry(report, metadata=creds),
                          grpc.StatusCode.UNAVAILABLE)
        await still_serving(controller, url, cam)

    run_with_controller(tmp_path, scenario)


def test_decommissioned_device_certificate(tmp_path: Path) -> None:
    """Attack: a decommissioned device (stolen, retired) keeps using its still-unexpired certificate.

    Every call is PERMISSION_DENIED "decommissioned", renewal included; the device row shows it.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam, other = await enrolled(controller, url, "cam-1"), await enrolled(controller, url, "cam-2")
        import httpx

        async with httpx.AsyncClient(headers=AUTH) as client:
            (await client.post(f"{url}/api/v1/devices/cam-1/decommission")).raise_for_status()
        async with cam.channel() as channel:
            stub = cam.stub(channel)
            for call in (stub.ReportTelemetry(convert.report_to_pb("", [], None)),
                         stub.Sync(hello_stream("cam-1", asyncio.Queue())).read(),
                         stub.RenewCertificate(pb.RenewRequest(csr_pem=make_key_and_csr("cam-1")[1]))):
                error = await refused(call, grpc.StatusCode.PERMISSION_DENIED)
                assert "decommissioned" in (error.details() or "")
        device = await device_json(url, "cam-1")
        assert device["decommissioned"] and device["cert_serial"] is None
        await still_serving(controller, url, other)

    run_with_controller(tmp_path, scenario)


def test_superseded_and_expired_certificates(tmp_path: Path) -> None:
    """Attack: replaying a device's old certificate after it was renewed twice, or after it expired.

    The superseded one is PERMISSION_DENIED "revoked" (only the directly previous one is accepted,
    until it expires); an expired one fails the TLS handshake.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam = await enrolled(controller, url, "cam-1")
        original = (cam.key_pem, cam.cert_pem)
        await cam.renew()
        await cam.renew()
        async with mtls_channel(controller, *original) as channel:
            error = await refused(pb_grpc.AgentServiceStub(channel).ReportTelemetry(convert.report_to_pb("", [], None)),
                                  grpc.StatusCode.PERMISSION_DENIED)
            assert "revoked" in (error.details() or "")
        # A certificate of the current serial but already expired (as if the clock ran past it)
        key_pem, csr_pem = make_key_and_csr("cam-1")
        expired = pki.sign_device_csr(controller.ca, pki.load_csr(csr_pem), "cam-1",
                                      datetime.now(UTC) - timedelta(hours=2), timedelta(hours=1))
        async with mtls_channel(controller, key_pem, expired.pem) as channel:
            await refused(pb_grpc.AgentServiceStub(channel).ReportTelemetry(convert.report_to_pb("", [], None)),
                          grpc.StatusCode.UNAVAILABLE)
        await still_serving(controller, url, cam)

    run_with_controller(tmp_path, scenario)


def test_expired_enrolment_token(tmp_path: Path) -> None:
    """Attack: enrolling with a token past its expiry. UNAUTHENTICATED "expired"; no device is made."""

    async def scenario(controller: Controller, target: str, url: str) -> None:
        tok = await token(url, ttl=1)
        await asyncio.sleep(1.2)
        error = await refused(DeviceIdentity(controller, "cam-1").enroll(tok), grpc.StatusCode.UNAUTHENTICATED)
        assert "expired" in (error.details() or "")
        import httpx

        async with httpx.AsyncClient(headers=AUTH) as client:
            assert (await client.get(f"{url}/api/v1/devices/cam-1")).status_code == 404
        await still_serving(controller, url, await enrolled(controller, url, "cam-2"))

    run_with_controller(tmp_path, scenario)


def test_reused_single_use_token(tmp_path: Path) -> None:
    """Attack: a second device enrolling with a single-use token (the default). UNAUTHENTICATED "used up"."""

    async def scenario(controller: Controller, target: str, url: str) -> None:
        tok = await token(url)  # default: one use
        first = DeviceIdentity(controller, "cam-1")
        await first.enroll(tok)
        error = await refused(DeviceIdentity(controller, "cam-2").enroll(tok), grpc.StatusCode.UNAUTHENTICATED)
        assert "used up" in (error.details() or "")
        # Nor can the same device replay it to replace its own identity
        error = await refused(DeviceIdentity(controller, "cam-1").enroll(tok), grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.FAILED_PRECONDITION)
        await still_serving(controller, url, first)

    run_with_controller(tmp_path, scenario)


def test_token_pre_authorised_to_another_device(tmp_path: Path) -> None:
    """Attack: using a token made for cam-7 to enrol cam-8 (or to take over an enrolled cam-8).

    UNAUTHENTICATED naming the token's device; the token keeps its use for cam-7.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam8 = await enrolled(controller, url, "cam-8")
        tok = await token(url, device_id="cam-7")
        for name in ("cam-8", "cam-9"):
            error = await refused(DeviceIdentity(controller, name).enroll(tok), grpc.StatusCode.UNAUTHENTICATED)
            assert "pre-authorised for device 'cam-7'" in (error.details() or "")
        assert (await DeviceIdentity(controller, "cam-7").enroll(tok)).device_id == "cam-7"
        await still_serving(controller, url, cam8)

    run_with_controller(tmp_path, scenario)


def test_csr_for_a_weak_or_foreign_key_type(tmp_path: Path) -> None:
    """Attack: enrolling with a CSR for a curve the controller does not accept. INVALID_ARGUMENT; token unburnt."""

    async def scenario(controller: Controller, target: str, url: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256K1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-1")]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        tok = await token(url)
        cam = DeviceIdentity(controller, "cam-1")
        cam.csr_pem = csr
        error = await refused(cam.enroll(tok), grpc.StatusCode.INVALID_ARGUMENT)
        assert "P-256 or P-384" in (error.details() or "")
        honest = DeviceIdentity(controller, "cam-1")
        await honest.enroll(tok)  # the refused attempt did not use the token up
        await still_serving(controller, url, honest)

    run_with_controller(tmp_path, scenario)


def test_oversized_messages_on_both_ports(tmp_path: Path) -> None:
    """Attack: a message over the port's limit (64 KiB on the enrolment port, 16 MiB on the device port).

    RESOURCE_EXHAUSTED before any handler runs; the server keeps serving.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam = await enrolled(controller, url, "cam-1")
        tok = await token(url)
        async with enroll_channel(controller) as channel:
            big = pb.EnrollRequest(token=tok, requested_id="cam-2", csr_pem=b"x" * (200 * 1024))
            await refused(pb_grpc.AgentServiceStub(channel).Enroll(big), grpc.StatusCode.RESOURCE_EXHAUSTED)
        async with cam.channel() as channel:
            huge = pb.TelemetryReport(device_id="cam-1", batches=[pb.TelemetryBatch(seq=1, windows=[
                pb.ModelWindow(model="m" * (1024 * 1024), version="v1", role="serving") for _ in range(17)])])
            await refused(cam.stub(channel).ReportTelemetry(huge), grpc.StatusCode.RESOURCE_EXHAUSTED)
        # The refused enrolment did not spend the token
        assert (await DeviceIdentity(controller, "cam-2").enroll(tok)).device_id == "cam-2"
        await still_serving(controller, url, cam)

    run_with_controller(tmp_path, scenario)


def test_malformed_messages_on_both_ports(tmp_path: Path) -> None:
    """Attack: raw bytes that are not protobuf, sent as Enroll (enrolment port) and ReportTelemetry (device port).

    INVALID_ARGUMENT saying the request is not a valid message; no handler runs; the server keeps serving.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam = await enrolled(controller, url, "cam-1")
        garbage = b"\xff\xff\xff\xff\x0f" + bytes(range(256)) * 4
        async with enroll_channel(controller) as channel:
            raw = channel.unary_unary(ENROLL_METHOD, request_serializer=None, response_deserializer=None)
            error = await refused(raw(garbage), grpc.StatusCode.INVALID_ARGUMENT)
            assert "not a valid protobuf message" in (error.details() or "")
        async with cam.channel() as channel:
            raw = channel.unary_unary(REPORT_METHOD, request_serializer=None, response_deserializer=None)
            error = await refused(raw(garbage), grpc.StatusCode.INVALID_ARGUMENT)
            assert "not a valid protobuf message" in (error.details() or "")
        await still_serving(controller, url, cam)

    run_with_controller(tmp_path, scenario)


def test_malformed_stream_message(tmp_path: Path) -> None:
    """Attack: raw bytes that are not protobuf as the first message of a Sync stream (device port).

    INVALID_ARGUMENT; nothing is recorded for the device; the server keeps serving.
    """

    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam = await enrolled(controller, url, "cam-1")
        async with cam.channel() as channel:
            raw = channel.stream_stream("/fleet.v1.AgentService/Sync", request_serializer=None,
                                        response_deserializer=None)

            async def garbage() -> AsyncIterator[bytes]:
                yield b"\xff\xff\xff\xff\x0f" + bytes(range(256))
                await asyncio.sleep(5)

            error = await refused(raw(garbage()).read(), grpc.StatusCode.INVALID_ARGUMENT)
            assert "not a valid protobuf message" in (error.details() or "")
        assert not (await device_json(url, "cam-1"))["connected"]
        await still_serving(controller, url, cam)

    run_with_controller(tmp_path, scenario)
