"""Operator access over a real HTTPS controller, driven through the real `fleet` CLI.

Given a controller process-in-a-thread serving REST over HTTPS with a certificate made here
(its own test CA) and an admin token from the configuration,
when an operator uses the CLI with the CA certificate and tokens of different roles,
then TLS is verified, tokens are made, listed and revoked, a weak role or a missing token is one
clear CLI line (never a traceback), `fleet login` stores a private config the CLI then uses, and
`fleet controller token create` makes a working token straight on the database.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleet.controller.server import Controller
from fleet.controller.settings import ControllerSettings
from fleet.core.errors import InvalidInputError


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1/localhost signed by it: (ca, cert, key)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet controller")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[2], 0o600)
    return paths


@dataclass
class Running:
    url: str
    ca: Path
    admin: str
    data_dir: Path
    home: Path

    def fleet(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items()
                if k not in ("FLEET_TOKEN", "FLEET_URL", "FLEET_CA_CERT", "FLEET_CONFIG")}
        base["FLEET_CONFIG"] = str(self.home / "config.toml")
        return subprocess.run([sys.executable, "-m", "fleet.cli.main", *args], capture_output=True, text=True,
                              env={**base, **(env or {})}, timeout=60, check=False)


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("https")
    ca, cert, key = make_tls(root / "tls")
    admin = secrets.token_urlsafe(32)
    settings = ControllerSettings(data_dir=root / "controller", http_port=_port(), grpc_port=_port(),
                                  grpc_enroll_port=_port(), http_tls=True, http_tls_cert=cert, http_tls_key=key,
                                  admin_token=admin)
    controller = Controller(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(controller.serve(),), daemon=True)
    thread.start()
    assert controller.started.wait(30), "controller did not start"
    url = f"https://127.0.0.1:{settings.http_port}"
    try:
        # `started` is set as uvicorn begins to start: wait until it answers.
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/healthz", verify=ssl.create_default_context(cafile=str(ca))).status_code == 200:
                    break
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield Running(url=url, ca=ca, admin=admin, data_dir=settings.data_dir, home=root / "home")
    finally:
        loop.call_soon_threadsafe(controller.stop)
        thread.join(15)
        controller.ctx.close()


def test_rest_is_served_over_verified_tls(https: Running) -> None:
    # Verified against the test CA, a token works
    with httpx.Client(verify=ssl.create_default_context(cafile=str(https.ca))) as http:
        who = http.get(f"{https.url}/api/v1/whoami", headers={"Authorization": f"Bearer {https.admin}"})
        assert who.status_code == 200 and who.json()["role"] == "admin"
        assert http.get(f"{https.url}/healthz").status_code == 200
    # Without the CA the certificate is not trusted; plain HTTP on the TLS port gets no answer
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{https.url}/healthz")
    with pytest.raises(httpx.HTTPError):
        httpx.get(https.url.replace("https://", "http://") + "/healthz", timeout=5)


def test_cli_tokens_roles_and_messages(https: Running) -> None:
    as_admin = {"FLEET_URL": https.url, "FLEET_TOKEN": https.admin, "FLEET_CA_CERT": str(https.ca)}

    # Given an admin making a viewer token for a dashboard, valid 30 days
    made = https.fleet("access", "create", "wall-screen", "--role", "viewer", "--ttl", "30d", "-o", "json",
                       env=as_admin)
    assert made.returncode == 0, made.stderr
    viewer = json.loads(made.stdout)
    assert viewer["role"] == "viewer" and viewer["token"].startswith(f"fleet_{viewer['id']}_")
    expires = datetime.fromisoformat(viewer["expires_at"])
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)

    # When the viewer token is used: reads work, changes are refused in one clear line
    as_viewer = {**as_admin, "FLEET_TOKEN": viewer["token"]}
    who = https.fleet("whoami", "-o", "json", env=as_viewer)
    assert json.loads(who.stdout) == {"kind": "token", "id": viewer["id"], "name": "wall-screen", "role": "viewer"}
    assert https.fleet("models", "ls", "-o", "json", env=as_viewer).returncode == 0
    refused = https.fleet("rollout", "abort", "any", env=as_viewer)
    assert refused.returncode == 1 and "403" in refused.stderr and "needs the operator role" in refused.stderr
    assert "Traceback" not in refused.stderr

    # And the global --token option wins over the environment
    via_option = https.fleet("--token", https.admin, "whoami", "-o", "json", env=as_viewer)
    assert json.loads(via_option.stdout)["role"] == "admin"

    # And no token at all says how to give one
    anonymous = https.fleet("devices", "ls", env={"FLEET_URL": https.url, "FLEET_CA_CERT": str(https.ca)})
    assert anonymous.returncode == 1 and "401" in anonymous.stderr
    assert "FLEET_TOKEN" in anonymous.stderr and "fleet login" in anonymous.stderr

    # And the listing shows it without secrets; revoking it refuses it at once
    listing = json.loads(https.fleet("access", "ls", "-o", "json", env=as_admin).stdout)
    assert {t["name"] for t in listing} >= {"wall-screen", "bootstrap-admin"}
    assert all("token" not in t and "token_hash" not in t for t in listing)
    assert https.fleet("access", "revoke", viewer["id"], env=as_admin).returncode == 0
    gone = https.fleet("whoami", env=as_viewer)
    assert gone.returncode == 1 and "revoked" in gone.stderr

    # And without the CA the CLI does not trust the controller
    untrusted = https.fleet("whoami", env={"FLEET_URL": https.url, "FLEET_TOKEN": https.admin})
    assert untrusted.returncode == 1 and "certificate" in untrusted.stderr.lower()


def test_login_writes_a_private_config_the_cli_uses(https: Running) -> None:
    login = https.fleet("login", "--token", https.admin, "--url", https.url, "--ca-cert", str(https.ca))
    assert login.returncode == 0, login.stderr
    config = https.home / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert https.admin in config.read_text()
    who = https.fleet("whoami", "-o", "json")  # nothing but the config file
    assert who.returncode == 0, who.stderr
    assert json.loads(who.stdout)["name"] == "bootstrap-admin"
    bad = https.fleet("login", "--token", "fleet_000000000000_" + "A" * 43, "--url", https.url,
                      "--ca-cert", str(https.ca))
    assert bad.returncode == 1 and "not valid" in bad.stderr
    assert https.admin in config.read_text()  # a refused token does not replace a working one


def test_recovery_token_straight_on_the_database(https: Running) -> None:
    made = https.fleet("controller", "token", "create", "--role", "operator", "--name", "recovery",
                       "--data-dir", str(https.data_dir))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("fleet_") and "shown only now" in made.stderr
    who = https.fleet("whoami", "-o", "json",
                      env={"FLEET_URL": https.url, "FLEET_TOKEN": token, "FLEET_CA_CERT": str(https.ca)})
    assert json.loads(who.stdout)["role"] == "operator"


def test_https_with_half_a_certificate_pair_is_refused(tmp_path: Path) -> None:
    _ca, cert, _key = make_tls(tmp_path / "tls")
    settings = ControllerSettings(data_dir=tmp_path / "controller", http_tls=True, http_tls_cert=cert)
    with pytest.raises(InvalidInputError, match="http_tls_cert and http_tls_key go together"):
        Controller(settings)
    assert not (tmp_path / "controller" / "fleet.db").exists()  # refused before any state was made


def test_https_without_certificate_files_uses_the_controllers_own_ca(tmp_path: Path) -> None:
    """With FLEET_HTTP_TLS alone, REST is served with the certificate the controller's CA issued for
    its configured names, so agents and the CLI verify it with the same ca.pem they were given."""
    settings = ControllerSettings(data_dir=tmp_path / "controller", http_port=_port(), grpc_port=_port(),
                                  grpc_enroll_port=_port(), http_tls=True)
    controller = Controller(settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(controller.serve(),), daemon=True)
    thread.start()
    try:
        assert controller.started.wait(30), "controller did not start"
        ca = settings.tls_dir / "ca.pem"
        verify = ssl.create_default_context(cafile=str(ca))
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"https://127.0.0.1:{settings.http_port}/healthz", verify=verify)
                break
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert response.status_code == 200
        with pytest.raises(httpx.ConnectError):  # a client that trusts only the public CAs refuses it
            httpx.get(f"https://127.0.0.1:{settings.http_port}/healthz")
    finally:
        loop.call_soon_threadsafe(controller.stop)
        thread.join(15)
        controller.ctx.close()
