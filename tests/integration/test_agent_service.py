"""The controller's agent-facing gRPC service, in-process over real gRPC and real TLS on loopback.

Enrolment with a CSR and bounded tokens on the enrolment port, the Sync stream's push of desired
state over mutual TLS, identity from the client certificate on every call, exactly-once
telemetry, certificate renewal, and the end of a decommissioned device's stream.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509

from fleet.controller.pki import SPIFFE_PREFIX, serial_hex
from fleet.controller.server import Controller
from fleet.proto import convert
from fleet.proto.fleet.v1 import fleet_pb2 as pb

from .agent_client import AUTH, DeviceIdentity, device_json, hello_stream, mtls_channel, run_with_controller, token

__all__ = ["run_with_controller", "token"]  # shared with other integration tests


def serial_of(cert_pem: bytes) -> str:
    return serial_hex(x509.load_pem_x509_certificate(cert_pem))


async def expect_refused(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(call, 10)  # type: ignore[arg-type]
    assert refused.value.code() == code, refused.value.details()
    return refused.value


def test_enrol_sync_and_identity(tmp_path: Path) -> None:
    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam = DeviceIdentity(controller, "cam-1")
        tok = await token(url, uses=1)
        enrolled = await cam.enroll(tok, labels={"site": "lab"})
        assert enrolled.device_id == "cam-1" and enrolled.device_secret
        cert = x509.load_pem_x509_certificate(enrolled.certificate_pem)
        assert cert.subject.rfc4514_string() == "CN=cam-1"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_PREFIX + "cam-1"]
        assert enrolled.ca_pem == controller.ca.cert_pem
        assert enrolled.not_after_ms == int(cert.not_valid_after_utc.timestamp() * 1000)
        stored = await device_json(url, "cam-1")
        assert stored["cert_serial"] == serial_hex(cert)

        # A single-use token cannot enrol a second device
        refused = await expect_refused(DeviceIdentity(controller, "cam-2").enroll(tok), grpc.StatusCode.UNAUTHENTICATED)
        assert "used up" in (refused.details() or "")

        async with cam.channel() as channel:
            stub = cam.stub(channel)
            # The stream opens with the current desired state at once
            outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
            call = stub.Sync(hello_stream("cam-1", outbox))
            first = await asyncio.wait_for(call.read(), 10)
            assert first.WhichOneof("kind") == "desired" and first.desired.generation >= 1

            # Actual state reports are stored
            actual = {"desired_generation": first.desired.generation, "models": []}
            await outbox.put(pb.AgentMessage(state=convert.actual_to_pb(actual)))
            for _ in range(50):
                device = await device_json(url, "cam-1")
                if device.get("connected") and device["actual"].get("desired_generation"):
                    break
                await asyncio.sleep(0.1)
            assert device["connected"] and device["actual"]["desired_generation"] == first.desired.generation

            # Telemetry is stored once and acknowledged every time
            batch = {"seq": 7, "window_start_ms": 1, "window_end_ms": 2, "windows": [], "events": []}
            report = convert.report_to_pb("cam-1", [batch], None)
            for _ in range(2):
                ack = await stub.ReportTelemetry(report)
                assert list(ack.stored) == [7]

            # A hello naming another device than the certificate is refused
            other = stub.Sync(hello_stream("cam-9", asyncio.Queue()))
            await expect_refused(other.read(), grpc.StatusCode.PERMISSION_DENIED)

            # Decommissioning ends the open stream, and its certificate stops working
            async with httpx.AsyncClient(headers=AUTH) as client:
                (await client.post(f"{url}/api/v1/devices/cam-1/decommission")).raise_for_status()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    await asyncio.wait_for(call.read(), 10)
            assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "decommissioned" in (ended.value.details() or "")
            await outbox.put(None)
            refused = await expect_refused(stub.ReportTelemetry(report), grpc.StatusCode.PERMISSION_DENIED)
            assert "decommissioned" in (refused.details() or "")
        device = await device_json(url, "cam-1")
        assert device["decommissioned"] and device["decommissioned_at"] and device["cert_serial"] is None

        # Re-enrolling the decommissioned id issues a new certificate; the old one stays refused
        old_key, old_cert = cam.key_pem, cam.cert_pem
        again = DeviceIdentity(controller, "cam-1")
        await again.enroll(await token(url))
        assert serial_of(again.cert_pem) != serial_of(old_cert)
        async with again.channel() as channel:
            assert list((await again.stub(channel).ReportTelemetry(report)).stored) == [7]
        cam.key_pem, cam.cert_pem = old_key, old_cert
        async with cam.channel() as channel:
            refused = await expect_refused(cam.stub(channel).ReportTelemetry(report), grpc.StatusCode.PERMISSION_DENIED)
            assert "revoked" in (refused.details() or "")

    run_with_controller(tmp_path, scenario)


def test_renewal_keeps_the_previous_certificate_until_a_second_renewal(tmp_path: Path) -> None:
    async def scenario(controller: Controller, target: str, url: str) -> None:
        cam = DeviceIdentity(controller, "cam-1")
        await cam.enroll(await token(url))
        first_serial = serial_of(cam.cert_pem)
        report = convert.report_to_pb("cam-1", [], None)

        # A stream open on the first certificate...
        async with cam.channel() as channel:
            call = cam.stub(channel).Sync(hello_stream("cam-1", asyncio.Queue()))
            assert (await asyncio.wait_for(call.read(), 10)).WhichOneof("kind") == "desired"

            # ...survives a renewal: the renewed-from certificate stays valid until it expires
            renewed = await cam.renew()
            cert = x509.load_pem_x509_certificate(renewed.certificate_pem)
            assert cert.subject.rfc4514_string() == "CN=cam-1" and serial_hex(cert) != first_serial
            assert renewed.ca_pem == controller.ca.cert_pem
            device = await device_json(url, "cam-1")
            assert device["cert_serial"] == serial_hex(cert)
            first_key, first_cert = cam.previous
            async with mtls_channel(controller, first_key, first_cert) as old:
                assert list((await cam.stub(old).ReportTelemetry(report)).stored) == []
            call.cancel()

        # The new certificate works
        async with cam.channel() as channel:
            assert list((await cam.stub(channel).ReportTelemetry(report)).stored) == []

        # After a second renewal the first certificate is refused
        await cam.renew()
        async with mtls_channel(controller, first_key, first_cert) as old:
            refused = await expect_refused(cam.stub(old).ReportTelemetry(report), grpc.StatusCode.PERMISSION_DENIED)
            assert "revoked" in (refused.details() or "")
            refused = await expect_refused(
                cam.stub(old).RenewCertificate(pb.RenewRequest(csr_pem=cam.csr_pem)), grpc.StatusCode.PERMISSION_DENIED
            )

    run_with_controller(tmp_path, scenario)


def test_pre_authorised_token_names_the_device_and_its_labels_win(tmp_path: Path) -> None:
    async def scenario(controller: Controller, target: str, url: str) -> None:
        tok = await token(url, device_id="cam-7", labels={"site": "north"})
        # Another id cannot use it, and the refusal does not burn its one use
        refused = await expect_refused(DeviceIdentity(controller, "cam-8").enroll(tok),
                                       grpc.StatusCode.UNAUTHENTICATED)
        assert "pre-authorised for device 'cam-7'" in (refused.details() or "")
        # An empty requested id takes the token's; the token's labels beat the device's
        cam = DeviceIdentity(controller, "ignored-hostname")
        enrolled = await cam.enroll(tok, requested_id="", labels={"site": "south", "kind": "camera"})
        assert enrolled.device_id == "cam-7"
        assert dict(enrolled.labels) == {"site": "north", "kind": "camera"}
        async with httpx.AsyncClient(headers=AUTH) as client:
            tokens = (await client.get(f"{url}/api/v1/enrollment-tokens")).json()
        assert [t["device_id"] for t in tokens] == ["cam-7"] and tokens[0]["uses"] == 1

        # A token made for an enrolled id re-enrols it (a device whose certificate ran out offline);
        # the stream of the replaced identity ends, and its certificate is refused
        async with cam.channel() as channel:
            call = cam.stub(channel).Sync(hello_stream("cam-7", asyncio.Queue()))
            assert (await asyncio.wait_for(call.read(), 10)).WhichOneof("kind") == "desired"
            replacement = DeviceIdentity(controller, "cam-7")
            await replacement.enroll(await token(url, device_id="cam-7"))
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    await asyncio.wait_for(call.read(), 10)
            assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Without such a token, an enrolled id is not taken over
        refused = await expect_refused(DeviceIdentity(controller, "cam-7").enroll(await token(url)),
                                       grpc.StatusCode.FAILED_PRECONDITION)
        assert "already enrolled" in (refused.details() or "")

    run_with_controller(tmp_path, scenario)
