"""Each device's desired state, computed from rollouts and assignments and stored with a generation.

Rules this module enforces:

- desired state is derived, never edited: `refresh_desired` recomputes it from the active
  rollouts, the device's rollout membership and the assignments with the pure
  `fleet.core.rollout.desired_for_device`, so the same data always gives the same state;
- the generation grows only when the content changes: recomputing an unchanged state is free
  and wakes no agent, so callers may refresh generously;
- a device whose state cannot be computed (a version that vanished from the registry) keeps its
  last stored state; one broken reference must not freeze the desired state of the whole fleet.

Service functions take a `Session` and never commit: the caller commits, then tells the agents
(`ctx.on_desired_changed`). `notify_after_commit` does that second half for callers that do not
own the transaction (REST handlers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from fleet.controller.models import FINISHED_PHASES, Assignment, Device, ModelVersion, Rollout, RolloutDevice
from fleet.core.errors import NotFoundError
from fleet.core.rollout import AssignmentRecord, RolloutMembership, desired_for_device

if TYPE_CHECKING:
    from fleet.controller.context import ControllerContext

log = logging.getLogger(__name__)

DEFAULT_TELEMETRY_INTERVAL_MS = 10_000
_PENDING_KEY = "fleet.desired_changed"
_HOOKED_KEY = "fleet.desired_hooked"
# Keeps SQL `IN (...)` lists well under every backend's bound-parameter limit.
_CHUNK = 500


def telemetry_interval_ms(ctx: ControllerContext) -> int:
    return int(getattr(ctx.settings, "telemetry_interval_ms", DEFAULT_TELEMETRY_INTERVAL_MS))


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _content(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a stored desired state that matters for change detection."""
    state = state or {}
    return {"telemetry_interval_ms": state.get("telemetry_interval_ms"), "models": state.get("models") or []}


class _RefCache:
    """BundleRefs by (model, version), each looked up once per refresh."""

    def __init__(self, ctx: ControllerContext, session: Session) -> None:
        self.ctx = ctx
        self.session = session
        self.refs: dict[tuple[str, str], dict[str, Any]] = {}

    def __call__(self, model: str, version: str) -> dict[str, Any]:
        key = (model, version)
        if key not in self.refs:
            from fleet.controller.registry import bundle_ref

            mv = self.session.scalar(
                select(ModelVersion).where(ModelVersion.name == model, ModelVersion.version == version)
            )
            if mv is None:
                raise NotFoundError(f"model version {model}:{version} is not in the registry")
            self.refs[key] = bundle_ref(self.ctx, mv)
        return self.refs[key]


def refresh_desired(
    ctx: ControllerContext, session: Session, device_ids: list[str] | None = None
) -> list[str]:
    """Recompute and store the desired state of these devices (all when None); return the changed ids."""
    query = select(Device).where(Device.decommissioned.is_(False)).order_by(Device.id)
    if device_ids is None:
        devices = list(session.scalars(query))
    else:
        wanted = sorted(set(device_ids))
        devices = [d for chunk in _chunks(wanted) for d in session.scalars(query.where(Device.id.in_(chunk)))]
    if not devices:
        return []

    active = {
        r.id: r for r in session.scalars(select(Rollout).where(Rollout.phase.not_in(FINISHED_PHASES)))
    }
    memberships: dict[str, list[RolloutMembership]] = {}
    if active:
        ids = [d.id for d in devices]
        rows: list[RolloutDevice] = []
        for chunk in _chunks(ids):
            rows.extend(session.scalars(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id.in_(list(active)), RolloutDevice.device_id.in_(chunk)
                )
            ))
        for row in rows:
            rollout = active[row.rollout_id]
            memberships.setdefault(row.device_id, []).append(RolloutMembership(
                rollout=rollout.id,
                model=rollout.model,
                version=rollout.version,
                phase=rollout.phase,
                shadow_sample_rate=rollout.shadow_sample_rate,
                state=row.state,
                baseline_version=row.baseline_version,
            ))
    assignments = [
        AssignmentRecord(a.model, a.version, dict(a.selector or {}), order=(a.created_at, a.id),
                         rollout=a.rollout_id)
        for a in session.scalars(select(Assignment))
    ]
    refs = _RefCache(ctx, session)
    interval = telemetry_interval_ms(ctx)

    changed: list[str] = []
    for device in devices:
        try:
            models = desired_for_device(
                device.labels or {}, memberships.get(device.id, []), assignments, refs
            )
        except NotFoundError as exc:
            log.warning("desired state of device %s left unchanged: %s", device.id, exc)
            continue
        content = {"telemetry_interval_ms": interval, "models": models}
        if device.desired_generation and _content(device.desired) == content:
            continue  # unchanged: no new generation, no wake-up
        generation = int(device.desired_generation or 0) + 1
        device.desired_generation = generation
        device.desired = {"generation": generation, **content}
        changed.append(device.id)
    if changed:
        session.flush()
    return changed


def desired_state(session: Session, device_id: str) -> dict[str, Any]:
    """The stored desired state of one device, with its generation (docs/ARCHITECTURE.md shape)."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} not found", device_id=device_id)
    stored = dict(device.desired or {})
    return {
        "generation": int(device.desired_generation or 0),
        "telemetry_interval_ms": int(stored.get("telemetry_interval_ms") or DEFAULT_TELEMETRY_INTERVAL_MS),
        "models": list(stored.get("models") or []),
    }


def notify_after_commit(ctx: ControllerContext, session: Session, device_ids: Iterable[str]) -> None:
    """Call `ctx.on_desired_changed(ids)` once this session's transaction commits (never on rollback).

    Agents must only be woken after the new generation is durable, or they would read the old one.
    """
    ids = [d for d in device_ids if d]
    if not ids:
        return
    session.info.setdefault(_PENDING_KEY, set()).update(ids)
    if session.info.get(_HOOKED_KEY):
        return
    session.info[_HOOKED_KEY] = True

    # The listeners live as long as the session (sessions are per request or per pass); each
    # commit delivers whatever is pending, each outermost rollback drops it.
    def after_commit(sess: Session) -> None:
        changed = sess.info.pop(_PENDING_KEY, None)
        if changed:
            try:
                ctx.on_desired_changed(sorted(changed))
            except Exception:  # a notification failure must not undo a committed change
                log.exception("could not notify agents of new desired state")

    def after_soft_rollback(sess: Session, previous_transaction: Any) -> None:
        if previous_transaction.parent is None:  # a savepoint rollback leaves the outer work alive
            sess.info.pop(_PENDING_KEY, None)

    event.listen(session, "after_commit", after_commit)
    event.listen(session, "after_soft_rollback", after_soft_rollback)
