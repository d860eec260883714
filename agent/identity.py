"""The device's own TLS identity: a key made on the device, the certificate the controller issued for it.

Rules this module keeps:
- the private key is generated here and never leaves the device; only a CSR is sent;
- every renewal uses a new key pair;
- key (mode 0600) and certificate are written atomically, and the pair is only ever used
  together: the pair being replaced is kept as `device.prev.*` first, so a crash between the two
  writes leaves either the new pair or the previous one usable (the controller accepts the
  previous certificate until it expires), never a key with somebody else's certificate;
- the certificate is renewed at two thirds of its lifetime; past its end it cannot be renewed,
  and the device must be enrolled again with a new token.

Pure helpers (`make_key_and_csr`, `renew_at`, `DeviceCredentials.matches`) take no IO.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleet.core.atomic import write_bytes_atomic

TLS_DIR = "tls"
KEY_NAME = "device.key"
CERT_NAME = "device.pem"
PREV_KEY_NAME = "device.prev.key"
PREV_CERT_NAME = "device.prev.pem"
CA_NAME = "ca.pem"
RENEW_AT_FRACTION = 2 / 3


def make_key_and_csr(requested_id: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PKCS#8 PEM) and a CSR for it. The subject is only a hint."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (requested_id or "device")[:64])]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def renew_at(not_before: datetime, not_after: datetime) -> datetime:
    """When a certificate valid over [not_before, not_after] should be replaced."""
    return not_before + (not_after - not_before) * RENEW_AT_FRACTION


@dataclass(frozen=True)
class DeviceCredentials:
    key_pem: bytes
    cert_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def not_before(self) -> datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def renew_at(self) -> datetime:
        return renew_at(self.not_before, self.not_after)

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after

    def matches(self) -> bool:
        """Whether the key belongs to the certificate (and both parse)."""
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
            cert_pub = self.cert.public_key()
        except (ValueError, TypeError):
            return False
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return key.public_key().public_bytes(*fmt) == cert_pub.public_bytes(*fmt)


class CredentialStore:
    """`<data_dir>/tls`: the device key and certificate, their predecessors, and the controller CA."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / TLS_DIR

    def _pair(self, key_name: str, cert_name: str) -> DeviceCredentials | None:
        try:
            key_pem = (self.directory / key_name).read_bytes()
            creds = DeviceCredentials(key_pem, (self.directory / cert_name).read_bytes())
        except FileNotFoundError:
            return None
        return creds if creds.matches() else None

    def load(self) -> DeviceCredentials | None:
        """The current pair, or the previous one when a crash interrupted a replacement."""
        return self._pair(KEY_NAME, CERT_NAME) or self._pair(PREV_KEY_NAME, PREV_CERT_NAME)

    def save(self, creds: DeviceCredentials) -> None:
        if not creds.matches():
            raise ValueError("the certificate does not belong to the key")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        current = self._pair(KEY_NAME, CERT_NAME)
        if current is not None:
            write_bytes_atomic(self.directory / PREV_KEY_NAME, current.key_pem, mode=0o600)
            write_bytes_atomic(self.directory / PREV_CERT_NAME, current.cert_pem, mode=0o644)
        write_bytes_atomic(self.directory / KEY_NAME, creds.key_pem, mode=0o600)
        write_bytes_atomic(self.directory / CERT_NAME, creds.cert_pem, mode=0o644)

    def load_ca(self) -> bytes | None:
        try:
            return (self.directory / CA_NAME).read_bytes()
        except FileNotFoundError:
            return None

    def save_ca(self, ca_pem: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_bytes_atomic(self.directory / CA_NAME, ca_pem, mode=0o644)
