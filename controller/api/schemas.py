"""Request (`XCreate`) and response (`XPublic`) bodies of the REST API.

Rule: the API's shapes are declared here and nowhere else; ORM rows and service results are
converted by the `from_*` constructors, so a column rename never leaks into the public JSON.
Secrets appear in exactly one response: `EnrollmentTokenCreated.token`, once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleet.controller.models import Device, EnrollmentToken, ModelAlias, ModelVersion, UpdateEvent


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- models -----------------------------------------------------------------------------------------


class ModelVersionPublic(_Out):
    name: str
    version: str
    task: str
    release: int
    sha256: str
    size: int
    target_path: str
    created_at: datetime
    url: str = Field(description="Where agents download the bundle.")
    manifest: dict[str, Any]

    @classmethod
    def from_row(cls, mv: ModelVersion, url: str) -> ModelVersionPublic:
        return cls(
            name=mv.name,
            version=mv.version,
            task=mv.task,
            release=mv.release,
            sha256=mv.sha256,
            size=mv.size,
            target_path=mv.target_path,
            created_at=mv.created_at,
            url=url,
            manifest=mv.manifest,
        )


class ModelVersionSummary(_Out):
    version: str
    task: str
    release: int
    sha256: str
    size: int
    created_at: datetime


class ModelPublic(_Out):
    name: str
    task: str
    latest: str
    versions: list[ModelVersionSummary] = Field(description="Newest first.")
    aliases: dict[str, str]


class AliasUpdate(BaseModel):
    version: str = Field(min_length=1, max_length=64)


class AliasPublic(_Out):
    name: str
    alias: str
    version: str
    updated_at: datetime

    @classmethod
    def from_row(cls, row: ModelAlias) -> AliasPublic:
        return cls.model_validate(row)


# -- devices ----------------------------------------------------------------------------------------


class UpdateEventPublic(_Out):
    model: str
    version: str
    role: str
    state: str
    reason: str
    at: datetime


class DeviceModelPublic(BaseModel):
    """One model on one device: what it runs, what it should run, and its update's progress."""

    model: str
    serving: str | None = None
    shadow: str | None = None
    desired_serving: str | None = None
    desired_shadow: str | None = None
    rollout: str | None = None
    update_state: str = "Idle"
    update: dict[str, Any] = Field(default_factory=dict)


class DevicePublic(_Out):
    id: str
    labels: dict[str, Any]
    hardware: dict[str, Any]
    agent_version: str
    connected: bool
    decommissioned: bool
    decommissioned_at: datetime | None = None
    cert_serial: str | None = Field(default=None, description="Serial of the device's current certificate.")
    cert_not_after: datetime | None = None
    enrolled_at: datetime
    last_seen_at: datetime | None
    desired_generation: int
    acked_generation: int
    models: list[DeviceModelPublic] = Field(description="Actual and desired state joined per model.")
    actual: dict[str, Any] = Field(description="The last actual state the agent reported.")
    desired: dict[str, Any] = Field(description="The desired state, with its generation.")

    @classmethod
    def from_row(cls, device: Device) -> DevicePublic:
        return cls(**_device_fields(device))


class DeviceDetail(DevicePublic):
    events: list[UpdateEventPublic] = Field(description="Recent update events, newest first.")

    @classmethod
    def from_rows(cls, device: Device, events: list[UpdateEvent]) -> DeviceDetail:
        return cls(**_device_fields(device), events=[UpdateEventPublic.model_validate(e) for e in events])


def _device_fields(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "labels": device.labels or {},
        "hardware": device.hardware or {},
        "agent_version": device.agent_version,
        "connected": device.connected,
        "decommissioned": device.decommissioned,
        "decommissioned_at": device.decommissioned_at,
        "cert_serial": device.cert_serial,
        "cert_not_after": device.cert_not_after,
        "enrolled_at": device.enrolled_at,
        "last_seen_at": device.last_seen_at,
        "desired_generation": device.desired_generation,
        "acked_generation": device.acked_generation,
        "models": device_models(device.actual or {}, device.desired or {}),
        "actual": device.actual or {},
        # The generation lives in its own column; shown inside `desired` as agents see it.
        "desired": {**(device.desired or {}), "generation": device.desired_generation},
    }


def device_models(actual: dict[str, Any], desired: dict[str, Any]) -> list[DeviceModelPublic]:
    """Join the actual and desired state per model, for humans and the CLI."""
    rows: dict[str, DeviceModelPublic] = {}
    for model in actual.get("models") or []:
        row = rows.setdefault(model.get("model", ""), DeviceModelPublic(model=model.get("model", "")))
        for slot in model.get("slots") or []:
            if slot.get("role") == "serving":
                row.serving = slot.get("version") or None
            elif slot.get("role") == "shadow":
                row.shadow = slot.get("version") or None
        update = model.get("update") or {}
        row.update = dict(update)
        row.update_state = update.get("state") or "Idle"
    for model in desired.get("models") or []:
        row = rows.setdefault(model.get("model", ""), DeviceModelPublic(model=model.get("model", "")))
        row.desired_serving = (model.get("serving") or {}).get("version")
        row.desired_shadow = (model.get("shadow") or {}).get("version")
        row.rollout = model.get("rollout") or None
    return [rows[k] for k in sorted(rows)]


# -- enrolment tokens -----------------------------------------------------------------------------


class EnrollmentTokenCreate(BaseModel):
    max_uses: int = Field(default=1, ge=1, le=1_000_000)
    ttl_seconds: int = Field(default=3600, ge=1, le=366 * 24 * 3600)
    labels: dict[str, str] = Field(default_factory=dict, description="Labels given to devices enrolling.")
    device_id: str | None = Field(
        default=None, max_length=63, description="Pre-authorise the token for this device id only."
    )


class EnrollmentTokenPublic(_Out):
    id: str
    max_uses: int
    uses: int
    expires_at: datetime
    labels: dict[str, Any]
    created_at: datetime
    revoked: bool
    expired: bool
    device_id: str | None = None

    @classmethod
    def from_row(cls, token: EnrollmentToken) -> EnrollmentTokenPublic:
        return cls(**_token_fields(token))


class EnrollmentTokenCreated(EnrollmentTokenPublic):
    token: str = Field(description="The bootstrap token. Shown only in this response.")


def _token_fields(token: EnrollmentToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "max_uses": token.max_uses,
        "uses": token.uses,
        "expires_at": token.expires_at,
        "labels": token.labels or {},
        "created_at": token.created_at,
        "revoked": token.revoked,
        "expired": token.expires_at <= datetime.now(UTC),
        "device_id": token.device_id,
    }


# -- rollouts ---------------------------------------------------------------------------------------


class RolloutCreate(BaseModel):
    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    steps: list[float] | None = Field(default=None, description="Cohort fractions, last = 1.0.")
    selector: dict[str, str | list[str]] = Field(default_factory=dict)
    gate: dict[str, Any] | None = None
    shadow_sample_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    name: str | None = Field(default=None, max_length=128)


class RolloutAction(BaseModel):
    reason: str = Field(default="", max_length=2000)


# -- trust ------------------------------------------------------------------------------------------


class OnlineKeyPublic(BaseModel):
    keyid: str
    key: dict[str, Any] = Field(description="The public key as a TUF key object.")
    public_key_pem: str


class TrustRootPublic(BaseModel):
    version: int
    expires: datetime
    consistent_snapshot: bool
    roles: dict[str, dict[str, Any]]


class Status(BaseModel):
    status: str
