"""The agent's identity lifecycle against a live controller: enrol over TLS, sync over mutual TLS,
renew before expiry and reconnect, and say clearly when it must be enrolled again.

The agent runs in-process (`Agent.run` on the test's event loop) next to an in-process controller,
with a device certificate lifetime of seconds so renewals happen during the test.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from fleet.agent.daemon import Agent, AgentConfig
from fleet.agent.identity import CredentialStore, DeviceCredentials, make_key_and_csr
from fleet.controller import pki
from fleet.controller.server import Controller
from fleet.core.errors import FleetError
from fleet.core.trust import generate_key_pair, load_public_key, load_signer, new_root

from .agent_client import device_json, run_with_controller, token


def make_root(tmp_path: Path, controller: Controller) -> Path:
    generate_key_pair(tmp_path / "release.key")
    root = new_root(load_signer(tmp_path / "release.key"), load_public_key(tmp_path / "release.pub"),
                    controller.ctx.trust.online_public_key())
    (tmp_path / "root.json").write_bytes(root)
    return tmp_path / "root.json"


def agent_config(tmp_path: Path, controller: Controller, url: str, **overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "data_dir": tmp_path / "agent", "controller_grpc": f"127.0.0.1:{controller.grpc_port}",
        "controller_enroll": f"127.0.0.1:{controller.grpc_enroll_port}", "controller_url": url,
        "trust_root": make_root(tmp_path, controller), "ca_cert": controller.settings.tls_dir / "ca.pem",
        "device_id": "cam-1", "inference_addr": "127.0.0.1:0", "metrics_addr": "", "labels": {"site": "lab"},
    }
    values.update(overrides)
    return AgentConfig(**values)  # type: ignore[arg-type]


async def wait_for(what: str, check: object, timeout: float = 20) -> object:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        result = check()  # type: ignore[operator]
        if inspect.isawaitable(result):
            try:
                result = await result
            except httpx.HTTPStatusError:  # not there yet
                result = None
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_agent_enrols_renews_and_reconnects(tmp_path: Path) -> None:
    async def scenario(controller: Controller, target: str, url: str) -> None:
        agent = Agent(agent_config(tmp_path, controller, url, enroll_token=await token(url)))
        task = asyncio.create_task(agent.run())
        try:
            # Given an agent that enrolled with a key it made itself
            await wait_for("connected", lambda: agent.connected)
            first = await device_json(url, "cam-1")
            tls = tmp_path / "agent" / "tls"
            assert stat.S_IMODE(os.stat(tls / "device.key").st_mode) == 0o600
            cert = x509.load_pem_x509_certificate((tls / "device.pem").read_bytes())
            assert cert.subject.rfc4514_string() == "CN=cam-1"
            # Its bundle downloads carry its credentials to the controller, never to another origin
            own = agent.http.build_request("GET", f"{agent.config.controller_url}/api/v1/models/m/versions/1/bundle")
            agent._device_credentials(own)
            assert own.headers["x-fleet-device-id"] == "cam-1"
            assert own.headers["authorization"] == f"Bearer {agent.identity['secret']}"
            elsewhere = agent.http.build_request("GET", "https://bucket.s3.example.com/m/1/bundle.tar")
            agent._device_credentials(elsewhere)
            assert "authorization" not in elsewhere.headers and "x-fleet-device-id" not in elsewhere.headers
            serials = {pki.serial_hex(cert)}
            assert first["cert_serial"] in serials

            # When its certificate reaches two thirds of its (6 s) life, it renews with a new key...
            first_key = (tls / "device.key").read_bytes()

            async def renewed_twice() -> bool:
                device = await device_json(url, "cam-1")
                serials.add(device["cert_serial"])
                return len(serials) >= 3 and device["connected"]

            await wait_for("two renewals", renewed_twice, 30)
            assert (tls / "device.key").read_bytes() != first_key
            # ...and its stream runs on the newest certificate, still connected
            current = x509.load_pem_x509_certificate((tls / "device.pem").read_bytes())
            await wait_for("connected on the new certificate",
                           lambda: agent.connected and pki.serial_hex(current) in serials)
            device = await device_json(url, "cam-1")
            assert device["connected"] and device["cert_serial"] == pki.serial_hex(current)
        finally:
            agent.stop()
            await asyncio.wait_for(task, 20)

    run_with_controller(tmp_path, scenario, device_cert_ttl_hours=6 / 3600)


def test_agent_with_an_expired_certificate_says_it_must_be_enrolled_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(controller: Controller, target: str, url: str) -> None:
        config = agent_config(tmp_path, controller, url)
        # Given a device whose certificate ran out while it was offline
        key_pem, csr_pem = make_key_and_csr("cam-1")
        expired = pki.sign_device_csr(controller.ca, pki.load_csr(csr_pem), "cam-1",
                                      datetime.now(UTC) - timedelta(hours=3), timedelta(hours=1))
        CredentialStore(config.data_dir).save(DeviceCredentials(key_pem, expired.pem))
        (config.data_dir / "identity.json").write_text(json.dumps({"device_id": "cam-1", "secret": "s"}))
        agent = Agent(config)
        with pytest.raises(FleetError, match=r"expired .* must be enrolled again"):
            await agent.renew()
        # When it runs without a token, it keeps its inference endpoint up and says why it cannot sync
        caplog.set_level(logging.ERROR, logger="fleet.agent.daemon")
        task = asyncio.create_task(agent.run())
        try:
            await wait_for("the reason logged", lambda: any("must be enrolled again" in r.getMessage()
                                                            for r in caplog.records))
            assert agent.inference_port and not agent.connected
        finally:
            agent.stop()
            await asyncio.wait_for(task, 20)

        # Then a token pre-authorised for it brings it back under the same id, with a new certificate
        agent = Agent(agent_config(tmp_path / "again", controller, url, data_dir=config.data_dir,
                                   enroll_token=await token(url, device_id="cam-1")))
        await agent.ensure_identity()
        assert agent.creds is not None and not agent.creds.expired(datetime.now(UTC))
        assert (await device_json(url, "cam-1"))["cert_serial"] == pki.serial_hex(agent.creds.cert)

    (tmp_path / "again").mkdir()
    run_with_controller(tmp_path, scenario)


def test_agent_enrolled_before_certificates_is_told_to_re_enrol(tmp_path: Path) -> None:
    async def scenario(controller: Controller, target: str, url: str) -> None:
        config = agent_config(tmp_path, controller, url)
        config.data_dir.mkdir(parents=True)
        (config.data_dir / "identity.json").write_text(json.dumps({"device_id": "cam-1", "secret": "old"}))
        agent = Agent(config)
        with pytest.raises(FleetError, match="enrolled before the controller issued device certificates"):
            await agent.ensure_identity()

    run_with_controller(tmp_path, scenario)
