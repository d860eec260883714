"""The controller CA's rules (fleet.controller.pki) and the device's key handling (fleet.agent.identity)."""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.agent.identity import CredentialStore, DeviceCredentials, make_key_and_csr, renew_at
from fleet.controller import pki
from fleet.core.errors import AuthenticationError, InvalidInputError

NOW = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(hours=24)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca(NOW)


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, *, cn: str = "cam-1",
            extensions: list[x509.ExtensionType] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def test_ca_is_a_p256_ca_for_ten_years(ca: pki.CertificateAuthority) -> None:
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.cert.not_valid_after_utc - NOW == pki.CA_LIFETIME


def test_device_certificate_names_the_controllers_choice_not_the_csrs(ca: pki.CertificateAuthority) -> None:
    # Given a CSR that claims another subject, another device's URI, a DNS name and CA powers
    foreign = csr_for(ec.generate_private_key(ec.SECP256R1()), cn="cam-2", extensions=[
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(pki.SPIFFE_PREFIX + "cam-2"),
                                     x509.DNSName("controller.example")]),
        x509.BasicConstraints(ca=True, path_length=None),
    ])
    # When the controller signs it for cam-1
    issued = pki.sign_device_csr(ca, pki.load_csr(foreign), "cam-1", NOW, DAY)
    cert = issued.cert
    # Then only the controller's choices are in it
    assert cert.subject.rfc4514_string() == "CN=cam-1"
    assert cert.issuer == ca.cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(pki.SPIFFE_PREFIX + "cam-1")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    cert.verify_directly_issued_by(ca.cert)
    assert pki.peer_identity(issued.pem) == pki.PeerIdentity("cam-1", issued.serial, cert.not_valid_after_utc)


def test_device_certificate_lifetime_and_serials(ca: pki.CertificateAuthority) -> None:
    csr = pki.load_csr(csr_for(ec.generate_private_key(ec.SECP384R1())))
    issued = [pki.sign_device_csr(ca, csr, "cam-1", NOW, DAY) for _ in range(20)]
    cert = issued[0].cert
    assert cert.not_valid_after_utc == NOW + DAY
    assert NOW - pki.BACKDATE <= cert.not_valid_before_utc < NOW
    # A very short lifetime is not swallowed by the clock-skew backdating
    short = pki.sign_device_csr(ca, csr, "cam-1", NOW, timedelta(seconds=30)).cert
    assert short.not_valid_after_utc - short.not_valid_before_utc <= timedelta(seconds=33)
    # Never past the CA's own end
    capped = pki.sign_device_csr(ca, csr, "cam-1", NOW, pki.CA_LIFETIME * 2).cert
    assert capped.not_valid_after_utc == ca.cert.not_valid_after_utc
    serials = [i.cert.serial_number for i in issued]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**127 for s in serials)
    assert issued[0].serial == format(serials[0], "x")


@pytest.mark.parametrize("key", [
    pytest.param(ed25519.Ed25519PrivateKey.generate(), id="ed25519"),
    pytest.param(ec.generate_private_key(ec.SECP256R1()), id="p256"),
    pytest.param(ec.generate_private_key(ec.SECP384R1()), id="p384"),
])
def test_accepted_device_keys(ca: pki.CertificateAuthority, key: object) -> None:
    csr = pki.load_csr(csr_for(key))  # type: ignore[arg-type]
    assert pki.sign_device_csr(ca, csr, "cam-1", NOW, DAY).device_id == "cam-1"


@pytest.mark.parametrize(("key", "message"), [
    pytest.param(rsa.generate_private_key(public_exponent=65537, key_size=2048), "not accepted", id="rsa"),
    pytest.param(ec.generate_private_key(ec.SECP521R1()), "P-256 or P-384", id="p521"),
    pytest.param(ec.generate_private_key(ec.SECP256K1()), "P-256 or P-384", id="secp256k1"),
])
def test_refused_device_keys(key: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        pki.load_csr(csr_for(key))  # type: ignore[arg-type]


def test_csr_whose_signature_does_not_verify_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = x509.load_pem_x509_csr(csr_for(key)).public_bytes(serialization.Encoding.DER)
    tampered = bytearray(der)
    tampered[-3] ^= 0x01  # inside the signature
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(tampered))
           + b"-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(InvalidInputError, match=r"signature|not a PEM CSR"):
        pki.load_csr(pem)


@pytest.mark.parametrize("data", [b"", b"not a csr", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END"
                                  b" CERTIFICATE REQUEST-----\n", b"x" * (pki.MAX_CSR_BYTES + 1)])
def test_garbage_csrs_are_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInputError):
        pki.load_csr(data)


def test_peer_identity_needs_a_device_uri_matching_the_cn(ca: pki.CertificateAuthority) -> None:
    server, _ = pki.issue_server_certificate(ca, ["localhost"], NOW)
    with pytest.raises(AuthenticationError, match="names no device"):
        pki.peer_identity(server.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    mismatched = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-2")]))
        .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW).not_valid_after(NOW + DAY)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(pki.SPIFFE_PREFIX + "cam-1")]),
                       critical=False)
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    with pytest.raises(AuthenticationError, match="disagree"):
        pki.peer_identity(mismatched.public_bytes(serialization.Encoding.PEM))


def test_server_certificate_names_and_reissue(tmp_path: Path, ca: pki.CertificateAuthority) -> None:
    names = ["localhost", "127.0.0.1", "fleet-grpc.fleet.svc"]
    key_pem, cert_pem = pki.ensure_server_certificate(ca, tmp_path, names, NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fleet-grpc.fleet.svc"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert stat.S_IMODE(os.stat(tmp_path / pki.SERVER_KEY_NAME).st_mode) == 0o600
    # Same names, plenty of life: kept
    assert pki.ensure_server_certificate(ca, tmp_path, list(reversed(names)), NOW + DAY) == (key_pem, cert_pem)
    # Names changed: re-issued
    _, renamed = pki.ensure_server_certificate(ca, tmp_path, ["localhost"], NOW + DAY)
    assert renamed != cert_pem
    # Near expiry: re-issued
    later = NOW + pki.SERVER_LIFETIME - pki.SERVER_RENEW_BEFORE + DAY
    _, renewed = pki.ensure_server_certificate(ca, tmp_path, ["localhost"], later)
    assert renewed != renamed
    # Another CA: re-issued
    _, other = pki.ensure_server_certificate(pki.create_ca(NOW), tmp_path, ["localhost"], later)
    assert other != renewed


def test_ca_on_disk_made_once_key_private(tmp_path: Path) -> None:
    ca = pki.load_or_create_ca(tmp_path / "tls", now=NOW)
    assert stat.S_IMODE(os.stat(tmp_path / "tls" / pki.CA_KEY_NAME).st_mode) == 0o600
    again = pki.load_or_create_ca(tmp_path / "tls")
    assert again.cert == ca.cert
    # Configured files win; a key that is not the certificate's is refused
    other = pki.create_ca(NOW)
    (tmp_path / "c.pem").write_bytes(other.cert_pem)
    (tmp_path / "k.pem").write_bytes(pki.key_pem(other.key))
    assert pki.load_or_create_ca(tmp_path / "tls", tmp_path / "c.pem", tmp_path / "k.pem").cert == other.cert
    (tmp_path / "k.pem").write_bytes(pki.key_pem(ca.key))
    with pytest.raises(pki.CertificateError, match="does not belong"):
        pki.load_or_create_ca(tmp_path / "tls", tmp_path / "c.pem", tmp_path / "k.pem")
    # Half a CA is never silently replaced
    (tmp_path / "tls" / pki.CA_KEY_NAME).unlink()
    with pytest.raises(pki.CertificateError, match="only half"):
        pki.load_or_create_ca(tmp_path / "tls")


def test_rsa_ca_from_an_operator_signs_device_certificates() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ops CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(NOW - DAY).not_valid_after(NOW + 400 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    ca = pki.load_ca(cert.public_bytes(serialization.Encoding.PEM), pki.key_pem(key))
    issued = pki.sign_device_csr(ca, pki.load_csr(make_key_and_csr("cam-1")[1]), "cam-1", NOW, DAY)
    issued.cert.verify_directly_issued_by(cert)


# -- the device side -------------------------------------------------------------------------------


def test_device_renews_at_two_thirds() -> None:
    assert renew_at(NOW, NOW + timedelta(hours=3)) == NOW + timedelta(hours=2)


def test_credential_store_keeps_a_usable_pair_across_an_interrupted_replacement(
    tmp_path: Path, ca: pki.CertificateAuthority
) -> None:
    def issue(name: str) -> DeviceCredentials:
        key_pem, csr_pem = make_key_and_csr(name)
        cert = pki.sign_device_csr(ca, pki.load_csr(csr_pem), name, datetime.now(UTC), DAY)
        return DeviceCredentials(key_pem, cert.pem)

    store = CredentialStore(tmp_path)
    assert store.load() is None
    first, second = issue("cam-1"), issue("cam-1")
    assert first.key_pem != second.key_pem  # a new key every time
    store.save(first)
    assert store.load() == first
    assert stat.S_IMODE(os.stat(tmp_path / "tls" / "device.key").st_mode) == 0o600
    with pytest.raises(ValueError, match="does not belong"):
        store.save(DeviceCredentials(first.key_pem, second.cert_pem))
    store.save(second)
    assert store.load() == second
    # A crash in the next replacement, after the new key was written but before its certificate:
    # the pair being replaced (kept as device.prev.*) is used, never a key with a foreign certificate
    third = issue("cam-1")
    (tmp_path / "tls" / "device.prev.key").write_bytes(second.key_pem)
    (tmp_path / "tls" / "device.prev.pem").write_bytes(second.cert_pem)
    (tmp_path / "tls" / "device.key").write_bytes(third.key_pem)
    assert store.load() == second
