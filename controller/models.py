"""The controller's storage schema: SQLAlchemy 2 typed ORM models.

Rules this module enforces:

- every timestamp is timezone-aware UTC, on every backend: SQLite stores datetimes without an
  offset, so `UTCDateTime` attaches UTC on the way out and refuses naive values on the way in;
- JSON documents (labels, manifests, desired/actual state, telemetry payloads) are stored as
  `sqlalchemy.JSON`, i.e. as plain dicts with the wire field names of `docs/ARCHITECTURE.md`;
- the schema here and the Alembic migrations in `controller/migrations/versions/` must agree
  (`tests/unit/test_storage.py` compares them); change both together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names so migrations on PostgreSQL and SQLite (batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLLOUT_PHASES = ("Pending", "Progressing", "Paused", "Completed", "RolledBack", "Aborted")
FINISHED_PHASES = ("Completed", "RolledBack", "Aborted")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A `DateTime(timezone=True)` that always comes back aware, in UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive datetime is ambiguous; storing it would silently shift times on PostgreSQL.
            raise ValueError("naive datetime given to a UTC column; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class ModelVersion(Base):
    """One uploaded, signature-checked bundle of a model."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(32))
    release: Mapped[int] = mapped_column(Integer, default=0)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    bundle_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    target_path: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ModelAlias(Base):
    """A movable name (`stable`, `latest`) for one version of a model."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Device(Base):
    """An enrolled device, its credential (hashed), and its desired and last reported state."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    secret_hash: Mapped[str] = mapped_column(String(128))
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    connected: Mapped[bool] = mapped_column(Boolean, default=False)
    actual: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    desired: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    desired_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    acked_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    decommissioned: Mapped[bool] = mapped_column(Boolean, default=False)
    decommissioned_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The device's X.509 identity: the serial of its current certificate (and of the one it
    # replaced, accepted until that one expires, so a renewal never cuts a live stream).
    cert_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cert_not_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    prev_cert_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)


class EnrollmentToken(Base):
    """A bootstrap token: bounded uses, an expiry, labels for the devices enrolling with it."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    max_uses: Mapped[int] = mapped_column(Integer, default=1)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # Pre-authorised to one device id: only a device enrolling under this id may use it.
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True)


class ApiToken(Base):
    """An operator's bearer token for the REST API: stored hashed, with a role, revocable."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Rollout(Base):
    """One rollout of `model:version` over a selection of devices, in cohort steps."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    steps: Mapped[list[Any]] = mapped_column(JSON)
    selector: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    gate: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    shadow_sample_rate: Mapped[float] = mapped_column(Float, default=1.0)
    phase: Mapped[str] = mapped_column(String(16), default="Pending", index=True)
    step_index: Mapped[int] = mapped_column(Integer, default=0)
    step_phase: Mapped[str] = mapped_column(String(16), default="Shadow")
    step_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_by: Mapped[str] = mapped_column(String(128), default="operator")


class RolloutDevice(Base):
    """A device's membership in a rollout: its stable rank, its cohort step and where it stands."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[float] = mapped_column(Float)
    step_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="Pending")
    baseline_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Decision(Base):
    """One recorded decision of a rollout (by the engine or an operator) and the numbers behind it."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    step_index: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    actor: Mapped[str] = mapped_column(String(16), default="engine")
    reason: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Assignment(Base):
    """"This selection of devices runs this version": written when a rollout completes."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    selector: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    rollout_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TelemetryWindow(Base):
    """One model version in one role on one device over one telemetry window (deltas)."""

    __tablename__ = "telemetry_windows"
    __table_args__ = (
        Index("ix_telemetry_windows_model_version_role_start", "model", "version", "role", "window_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    compared_to: Mapped[str] = mapped_column(String(64), default="")
    window_start: Mapped[datetime] = mapped_column(UTCDateTime())
    window_end: Mapped[datetime] = mapped_column(UTCDateTime())
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    # latency_ms, agreement, mirrored, shadow_dropped, paired_serving_latency_ms
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TelemetryBatchSeen(Base):
    """The (device, seq) pairs already stored: makes telemetry storage exactly-once under replay."""

    __tablename__ = "telemetry_batches"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class UpdateEvent(Base):
    """A step of a device's update state machine, as the agent reported it."""

    __tablename__ = "update_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64), default="")
    role: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TufMetadata(Base):
    """Signed update metadata files (root, targets, snapshot, timestamp) shared by all replicas."""

    __tablename__ = "tuf_metadata"

    filename: Mapped[str] = mapped_column(String(128), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


__all__ = [
    "FINISHED_PHASES",
    "ROLLOUT_PHASES",
    "Assignment",
    "Base",
    "Decision",
    "Device",
    "EnrollmentToken",
    "ModelAlias",
    "ModelVersion",
    "Rollout",
    "RolloutDevice",
    "TelemetryBatchSeen",
    "TelemetryWindow",
    "TufMetadata",
    "UTCDateTime",
    "UpdateEvent",
    "utcnow",
]
