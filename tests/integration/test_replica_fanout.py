"""A desired-state change made on one replica reaches a Sync stream held by another, fast.

Two controllers in one process share a PostgreSQL database; a device's stream is open on
replica B; replica A changes the device's desired state the way its reconciler does (commit,
then `on_desired_changed`). B wakes through LISTEN/NOTIFY and pushes the new generation.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet.controller.models import Device
from fleet.controller.pki import load_or_create_ca
from fleet.controller.server import Controller
from fleet.controller.settings import ControllerSettings
from fleet.proto.fleet.v1 import fleet_pb2 as pb
from fleet.proto.fleet.v1 import fleet_pb2_grpc as pb_grpc

from .agent_client import DeviceIdentity, mtls_channel

psycopg = pytest.importorskip("psycopg")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def db_url() -> Iterator[str]:
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc}")
    name = f"fleet_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


ADMIN_TOKEN = secrets.token_urlsafe(32)


def test_change_on_one_replica_reaches_stream_on_another(tmp_path: Path, db_url: str) -> None:
    def settings(name: str) -> ControllerSettings:
        # Every replica signs and checks device certificates with the same CA (as from one Secret).
        return ControllerSettings(data_dir=tmp_path / name, db_url=db_url, http_port=_port(), grpc_port=_port(),
                                  grpc_enroll_port=_port(), reconcile_interval_s=0.5,
                                  ca_cert_file=tmp_path / "ca" / "ca.pem", ca_key_file=tmp_path / "ca" / "ca.key",
                                  admin_token=ADMIN_TOKEN)

    load_or_create_ca(tmp_path / "ca")
    a, b = Controller(settings("a")), Controller(settings("b"))

    async def main() -> float:
        tasks = [asyncio.create_task(a.serve()), asyncio.create_task(b.serve())]
        for replica in (a, b):
            assert await asyncio.to_thread(replica.started.wait, 30)
        try:
            url_a = f"http://127.0.0.1:{a.settings.http_port}"
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
                token = (await http.post(f"{url_a}/api/v1/enrollment-tokens", json={"max_uses": 1})).json()["token"]
            cam = DeviceIdentity(a, "cam-1")
            await cam.enroll(token)  # enrolled through A, connected through B
            async with mtls_channel(b, cam.key_pem, cam.cert_pem) as channel:
                stub = pb_grpc.AgentServiceStub(channel)

                async def hello() -> object:
                    yield pb.AgentMessage(hello=pb.Hello(device_id="cam-1"))
                    await asyncio.sleep(60)

                call = stub.Sync(hello())
                first = await asyncio.wait_for(call.read(), 10)
                assert first.WhichOneof("kind") == "desired"
                await asyncio.sleep(1.5)  # both replicas listening

                def change_on_a() -> None:
                    with a.ctx.session_factory() as session, session.begin():
                        device = session.get(Device, "cam-1")
                        assert device is not None
                        device.desired = {**(device.desired or {}), "telemetry_interval_ms": 1234}
                        device.desired_generation = first.desired.generation + 1
                    a.ctx.on_desired_changed(["cam-1"])

                started = time.monotonic()
                await asyncio.to_thread(change_on_a)
                while True:
                    message = await asyncio.wait_for(call.read(), 10)
                    if message.WhichOneof("kind") == "desired":
                        break
                elapsed = time.monotonic() - started
                assert message.desired.generation == first.desired.generation + 1
                assert message.desired.telemetry_interval_ms == 1234
                call.cancel()
                return elapsed
        finally:
            a.stop()
            b.stop()
            await asyncio.gather(*tasks)

    elapsed = asyncio.run(main())
    assert elapsed < 1.0, f"cross-replica delivery took {elapsed:.3f}s"


def test_two_replicas_cannot_both_publish_the_next_targets(tmp_path: Path, db_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fleet.controller.context import build_context
    from fleet.controller.tuf_store import SqlMetadataStore
    from fleet.core.errors import ConflictError
    from fleet.core.trust import add_target, generate_key_pair, load_public_key, load_signer, new_root

    # Given two replicas' repositories over one database (same online key, as from one Secret)
    a = build_context(ControllerSettings(data_dir=tmp_path / "shared", db_url=db_url))
    b = build_context(ControllerSettings(data_dir=tmp_path / "shared", db_url=db_url))
    assert isinstance(a.trust._store, SqlMetadataStore)
    generate_key_pair(tmp_path / "release.key")
    signer = load_signer(tmp_path / "release.key")
    root = new_root(signer, load_public_key(tmp_path / "release.pub"), a.trust.online_public_key())
    a.trust.install_root(root)
    assert b.trust.get("root.json") == root  # one repository, seen from both

    # When both accept a different "targets version 1" at the same time
    def push(ctx: object, name: str) -> str:
        targets = add_target(None, root, signer, target_path=f"{name}/v1/bundle.tar", length=1,
                             sha256="0" * 64, custom={})
        try:
            ctx.trust.accept_targets(targets)  # type: ignore[attr-defined]
        except ConflictError:
            return "conflict"
        return "accepted"

    with ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(push, (a, b), ("one", "two")))

    # Then exactly one wins; the other is told to retry on top of it
    assert results == ["accepted", "conflict"]
    a.close()
    b.close()
