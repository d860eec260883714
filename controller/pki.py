"""The controller's certificate authority for device identity over mutual TLS.

Rules this module enforces:

- The CA is an ECDSA P-256 key made on first start under `<data_dir>/tls` (key file mode 0600),
  unless an operator provides one (`ca_cert_file`/`ca_key_file`, e.g. from a Kubernetes Secret,
  which every replica must share). Its certificate is what agents pin (`--ca-cert`).
- The controller's own server certificate is issued by that CA for exactly the configured names
  (DNS names and IP addresses); it is re-issued when the names change or it nears expiry.
- A device certificate says only what the controller decides: the CSR's self-signature must
  verify and its key must be EC P-256/P-384 or Ed25519, but its subject and extensions are
  ignored. The certificate names the device id chosen by the controller (CN and the SAN URI
  `spiffe://edge-fleet/device/<id>`), allows client authentication only, lives
  `device_cert_ttl_hours`, and has a random 128-bit serial.
- A peer's device id is read from that SAN URI (the CN must agree), never from anything the
  peer sends in a message.

Everything except `load_or_create_ca` and `ensure_server_certificate` is a pure function of its
arguments (time included), so the rules are unit-tested without files or sockets.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.core.atomic import write_bytes_atomic
from fleet.core.errors import AuthenticationError, FleetError, InvalidInputError

SPIFFE_PREFIX = "spiffe://edge-fleet/device/"
CA_LIFETIME = timedelta(days=3650)
SERVER_LIFETIME = timedelta(days=365)
# A server certificate with less than this left is re-issued at start-up.
SERVER_RENEW_BEFORE = timedelta(days=30)
# Certificates start a little in the past so a device whose clock lags slightly accepts them.
BACKDATE = timedelta(minutes=5)
MAX_CSR_BYTES = 16 * 1024
CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class CertificateError(FleetError):
    """The controller's CA or server certificate files are missing, unreadable or inconsistent."""

    code = "certificate"


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: CaKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class IssuedCertificate:
    cert: x509.Certificate
    device_id: str

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def serial(self) -> str:
        return serial_hex(self.cert)

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc


def serial_hex(cert: x509.Certificate) -> str:
    """A certificate's serial as lowercase hex, the form stored in `devices.cert_serial`."""
    return format(cert.serial_number, "x")


def _random_serial() -> int:
    # 128 random bits with the top bit cleared: positive, under RFC 5280's 20-octet limit.
    return secrets.randbits(127) | 1


def _sign_hash(key: CaKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def key_pem(key: ec.EllipticCurvePrivateKey | CaKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# -- the CA -----------------------------------------------------------------------------------------


def create_ca(now: datetime, common_name: str = "edge-fleet device CA") -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-fleet")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def load_ca(cert_pem: bytes, key_pem_bytes: bytes) -> CertificateAuthority:
    """A CA from PEM files; the key must belong to the certificate, which must be a CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem_bytes, password=None)
    except ValueError as exc:
        raise CertificateError(f"cannot read the CA certificate or key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise CertificateError(f"unsupported CA key type {type(key).__name__}: use EC, RSA or Ed25519")
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert_pub = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub != cert_pub:
        raise CertificateError("the CA key does not belong to the CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError("the CA certificate is not a CA (basicConstraints CA:TRUE missing)")
    return CertificateAuthority(cert=cert, key=key)


def load_or_create_ca(tls_dir: Path, cert_file: Path | None = None, key_file: Path | None = None,
                      now: datetime | None = None) -> CertificateAuthority:
    """The configured CA, or the one under `tls_dir`, made there on first start."""
    if (cert_file is None) != (key_file is None):
        raise CertificateError("set both ca_cert_file and ca_key_file, or neither")
    if cert_file is not None and key_file is not None:
        try:
            return load_ca(Path(cert_file).read_bytes(), Path(key_file).read_bytes())
        except OSError as exc:
            raise CertificateError(f"cannot read the configured CA files: {exc}") from exc
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = tls_dir / CA_CERT_NAME, tls_dir / CA_KEY_NAME
    if cert_path.exists() and key_path.exists():
        return load_ca(cert_path.read_bytes(), key_path.read_bytes())
    if cert_path.exists() or key_path.exists():
        raise CertificateError(f"{tls_dir} holds only half of the CA ({CA_CERT_NAME}, {CA_KEY_NAME}); "
                               "restore the missing file or remove both to make a new CA (every device "
                               "must then enrol again)")
    ca = create_ca(now or datetime.now(UTC))
    write_bytes_atomic(key_path, key_pem(ca.key), mode=0o600)  # key first: a cert alone is refused above
    write_bytes_atomic(cert_path, ca.cert_pem, mode=0o644)
    return ca


# -- the controller's server certificate -------------------------------------------------------------


def parse_server_names(text: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise InvalidInputError("tls_server_names must name at least one DNS name or IP address")
    return names


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def issue_server_certificate(
    ca: CertificateAuthority, names: list[str], now: datetime, lifetime: timedelta = SERVER_LIFETIME
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + lifetime, ca.cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, _sign_hash(ca.key))
    )
    return cert, key


def server_certificate_current(cert: x509.Certificate, ca: CertificateAuthority, names: list[str],
                               now: datetime) -> bool:
    """Whether `cert` was issued by `ca` for exactly `names` and has enough life left."""
    if cert.issuer != ca.cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    if set(san) != set(_san_entries(names)):
        return False
    return cert.not_valid_after_utc - now > SERVER_RENEW_BEFORE and cert.not_valid_before_utc <= now


def ensure_server_certificate(ca: CertificateAuthority, tls_dir: Path, names: list[str],
                              now: datetime | None = None) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of the controller's server certificate, re-issued when stale."""
    now = now or datetime.now(UTC)
    cert_path, key_path = tls_dir / SERVER_CERT_NAME, tls_dir / SERVER_KEY_NAME
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if server_certificate_current(cert, ca, names, now):
                return key_path.read_bytes(), cert_path.read_bytes()
        except ValueError:
            pass  # unreadable: issue a new one
    cert, key = issue_server_certificate(ca, names, now)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_bytes_atomic(key_path, key_pem(key), mode=0o600)
    write_bytes_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return key_path.read_bytes(), cert_path.read_bytes()


# -- device certificates -----------------------------------------------------------------------------


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A CSR whose self-signature verifies and whose key is EC P-256/P-384 or Ed25519."""
    if not csr_pem:
        raise InvalidInputError("a certificate signing request (csr_pem) is required: update the agent")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise InvalidInputError(f"certificate signing request is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInputError(f"certificate signing request is not a PEM CSR: {exc}") from exc
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"certificate signing request has an unreadable key: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise InvalidInputError(f"device key curve {key.curve.name} is not accepted: use P-256 or P-384")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidInputError(f"device key type {type(key).__name__} is not accepted: use EC P-256/P-384 or Ed25519")
    if not csr.is_signature_valid:
        raise InvalidInputError("certificate signing request signature does not verify")
    return csr


def device_uri(device_id: str) -> str:
    return SPIFFE_PREFIX + device_id


def sign_device_csr(ca: CertificateAuthority, csr: x509.CertificateSigningRequest, device_id: str,
                    now: datetime, lifetime: timedelta) -> IssuedCertificate:
    """A client certificate for `device_id` over the CSR's key; everything else in the CSR is ignored."""
    not_after = min(now + lifetime, ca.cert.not_valid_after_utc)
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)  # checked by load_csr
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(_random_serial())
        # Backdated a little for clock skew, but never so much that it moves the renewal point
        # (two thirds of not_before..not_after) far ahead of issuance.
        .not_valid_before(now - min(BACKDATE, lifetime / 10))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(device_id))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, _sign_hash(ca.key))
    )
    return IssuedCertificate(cert=cert, device_id=device_id)


@dataclass(frozen=True)
class PeerIdentity:
    device_id: str
    serial: str
    not_after: datetime


def peer_identity(cert_pem: bytes) -> PeerIdentity:
    """The device a verified peer certificate names (its SAN URI, which the CN must match)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise AuthenticationError(f"client certificate cannot be read: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    uris = [u for u in (san.get_values_for_type(x509.UniformResourceIdentifier) if san else [])
            if u.startswith(SPIFFE_PREFIX)]
    if len(uris) != 1:
        raise AuthenticationError("client certificate names no device: enrol the device to get one")
    device_id = uris[0][len(SPIFFE_PREFIX):]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not device_id or cns != [device_id]:
        raise AuthenticationError("client certificate's common name and device URI disagree")
    return PeerIdentity(device_id=device_id, serial=serial_hex(cert), not_after=cert.not_valid_after_utc)
