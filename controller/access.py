"""Operator access to the REST API: bearer tokens with roles.

Rules this module enforces:

- a token is `fleet_<id>_<secret>`: the id is visible in logs and listings, the 256-bit secret
  only to its holder; the controller stores the SHA-256 of the whole token, never the token,
  and returns the plain text once, when the token is made;
- roles are ordered `viewer < operator < admin`; a request needs a role at least as strong as
  the one its route declares (`PermissionDeniedError` names the role it needs);
- a missing, malformed, unknown, revoked or expired token is an `AuthenticationError`, each with
  its own message and `reason` detail; hashes are compared in constant time, and an unknown id
  costs the same comparison as a known one;
- `last_used_at` is written at most once a minute per token, so a busy script does not turn
  every read into a database write;
- at start-up there is always a way in: the configured `admin_token` (a Kubernetes Secret) is
  stored hashed as "bootstrap-admin", or else, when no usable admin token exists, one is made
  and written to `<data_dir>/admin.token` (mode 0600 from the first byte); only its path is logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fleet.controller.models import ApiToken
from fleet.core.atomic import write_bytes_atomic
from fleet.core.errors import AuthenticationError, InvalidInputError, NotFoundError, PermissionDeniedError

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
TOKEN_PREFIX = "fleet"
TOKEN_RE = re.compile(r"^fleet_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
BOOTSTRAP_NAME = "bootstrap-admin"
ADMIN_TOKEN_FILE = "admin.token"
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_TTL_S = 5 * 366 * 24 * 3600
# A configured admin token is a long-lived secret; refuse one short enough to guess.
MIN_CONFIGURED_TOKEN_LEN = 32


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: an API token (with a role) or an enrolled device."""

    kind: str  # "token" or "device"
    id: str
    name: str
    role: str | None  # None for devices: they hold no operator role

    def label(self) -> str:
        return f"token {self.name!r} ({self.id})" if self.kind == "token" else f"device {self.id!r}"


def _now() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_role(role: str) -> str:
    if role not in ROLE_RANK:
        raise InvalidInputError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def role_allows(have: str | None, need: str) -> bool:
    return have is not None and ROLE_RANK.get(have, -1) >= ROLE_RANK[need]


def new_token_text() -> tuple[str, str]:
    """A fresh (id, plaintext) pair; 32 random bytes of secret."""
    token_id = secrets.token_hex(6)
    return token_id, f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"


def create_token(
    session: Session,
    *,
    name: str,
    role: str,
    ttl_s: float | None = None,
    now: datetime | None = None,
) -> tuple[str, ApiToken]:
    """A new API token; the plaintext is returned here once and never stored."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInputError(
            f"invalid token name {name!r}: 1-64 characters, letters, digits and . _ @ + - "
            "(starting with a letter or digit)"
        )
    check_role(role)
    if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
        raise InvalidInputError(f"ttl must be between 1 second and {MAX_TTL_S} seconds, got {ttl_s}")
    now = now or _now()
    token_id, plaintext = new_token_text()
    row = ApiToken(
        id=token_id,
        name=name,
        role=role,
        token_hash=hash_token(plaintext),
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s) if ttl_s is not None else None,
    )
    session.add(row)
    session.flush()
    log.info("API token %s (%r, role %s) created", token_id, name, role)
    return plaintext, row


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at.desc(), ApiToken.id)))


def revoke_token(session: Session, token_id: str, *, now: datetime | None = None) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no API token with id {token_id!r}; `fleet access ls` lists them")
    if row.revoked_at is None:
        row.revoked_at = now or _now()
        session.flush()
        log.info("API token %s (%r) revoked", row.id, row.name)
    return row


def _find(session: Session, presented: str) -> ApiToken | None:
    match = TOKEN_RE.match(presented)
    if match:
        return session.get(ApiToken, match.group(1))
    # A configured bootstrap token may have any shape; it is found by its hash.
    return session.scalars(select(ApiToken).where(ApiToken.token_hash == hash_token(presented))).first()


def authenticate(session: Session, presented: str, *, now: datetime | None = None) -> ApiToken:
    """The token row these credentials prove; AuthenticationError (with a `reason`) otherwise."""
    now = now or _now()
    row = _find(session, presented)
    # Compare even when nothing was found, so timing does not tell which ids exist.
    stored = row.token_hash if row is not None else hash_token(secrets.token_hex(16))
    if row is None or not hmac.compare_digest(hash_token(presented), stored):
        raise AuthenticationError(
            "the API token is not valid: check it was copied whole, or make a new one with `fleet access create`",
            reason="unknown",
        )
    if row.revoked_at is not None:
        raise AuthenticationError(
            f"API token {row.id} ({row.name!r}) was revoked at {row.revoked_at.isoformat()}; "
            "ask an admin for a new one",
            reason="revoked", token_id=row.id,
        )
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthenticationError(
            f"API token {row.id} ({row.name!r}) expired at {row.expires_at.isoformat()}; ask an admin for a new one",
            reason="expired", token_id=row.id,
        )
    return row


def touch(session: Session, row: ApiToken, *, now: datetime | None = None) -> bool:
    """Record use, at most once per `LAST_USED_RESOLUTION`; True when a write was made."""
    now = now or _now()
    if row.last_used_at is not None and now - row.last_used_at < LAST_USED_RESOLUTION:
        return False
    row.last_used_at = now
    session.flush()
    return True


def principal_for(row: ApiToken) -> Principal:
    return Principal(kind="token", id=row.id, name=row.name, role=row.role)


def authorize(principal: Principal, need: str) -> None:
    if not role_allows(principal.role, need):
        have = principal.role or "no operator role"
        raise PermissionDeniedError(
            f"this needs the {need} role; {principal.label()} has {have}: ask an admin for a token "
            f"with `fleet access create NAME --role {need}`",
            needed_role=need, role=principal.role,
        )


# -- start-up ---------------------------------------------------------------------------------


def _usable_admin_exists(session: Session, now: datetime) -> bool:
    rows = session.scalars(select(ApiToken).where(ApiToken.role == "admin", ApiToken.revoked_at.is_(None)))
    return any(r.expires_at is None or r.expires_at > now for r in rows)


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, the file being 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode(), 0o600)  # mkstemp makes the temporary file 0600


def ensure_bootstrap_admin(
    session_factory: sessionmaker[Session], *, admin_token: str, data_dir: Path
) -> Path | None:
    """Make sure an admin can get in; returns the path of a token file written now, if any."""
    now = _now()
    if admin_token:
        if len(admin_token) < MIN_CONFIGURED_TOKEN_LEN:
            raise InvalidInputError(
                f"FLEET_ADMIN_TOKEN is shorter than {MIN_CONFIGURED_TOKEN_LEN} characters; use a random value, "
                "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        digest = hash_token(admin_token)
        try:
            with session_factory() as session, session.begin():
                existing = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
                if existing is not None:
                    if existing.revoked_at is not None:
                        log.warning("the configured admin token (%s) was revoked; it stays revoked", existing.id)
                    return None
                # A new value (the Secret was rotated): the old bootstrap token stops working.
                for old in session.scalars(
                    select(ApiToken).where(ApiToken.name == BOOTSTRAP_NAME, ApiToken.revoked_at.is_(None))
                ):
                    old.revoked_at = now
                match = TOKEN_RE.match(admin_token)
                token_id = match.group(1) if match else secrets.token_hex(6)
                session.add(ApiToken(id=token_id, name=BOOTSTRAP_NAME, role="admin", token_hash=digest,
                                     created_at=now))
            log.info("bootstrap admin token %s stored (hashed) from the configuration", token_id)
        except DbIntegrityError:
            log.info("another replica stored the bootstrap admin token first")
        return None
    with session_factory() as session, session.begin():
        if _usable_admin_exists(session, now):
            return None
        plaintext, row = create_token(session, name=BOOTSTRAP_NAME, role="admin", now=now)
        path = data_dir / ADMIN_TOKEN_FILE
        write_secret_file(path, plaintext + "\n")
    log.warning("no admin API token existed: made %s and wrote it to %s (mode 0600); use it with "
                "`fleet login --token \"$(cat %s)\"`", row.id, path, path)
    return path


__all__ = [
    "ADMIN_TOKEN_FILE",
    "BOOTSTRAP_NAME",
    "ROLES",
    "Principal",
    "authenticate",
    "authorize",
    "check_role",
    "create_token",
    "ensure_bootstrap_admin",
    "hash_token",
    "list_tokens",
    "principal_for",
    "revoke_token",
    "role_allows",
    "touch",
    "write_secret_file",
]


def admin_headers(ctx_or_factory: object, *, role: str = "admin", name: str = "local-admin") -> dict[str, str]:
    """Headers with a fresh token of `role` for in-process clients (tests, embedded tools).

    Takes a ControllerContext (anything with `session_factory`) or a session factory.
    """
    factory = getattr(ctx_or_factory, "session_factory", ctx_or_factory)
    assert isinstance(factory, sessionmaker)
    with factory() as session, session.begin():
        plaintext, _ = create_token(session, name=name, role=role)
    return {"Authorization": f"Bearer {plaintext}"}


def create_token_in_database(db_url: str, *, name: str, role: str, ttl_s: float | None = None) -> tuple[str, str]:
    """Make a token straight on the database (recovery, no REST): (plaintext, id). Migrates first."""
    from fleet.controller.db import make_engine, make_session_factory, migrate

    migrate(db_url)
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            plaintext, row = create_token(session, name=name, role=role, ttl_s=ttl_s)
            return plaintext, row.id
    finally:
        engine.dispose()
