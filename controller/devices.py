"""Device identity and reports: enrolment tokens, enrolment, authentication, state and telemetry.

Rules this module enforces:

- Secrets are never stored: enrolment tokens and device secrets are kept as SHA-256 hashes
  (both are 256-bit random values, so a plain hash is enough; no password stretching needed)
  and compared in constant time.
- An enrolment token works only while it exists, is not revoked, has not expired and has uses
  left; each failure is its own `AuthenticationError` message so an operator can tell them
  apart. A use is counted with a conditional UPDATE, so two devices racing for the last use of
  a token cannot both win, on SQLite or PostgreSQL.
- A device id is taken once: enrolling an id that is already enrolled is a `ConflictError`
  (the running device keeps its identity); a decommissioned id may be enrolled again, and so
  may an enrolled one with a token the operator pre-authorised for exactly that id (a device
  whose certificate expired offline). Either way the old certificate stops working.
- A token pre-authorised to a device id enrols that id only.
- A device's gRPC identity is its client certificate: the controller accepts the serial it
  issued last (`cert_serial`) and, until that certificate expires, the one it replaced
  (`prev_cert_serial`); a decommissioned device has none.
- Labels decide which rollouts reach a device, so the operator's word wins: labels attached to
  the enrolment token override labels the device proposes for the same key, and a later
  `hello` may add new label keys but never changes an existing one.
- Telemetry batches are stored exactly once per (device, seq); a replayed batch is
  acknowledged again but not stored twice.

Service functions take a `Session` and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from fleet.controller.models import Device, EnrollmentToken, TelemetryBatchSeen, TelemetryWindow, UpdateEvent
from fleet.controller.pki import IssuedCertificate, PeerIdentity
from fleet.core import rollout as rollout_rules
from fleet.core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)

DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
LABEL_VALUE_MAX = 128
MAX_LABELS = 64
MAX_TOKEN_USES = 1_000_000
MAX_TOKEN_TTL_S = 366 * 24 * 3600
# Bounds on one telemetry call: an agent flushing a long offline spool sends many small calls.
MAX_BATCHES_PER_CALL = 1000
MAX_WINDOWS_PER_BATCH = 1000
MAX_EVENTS_PER_BATCH = 1000
RECENT_EVENTS = 20


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def check_labels(labels: Mapping[str, Any] | None, *, what: str = "labels") -> dict[str, str]:
    """Validate a label map: string keys and values, bounded in number and length."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidInputError(f"{what} must be an object of string keys and values")
    if len(labels) > MAX_LABELS:
        raise InvalidInputError(f"{what}: at most {MAX_LABELS} labels, got {len(labels)}")
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
            raise InvalidInputError(
                f"{what}: key {key!r} must be 1-128 letters, digits, '.', '_', '/' or '-'"
            )
        if not isinstance(value, str) or len(value) > LABEL_VALUE_MAX or "," in value or "=" in value:
            raise InvalidInputError(
                f"{what}: value of {key!r} must be a string of at most {LABEL_VALUE_MAX} characters "
                "without ',' or '='"
            )
        out[key] = value
    return out


def parse_selector(text: str | None) -> dict[str, str]:
    """`"k=v,k2=v2"` as a label selector dict; empty or None selects every device."""
    return rollout_rules.parse_selector(text)


def sanitize_device_id(requested: str) -> str:
    """A device id from what the device asked for: lowercase, unsafe characters replaced by '-'.

    Empty or unusable requests get a random id, so a device without a hostname still enrols.
    """
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", (requested or "").strip().lower())
    cleaned = cleaned.lstrip("._-")[:63].rstrip("._-")
    if not cleaned or not DEVICE_ID_RE.match(cleaned):
        return f"device-{secrets.token_hex(4)}"
    return cleaned


# -- enrolment tokens ------------------------------------------------------------------------------


def create_enrollment_token(
    session: Session,
    *,
    max_uses: int = 1,
    ttl_s: float = 3600,
    labels: Mapping[str, Any] | None = None,
    device_id: str | None = None,
) -> tuple[str, EnrollmentToken]:
    """A new bootstrap token. The plaintext is returned here once and never stored.

    With `device_id`, only a device enrolling under exactly that id may use it.
    """
    if isinstance(max_uses, bool) or not 1 <= max_uses <= MAX_TOKEN_USES:
        raise InvalidInputError(f"max_uses must be between 1 and {MAX_TOKEN_USES}, got {max_uses}")
    if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
        raise InvalidInputError(f"ttl must be between 1 second and {MAX_TOKEN_TTL_S} seconds, got {ttl_s}")
    if device_id is not None and not DEVICE_ID_RE.match(device_id):
        raise InvalidInputError(
            f"device id {device_id!r} must be 1-63 lowercase letters, digits, '.', '_' or '-', starting with "
            "a letter or digit"
        )
    plaintext = secrets.token_urlsafe(32)
    now = _now()
    token = EnrollmentToken(
        id=f"tok-{secrets.token_hex(4)}",
        token_hash=hash_secret(plaintext),
        max_uses=max_uses,
        uses=0,
        expires_at=now + timedelta(seconds=ttl_s),
        labels=check_labels(labels, what="token labels"),
        created_at=now,
        revoked=False,
        device_id=device_id,
    )
    session.add(token)
    session.flush()
    return plaintext, token


def list_enrollment_tokens(session: Session) -> list[EnrollmentToken]:
    return list(session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.created_at.desc())))


def revoke_enrollment_token(session: Session, token_id: str) -> EnrollmentToken:
    token = session.get(EnrollmentToken, token_id)
    if token is None:
        raise NotFoundError(f"enrolment token {token_id!r} not found", token_id=token_id)
    token.revoked = True
    session.flush()
    return token


def _find_token(session: Session, plaintext: str) -> EnrollmentToken:
    """The token for this plaintext if it may still be used; its use is not counted yet."""
    if not plaintext:
        raise AuthenticationError("an enrolment token is required: create one with the controller's API")
    token = session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_secret(plaintext))
    )
    if token is None:
        raise AuthenticationError("enrolment token is not valid: check it was copied whole")
    if token.revoked:
        raise AuthenticationError(f"enrolment token {token.id} has been revoked", token_id=token.id)
    if token.expires_at <= _now():
        raise AuthenticationError(
            f"enrolment token {token.id} expired at {token.expires_at.isoformat()}; create a new one",
            token_id=token.id,
        )
    if token.uses >= token.max_uses:
        raise AuthenticationError(
            f"enrolment token {token.id} has been used up ({token.max_uses} of {token.max_uses} uses)",
            token_id=token.id,
        )
    return token


def _consume_token(session: Session, token: EnrollmentToken) -> EnrollmentToken:
    # Conditional increment: only one of several concurrent enrolments can take the last use.
    result = session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.id == token.id, EnrollmentToken.uses < EnrollmentToken.max_uses)
        .values(uses=EnrollmentToken.uses + 1)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise AuthenticationError(
            f"enrolment token {token.id} has been used up ({token.max_uses} of {token.max_uses} uses)",
            token_id=token.id,
        )
    session.refresh(token)
    return token


# -- devices --------------------------------------------------------------------------------------


def enroll(
    session: Session,
    *,
    token: str,
    requested_id: str,
    labels: Mapping[str, Any] | None,
    hardware: Mapping[str, Any] | None,
    agent_version: str,
    issue: Callable[[str], IssuedCertificate] | None = None,
) -> tuple[Device, str]:
    """Trade a bootstrap token for a device identity; returns the device and its secret (plaintext).

    `issue(device_id)` signs the device's certificate (the caller checked the CSR already); its
    serial and expiry are stored on the device. Refusals never burn a use of the token.
    """
    device_labels = check_labels(labels, what="device labels")
    found = _find_token(session, token)
    if found.device_id and not (requested_id or "").strip():
        requested_id = found.device_id  # a pre-authorised token names the device by itself
    device_id = sanitize_device_id(requested_id)
    if found.device_id and found.device_id != device_id:
        raise AuthenticationError(
            f"enrolment token {found.id} is pre-authorised for device {found.device_id!r}, not {device_id!r}",
            token_id=found.id,
        )
    existing = session.get(Device, device_id)
    # An enrolled id is replaced only with a token the operator made for exactly that id.
    if existing is not None and not existing.decommissioned and found.device_id != device_id:
        raise ConflictError(
            f"device id {device_id!r} is already enrolled; decommission it first, enrol under another id, or "
            f"enrol it again with a token made for it (`fleet tokens create --device-id {device_id}`)",
            device_id=device_id,
        )
    used = _consume_token(session, found)
    merged = {**device_labels, **(used.labels or {})}  # the token's (operator's) labels win
    secret = secrets.token_urlsafe(32)
    now = _now()
    issued = issue(device_id) if issue is not None else None
    if existing is None:
        device = Device(
            id=device_id,
            labels=merged,
            hardware=dict(hardware or {}),
            secret_hash=hash_secret(secret),
            agent_version=(agent_version or "")[:64],
            enrolled_at=now,
            last_seen_at=now,
            connected=False,
            actual={},
            desired={},
            desired_generation=0,
            acked_generation=0,
            decommissioned=False,
        )
        session.add(device)
    else:
        # Re-enrolment of a decommissioned id: a new identity under the old name. The desired
        # generation keeps growing (never reset) so no agent can mistake new state for old.
        device = existing
        device.labels = merged
        device.hardware = dict(hardware or {})
        device.secret_hash = hash_secret(secret)
        device.agent_version = (agent_version or "")[:64]
        device.enrolled_at = now
        device.last_seen_at = now
        device.connected = False
        device.actual = {}
        device.decommissioned = False
        device.decommissioned_at = None
    # A new identity: no earlier certificate of this id is accepted any more.
    device.cert_serial = issued.serial if issued is not None else None
    device.cert_not_after = issued.not_after if issued is not None else None
    device.prev_cert_serial = None
    try:
        session.flush()
    except DBIntegrityError as exc:  # another enrolment took the id between our read and insert
        raise ConflictError(f"device id {device_id!r} is already enrolled", device_id=device_id) from exc
    return device, secret


def renew_certificate(
    session: Session, peer: PeerIdentity, issue: Callable[[str], IssuedCertificate], now: datetime | None = None
) -> IssuedCertificate:
    """A new certificate for the device a valid certificate names; that one stays valid until it expires.

    The certificate that asked becomes the previous one (normally it is the current one; after
    a renewal whose answer was lost, it is the previous one, and the lost one is dropped).
    """
    device = authenticate_certificate(session, peer, now)
    issued = issue(device.id)
    device.prev_cert_serial = peer.serial
    device.cert_serial = issued.serial
    device.cert_not_after = issued.not_after
    device.last_seen_at = _now()
    session.flush()
    return issued


def authenticate_certificate(session: Session, peer: PeerIdentity, now: datetime | None = None) -> Device:
    """The device a verified client certificate belongs to, if that certificate is still its own.

    The TLS layer has checked the CA's signature and the validity period at the handshake;
    this adds what only the database knows (decommissioned, superseded) and the expiry again,
    because a long-lived stream outlives its handshake.
    """
    now = now or _now()
    device = session.get(Device, peer.device_id)
    if device is None:
        raise PermissionDeniedError(
            f"device {peer.device_id!r} is not enrolled: certificate revoked; enrol the device again",
            device_id=peer.device_id,
        )
    if device.decommissioned:
        raise PermissionDeniedError(
            f"device {peer.device_id!r} decommissioned: its certificate is revoked; enrol it again with a new token",
            device_id=peer.device_id,
        )
    if peer.not_after <= now:
        raise PermissionDeniedError(
            f"certificate of device {peer.device_id!r} expired at {peer.not_after.isoformat()}; "
            "enrol the device again with a new token",
            device_id=peer.device_id,
        )
    accepted = [s for s in (device.cert_serial, device.prev_cert_serial) if s]
    if not any(hmac.compare_digest(peer.serial, s) for s in accepted):
        raise PermissionDeniedError(
            f"certificate {peer.serial} of device {peer.device_id!r} revoked (superseded by a newer one or "
            "by a new enrolment)",
            device_id=peer.device_id,
        )
    return device


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} not found", device_id=device_id)
    return device


def authenticate(session: Session, device_id: str, secret: str) -> Device:
    """The device these credentials belong to; AuthenticationError or PermissionDeniedError otherwise."""
    device = session.get(Device, device_id) if device_id else None
    # Hash and compare even for unknown ids, so timing does not reveal which ids exist.
    presented = hash_secret(secret or "")
    stored = device.secret_hash if device is not None else hash_secret(secrets.token_hex(16))
    if not hmac.compare_digest(presented, stored) or device is None:
        raise AuthenticationError(f"device {device_id!r} is not enrolled or its secret is wrong; re-enrol it")
    if device.decommissioned:
        raise PermissionDeniedError(
            f"device {device_id!r} has been decommissioned; enrol it again with a new token",
            device_id=device_id,
        )
    return device


def _active_device(session: Session, device_id: str) -> Device:
    device = get_device(session, device_id)
    if device.decommissioned:
        raise PermissionDeniedError(f"device {device_id!r} has been decommissioned", device_id=device_id)
    return device


def _check_actual(actual: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(actual, Mapping) or not isinstance(actual.get("models", []), list):
        raise InvalidInputError("actual state must be an object with a 'models' list")
    return dict(actual)


def record_hello(
    session: Session,
    device_id: str,
    *,
    labels: Mapping[str, Any] | None,
    hardware: Mapping[str, Any] | None,
    agent_version: str,
    actual: Mapping[str, Any] | None,
) -> Device:
    """A (re)connecting agent introduced itself: refresh what it is and what it holds."""
    device = _active_device(session, device_id)
    proposed = check_labels(labels, what="device labels")
    current = dict(device.labels or {})
    added = {k: v for k, v in proposed.items() if k not in current}
    if added:
        device.labels = {**current, **added}
    if hardware:
        device.hardware = dict(hardware)
    device.agent_version = (agent_version or device.agent_version or "")[:64]
    if actual is not None:
        _apply_actual(device, _check_actual(actual))
    device.last_seen_at = _now()
    session.flush()
    return device


def _apply_actual(device: Device, actual: dict[str, Any]) -> None:
    device.actual = actual
    try:
        device.acked_generation = int(actual.get("desired_generation", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("actual state 'desired_generation' must be an integer") from exc


def record_actual(session: Session, device_id: str, actual: Mapping[str, Any]) -> Device:
    """The agent's report of what it holds and where its updates stand."""
    device = _active_device(session, device_id)
    _apply_actual(device, _check_actual(actual))
    device.last_seen_at = _now()
    session.flush()
    return device


def set_connected(session: Session, device_id: str, connected: bool) -> Device:
    device = get_device(session, device_id)
    device.connected = connected
    device.last_seen_at = _now()
    session.flush()
    return device


def list_devices(
    session: Session,
    selector: Mapping[str, Any] | None = None,
    *,
    connected: bool | None = None,
    include_decommissioned: bool = False,
) -> list[Device]:
    """Devices whose labels match every selector term, ordered by id."""
    query = select(Device).order_by(Device.id)
    if connected is not None:
        query = query.where(Device.connected.is_(connected))
    if not include_decommissioned:
        query = query.where(Device.decommissioned.is_(False))
    # Label matching happens here, not in SQL: JSON operators differ between SQLite and PostgreSQL.
    return [d for d in session.scalars(query) if rollout_rules.selector_matches(selector, d.labels)]


def decommission_device(session: Session, device_id: str) -> Device:
    """Revoke a device's identity: its credentials stop working at once."""
    device = get_device(session, device_id)
    device.decommissioned = True
    device.decommissioned_at = device.decommissioned_at or _now()
    device.connected = False
    device.cert_serial = None
    device.prev_cert_serial = None
    device.cert_not_after = None
    session.flush()
    return device


def recent_events(session: Session, device_id: str, limit: int = RECENT_EVENTS) -> list[UpdateEvent]:
    return list(
        session.scalars(
            select(UpdateEvent)
            .where(UpdateEvent.device_id == device_id)
            .order_by(UpdateEvent.at.desc(), UpdateEvent.id.desc())
            .limit(limit)
        )
    )


# -- telemetry ------------------------------------------------------------------------------------


def _ms_to_dt(value: Any, *, default: datetime) -> datetime:
    try:
        ms = int(value or 0)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"timestamp {value!r} must be milliseconds since the epoch") from exc
    if ms <= 0:
        return default
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidInputError(f"timestamp {ms} ms is out of range") from exc


def _str(raw: Mapping[str, Any], key: str, limit: int) -> str:
    value = raw.get(key) or ""
    if not isinstance(value, str):
        raise InvalidInputError(f"telemetry field {key!r} must be a string")
    return value[:limit]


def _count(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"telemetry field {key!r} must be a non-negative integer")
    return value


def store_telemetry(session: Session, device_id: str, batches: Sequence[Mapping[str, Any]]) -> list[int]:
    """Store each batch once per (device, seq); returns every seq now durable (new or duplicate)."""
    _active_device(session, device_id)
    if len(batches) > MAX_BATCHES_PER_CALL:
        raise InvalidInputError(f"at most {MAX_BATCHES_PER_CALL} telemetry batches per report")
    acked: list[int] = []
    now = _now()
    for batch in batches:
        seq = batch.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidInputError(f"telemetry batch seq must be a non-negative integer, got {seq!r}")
        windows = batch.get("windows") or []
        events = batch.get("events") or []
        if len(windows) > MAX_WINDOWS_PER_BATCH or len(events) > MAX_EVENTS_PER_BATCH:
            raise InvalidInputError(
                f"a telemetry batch holds at most {MAX_WINDOWS_PER_BATCH} windows and "
                f"{MAX_EVENTS_PER_BATCH} events"
            )
        if seq in acked or session.get(TelemetryBatchSeen, (device_id, seq)) is not None:
            acked.append(seq)
            continue
        start = _ms_to_dt(batch.get("window_start_ms"), default=now)
        end = _ms_to_dt(batch.get("window_end_ms"), default=now)
        rows: list[Any] = [TelemetryBatchSeen(device_id=device_id, seq=seq, received_at=now)]
        for window in windows:
            rows.append(
                TelemetryWindow(
                    device_id=device_id,
                    seq=seq,
                    model=_str(window, "model", 64),
                    version=_str(window, "version", 64),
                    role=_str(window, "role", 16),
                    compared_to=_str(window, "compared_to", 64),
                    window_start=start,
                    window_end=end,
                    requests=_count(window, "requests"),
                    errors=_count(window, "errors"),
                    payload={
                        "latency_ms": window.get("latency_ms"),
                        "agreement": list(window.get("agreement") or []),
                        "mirrored": _count(window, "mirrored"),
                        "shadow_dropped": _count(window, "shadow_dropped"),
                        "paired_serving_latency_ms": window.get("paired_serving_latency_ms"),
                        "cpu_ms": window.get("cpu_ms"),
                        "paired_serving_cpu_ms": window.get("paired_serving_cpu_ms"),
                        "drift": list(window.get("drift") or []),
                        "profile_source": _str(window, "profile_source", 16),
                    },
                    received_at=now,
                )
            )
        for event in events:
            rows.append(
                UpdateEvent(
                    device_id=device_id,
                    model=_str(event, "model", 64),
                    version=_str(event, "version", 64),
                    role=_str(event, "role", 16),
                    state=_str(event, "state", 32),
                    reason=_str(event, "reason", 4000),
                    at=_ms_to_dt(event.get("at_ms"), default=now),
                )
            )
        # A savepoint per batch: if a concurrent report of the same batch won the race (possible on
        # PostgreSQL), the primary key refuses ours and we ack it as a duplicate.
        try:
            with session.begin_nested():
                session.add_all(rows)
        except DBIntegrityError:
            pass
        acked.append(seq)
    return acked


def prune_telemetry(session: Session, *, older_than: datetime) -> int:
    """Delete telemetry windows and batch records received before `older_than`; returns windows removed."""
    removed = session.execute(delete(TelemetryWindow).where(TelemetryWindow.received_at < older_than))
    session.execute(delete(TelemetryBatchSeen).where(TelemetryBatchSeen.received_at < older_than))
    session.execute(delete(UpdateEvent).where(UpdateEvent.at < older_than))
    return int(getattr(removed, "rowcount", 0) or 0)
