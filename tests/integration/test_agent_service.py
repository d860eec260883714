"""The controller's agent-facing gRPC service, in-process over real gRPC on loopback.

Enrolment with bounded tokens, the Sync stream's push of desired state, identity checks on
every call, exactly-once telemetry, and the end of a decommissioned device's stream.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from fleet.controller.server import Controller
from fleet.controller.settings import ControllerSettings
from fleet.proto import convert
from fleet.proto.fleet.v1 import fleet_pb2 as pb
from fleet.proto.fleet.v1 import fleet_pb2_grpc as pb_grpc


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The controller stores this admin token (hashed) at start; REST calls below present it.
ADMIN_TOKEN = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def run_with_controller(tmp_path: Path, scenario: Callable[[Controller, str, str], Awaitable[None]]) -> None:
    settings = ControllerSettings(data_dir=tmp_path, http_port=_port(), grpc_port=_port(), reconcile_interval_s=0.2,
                                  admin_token=ADMIN_TOKEN)
    controller = Controller(settings)

    async def main() -> None:
        task = asyncio.create_task(controller.serve())
        assert await asyncio.to_thread(controller.started.wait, 30), "controller did not start"
        try:
            await scenario(controller, f"127.0.0.1:{controller.grpc_port}", f"http://127.0.0.1:{settings.http_port}")
        finally:
            controller.stop()
            await task

    asyncio.run(main())


async def token(url: str, uses: int = 1) -> str:
    async with httpx.AsyncClient(headers=AUTH) as client:
        response = await client.post(f"{url}/api/v1/enrollment-tokens", json={"max_uses": uses, "ttl_seconds": 60})
        response.raise_for_status()
        return str(response.json()["token"])


def creds(device_id: str, secret: str) -> tuple[tuple[str, str], ...]:
    return (("x-fleet-device-id", device_id), ("authorization", f"Bearer {secret}"))


async def hello_stream(device_id: str, outbox: asyncio.Queue[pb.AgentMessage | None]) -> Any:
    yield pb.AgentMessage(hello=pb.Hello(device_id=device_id, labels={"site": "lab"}))
    while (message := await outbox.get()) is not None:
        yield message


def test_enrol_sync_and_identity(tmp_path: Path) -> None:
    async def scenario(controller: Controller, target: str, url: str) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            tok = await token(url, uses=1)
            enrolled = await stub.Enroll(pb.EnrollRequest(token=tok, requested_id="cam-1", labels={"site": "lab"}))
            assert enrolled.device_id == "cam-1" and enrolled.device_secret

            # A single-use token cannot enrol a second device
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await stub.Enroll(pb.EnrollRequest(token=tok, requested_id="cam-2"))
            assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED

            # The stream opens with the current desired state at once
            outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
            call = stub.Sync(hello_stream("cam-1", outbox), metadata=creds("cam-1", enrolled.device_secret))
            first = await asyncio.wait_for(call.read(), 10)
            assert first.WhichOneof("kind") == "desired" and first.desired.generation >= 1

            # Actual state reports are stored
            actual = {"desired_generation": first.desired.generation, "models": []}
            await outbox.put(pb.AgentMessage(state=convert.actual_to_pb(actual)))
            async with httpx.AsyncClient(headers=AUTH) as client:
                for _ in range(50):
                    device = (await client.get(f"{url}/api/v1/devices/cam-1")).json()
                    if device.get("connected") and device["actual"].get("desired_generation"):
                        break
                    await asyncio.sleep(0.1)
            assert device["connected"] and device["actual"]["desired_generation"] == first.desired.generation

            # Telemetry is stored once and acknowledged every time
            batch = {"seq": 7, "window_start_ms": 1, "window_end_ms": 2, "windows": [], "events": []}
            report = convert.report_to_pb("cam-1", [batch], None)
            for _ in range(2):
                ack = await stub.ReportTelemetry(report, metadata=creds("cam-1", enrolled.device_secret))
                assert list(ack.stored) == [7]

            # Wrong secret, or a hello naming another device, is refused
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stub.ReportTelemetry(report, metadata=creds("cam-1", "nope"))
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
            other = stub.Sync(hello_stream("cam-9", asyncio.Queue()), metadata=creds("cam-1", enrolled.device_secret))
            with pytest.raises(grpc.aio.AioRpcError) as spoof:
                await asyncio.wait_for(other.read(), 10)
            assert spoof.value.code() == grpc.StatusCode.PERMISSION_DENIED

            # Decommissioning ends the open stream and its credentials stop working
            async with httpx.AsyncClient(headers=AUTH) as client:
                (await client.post(f"{url}/api/v1/devices/cam-1/decommission")).raise_for_status()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    await asyncio.wait_for(call.read(), 10)
            assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await outbox.put(None)

    run_with_controller(tmp_path, scenario)
