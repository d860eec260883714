"""A device's side of the controller's gRPC ports, for tests: in-process controller, real TLS on loopback.

`run_with_controller` starts a `Controller` on free ports and runs an async scenario against it;
`DeviceIdentity` makes a key on the "device", enrols over the enrolment port (server TLS) and
opens mutual-TLS channels to the device port with the certificate it got.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

from fleet.agent.identity import make_key_and_csr
from fleet.controller.server import Controller
from fleet.controller.settings import ControllerSettings
from fleet.proto.fleet.v1 import fleet_pb2 as pb
from fleet.proto.fleet.v1 import fleet_pb2_grpc as pb_grpc

# The controller stores this admin token (hashed) at start; REST calls in these tests present it.
ADMIN_TOKEN = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def controller_settings(data_dir: Path, **overrides: Any) -> ControllerSettings:
    values: dict[str, Any] = {"data_dir": data_dir, "http_port": free_port(), "grpc_port": free_port(),
                              "grpc_enroll_port": free_port(), "reconcile_interval_s": 0.2,
                              "admin_token": ADMIN_TOKEN}
    values.update(overrides)
    return ControllerSettings(**values)


def run_with_controller(
    tmp_path: Path, scenario: Callable[[Controller, str, str], Awaitable[None]], **overrides: Any
) -> None:
    """Run `scenario(controller, device_port_address, rest_url)` against a live controller."""
    settings = controller_settings(tmp_path, **overrides)
    controller = Controller(settings)

    async def main() -> None:
        task = asyncio.create_task(controller.serve())
        assert await asyncio.to_thread(controller.started.wait, 30), "controller did not start"
        await _until_listening(f"http://127.0.0.1:{settings.http_port}/healthz")
        try:
            await scenario(controller, f"127.0.0.1:{controller.grpc_port}", f"http://127.0.0.1:{settings.http_port}")
        finally:
            controller.stop()
            await task

    asyncio.run(main())


async def _until_listening(url: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the controller did not answer {url} within {timeout:.0f} s")
            await asyncio.sleep(0.05)


async def token(url: str, uses: int = 1, *, ttl: int = 60, device_id: str | None = None,
                labels: dict[str, str] | None = None) -> str:
    body: dict[str, Any] = {"max_uses": uses, "ttl_seconds": ttl, "labels": labels or {}}
    if device_id:
        body["device_id"] = device_id
    async with httpx.AsyncClient(headers=AUTH) as client:
        response = await client.post(f"{url}/api/v1/enrollment-tokens", json=body)
        response.raise_for_status()
        return str(response.json()["token"])


async def device_json(url: str, device_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(headers=AUTH) as client:
        response = await client.get(f"{url}/api/v1/devices/{device_id}")
        response.raise_for_status()
        return dict(response.json())


def enroll_channel(controller: Controller, **options: Any) -> grpc.aio.Channel:
    """Server-authenticated TLS to the enrolment port (no client certificate)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=controller.ca.cert_pem)
    return grpc.aio.secure_channel(f"127.0.0.1:{controller.grpc_enroll_port}", credentials,
                                   options=list(options.items()))


def mtls_channel(controller: Controller, key_pem: bytes | None, cert_pem: bytes | None,
                 root_pem: bytes | None = None, **options: Any) -> grpc.aio.Channel:
    """TLS to the device port, presenting `cert_pem` (or no certificate when None)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem or controller.ca.cert_pem,
                                               private_key=key_pem, certificate_chain=cert_pem)
    return grpc.aio.secure_channel(f"127.0.0.1:{controller.grpc_port}", credentials, options=list(options.items()))


class DeviceIdentity:
    """One device's key and certificate, as an agent would hold them."""

    def __init__(self, controller: Controller, name: str) -> None:
        self.controller = controller
        self.name = name
        self.key_pem, self.csr_pem = make_key_and_csr(name)
        self.cert_pem: bytes = b""
        self.device_id = ""
        self.secret = ""

    async def enroll(self, tok: str, requested_id: str | None = None, **fields: Any) -> pb.EnrollResponse:
        async with enroll_channel(self.controller) as channel:
            response: pb.EnrollResponse = await pb_grpc.AgentServiceStub(channel).Enroll(
                pb.EnrollRequest(token=tok, requested_id=self.name if requested_id is None else requested_id,
                                 csr_pem=self.csr_pem, **fields),
                timeout=10,
            )
        self.cert_pem, self.device_id, self.secret = bytes(response.certificate_pem), response.device_id, \
            response.device_secret
        return response

    async def renew(self) -> pb.RenewResponse:
        """A new key and certificate; the old ones are returned to the caller via `previous`."""
        key_pem, csr_pem = make_key_and_csr(self.name)
        async with self.channel() as channel:
            response: pb.RenewResponse = await pb_grpc.AgentServiceStub(channel).RenewCertificate(
                pb.RenewRequest(csr_pem=csr_pem), timeout=10
            )
        self.previous = (self.key_pem, self.cert_pem)
        self.key_pem, self.cert_pem = key_pem, bytes(response.certificate_pem)
        return response

    def channel(self, **options: Any) -> grpc.aio.Channel:
        return mtls_channel(self.controller, self.key_pem, self.cert_pem, **options)

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.AgentServiceStub:
        return pb_grpc.AgentServiceStub(channel)


async def hello_stream(device_id: str, outbox: asyncio.Queue[pb.AgentMessage | None],
                       labels: dict[str, str] | None = None) -> AsyncIterator[pb.AgentMessage]:
    yield pb.AgentMessage(hello=pb.Hello(device_id=device_id, labels=labels or {"site": "lab"}))
    while (message := await outbox.get()) is not None:
        yield message
