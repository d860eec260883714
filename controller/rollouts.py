"""Rollout operations for the REST layer: create, list, inspect, pause, resume, promote, abort.

Rules this module enforces:

- a rollout names an existing `model:version` (NotFoundError otherwise), and a model has at most
  one unfinished rollout at a time (ConflictError naming it): two rollouts steering the same
  devices would undo each other;
- the baseline of each device is what it serves when the rollout is created, recorded per device;
  Aborted and RolledBack rollouts send devices back to it;
- operator actions are transitions of the phase machine; anything else (resuming a Completed
  rollout, pausing a paused one) is a ConflictError that says what is possible instead;
- every operator action is recorded as a `Decision` with actor `operator`, next to the engine's;
- every function returns the rollout's detail dict (JSON-ready) and asks the reconciler for a pass
  (`ctx.kick()`); desired-state changes reach agents only after the caller's commit.

Functions take a `Session` and never commit: the caller (a REST handler) owns the transaction.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet.controller.desired import notify_after_commit, refresh_desired
from fleet.controller.engine import (
    CANDIDATE_STATES,
    FAILED,
    PENDING,
    ROLLED_BACK,
    SERVING,
    SHADOWING,
    advance,
    analyze,
    baseline_of,
    devices_by_id,
    enter_serving,
    finish_back,
    is_confirmed,
    members_of,
    model_state,
    record,
    slot_version,
)
from fleet.controller.models import (
    FINISHED_PHASES,
    Decision,
    Device,
    ModelVersion,
    Rollout,
    RolloutDevice,
    UpdateEvent,
)
from fleet.core.errors import ConflictError, InvalidInputError, NotFoundError
from fleet.core.gate import GatePolicy, Verdict
from fleet.core.rollout import (
    Phase,
    StepPhase,
    cohort_rank,
    cohort_size,
    parse_selector,
    plan_steps,
    selector_matches,
)

if TYPE_CHECKING:
    from fleet.controller.context import ControllerContext

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_REASON = 2000
# A detail lists this many devices; counts always cover all of them.
DEVICE_LIST_LIMIT = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _get(session: Session, name: str) -> Rollout:
    rollout = session.get(Rollout, name)
    if rollout is None:
        raise NotFoundError(f"rollout {name!r} not found; `fleet rollout status` lists rollouts",
                            rollout=name)
    return rollout


def _free_name(session: Session, base: str) -> str:
    candidate, n = base, 1
    while session.get(Rollout, candidate) is not None:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


# -- create ---------------------------------------------------------------------------------------


def _check_release_allowed(ctx: ControllerContext, candidate: ModelVersion) -> None:
    """Refuse a version below the release-signed minimum for its model: devices would refuse it too.

    The release counter is read from the signed target when it is there (a row in the database
    is only as trustworthy as the controller), else from the registry row.
    """
    minimum = ctx.trust.min_release(candidate.name)
    if minimum <= 0:
        return
    info = ctx.trust.target_info(candidate.target_path) if candidate.target_path else None
    custom = info.custom if info is not None else None
    signed = custom.get("release") if isinstance(custom, dict) else None
    release = signed if isinstance(signed, int) and not isinstance(signed, bool) else candidate.release
    if release < minimum:
        raise ConflictError(
            f"{candidate.name}:{candidate.version} has release {release}, below the signed minimum release "
            f"{minimum} for {candidate.name}; devices would refuse it. Roll out a version with release >= "
            f"{minimum}, or sign a lower minimum with `fleet models policy {candidate.name} --min-release N`",
            model=candidate.name, version=candidate.version, release=release, min_release=minimum,
        )


def create_rollout(
    ctx: ControllerContext,
    session: Session,
    *,
    model: str,
    version: str,
    steps: str | Sequence[str | float] | None = None,
    selector: str | Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    shadow_sample_rate: float | None = None,
    name: str | None = None,
    canary: str | float | None = None,
    created_by: str = "operator",
    now: datetime | None = None,
) -> dict[str, Any]:
    """Create a rollout of `model:version` (phase Pending; the reconciler starts it)."""
    now = now or _now()
    planned = plan_steps(canary, steps)
    selection = parse_selector(selector)
    policy = GatePolicy.from_dict(gate)
    rate = 1.0 if shadow_sample_rate is None else shadow_sample_rate
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
        raise InvalidInputError(f"shadow_sample_rate must be in (0, 1], got {shadow_sample_rate!r}")

    candidate = session.scalar(
        select(ModelVersion).where(ModelVersion.name == model, ModelVersion.version == version)
    )
    if candidate is None:
        raise NotFoundError(
            f"model version {model}:{version} not found; push it first with `fleet models push`",
            model=model, version=version,
        )
    _check_release_allowed(ctx, candidate)
    active = session.scalar(
        select(Rollout).where(Rollout.model == model, Rollout.phase.not_in(FINISHED_PHASES)).limit(1)
    )
    if active is not None:
        raise ConflictError(
            f"model {model} already has an unfinished rollout {active.id!r} ({active.phase}, "
            f"{model}:{active.version}); wait for it to finish or abort it first",
            rollout=active.id,
        )
    if name:
        if not NAME_RE.match(name):
            raise InvalidInputError(
                f"rollout name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        if session.get(Rollout, name) is not None:
            raise ConflictError(f"a rollout named {name!r} exists already; choose another name", rollout=name)
        rollout_id = name
    else:
        base = re.sub(r"[^A-Za-z0-9._-]", "-", f"{model}-{version}")[:120]
        rollout_id = _free_name(session, base)

    rollout = Rollout(
        id=rollout_id, model=model, version=version, steps=planned, selector=selection,
        gate=policy.to_dict(), shadow_sample_rate=float(rate), phase=Phase.PENDING.value, step_index=0,
        step_phase=StepPhase.SHADOW.value, step_started_at=None,
        message="waiting for the reconciler to start",
        created_at=now, updated_at=now, finished_at=None, created_by=(created_by or "operator")[:128],
    )
    session.add(rollout)
    members = 0
    with_baseline = 0
    for device in session.scalars(select(Device).where(Device.decommissioned.is_(False)).order_by(Device.id)):
        if not selector_matches(selection, device.labels):
            continue
        baseline = baseline_of(device, model)
        members += 1
        with_baseline += 1 if baseline else 0
        session.add(RolloutDevice(
            rollout_id=rollout_id, device_id=device.id, rank=cohort_rank(rollout_id, device.id),
            step_index=None, state=PENDING, baseline_version=baseline, reason="", updated_at=now,
        ))
    reason = (f"created by {rollout.created_by}: {model}:{version} in steps "
              + ", ".join(f"{s:.0%}" for s in planned)
              + f" over {members} devices matching {_selector_text(selection)}"
              + f" ({with_baseline} serve a version of {model} now)")
    record(session, rollout, now, "step", actor="operator", reason=reason,
           metrics={"event": "created", "steps": planned, "selector": selection, "gate": policy.to_dict(),
                    "members": members, "with_baseline": with_baseline})
    session.flush()
    ctx.kick()
    return rollout_detail(session, rollout_id)


def _selector_text(selector: Mapping[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector or {}).items())) or "(all devices)"


# -- read -----------------------------------------------------------------------------------------


def _summary(rollout: Rollout) -> dict[str, Any]:
    steps = [float(s) for s in rollout.steps]
    return {
        "name": rollout.id,
        "model": rollout.model,
        "version": rollout.version,
        "phase": rollout.phase,
        "step_index": rollout.step_index,
        "step": rollout.step_index + 1,
        "steps": steps,
        "step_weight": steps[rollout.step_index] if rollout.step_index < len(steps) else None,
        "step_phase": rollout.step_phase,
        "step_started_at": _iso(rollout.step_started_at),
        "selector": dict(rollout.selector or {}),
        "gate": dict(rollout.gate or {}),
        "shadow_sample_rate": rollout.shadow_sample_rate,
        "message": rollout.message,
        "created_at": _iso(rollout.created_at),
        "updated_at": _iso(rollout.updated_at),
        "finished_at": _iso(rollout.finished_at),
        "created_by": rollout.created_by,
    }


def list_rollouts(
    session: Session, *, model: str | None = None, phase: str | None = None
) -> list[dict[str, Any]]:
    """Rollouts, newest first, with device counts per state."""
    query = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id)
    if model:
        query = query.where(Rollout.model == model)
    if phase:
        try:
            phase = Phase(phase).value
        except ValueError:
            raise InvalidInputError(
                f"unknown phase {phase!r}; phases are {', '.join(p.value for p in Phase)}"
            ) from None
        query = query.where(Rollout.phase == phase)
    rollouts = list(session.scalars(query))
    counts: dict[str, Counter[str]] = {r.id: Counter() for r in rollouts}
    if rollouts:
        for rollout_id, state, n in session.execute(
            select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
            .where(RolloutDevice.rollout_id.in_(list(counts)))
            .group_by(RolloutDevice.rollout_id, RolloutDevice.state)
        ):
            counts[rollout_id][state] += int(n)
    out = []
    for rollout in rollouts:
        item = _summary(rollout)
        item["devices"] = {"total": sum(counts[rollout.id].values()), **dict(counts[rollout.id])}
        out.append(item)
    return out


def _decision_dict(decision: Decision) -> dict[str, Any]:
    return {
        "id": decision.id,
        "at": _iso(decision.at),
        "step_index": decision.step_index,
        "kind": decision.kind,
        "verdict": decision.verdict,
        "actor": decision.actor,
        "reason": decision.reason,
        "metrics": decision.metrics or {},
    }


def rollout_detail(session: Session, name: str) -> dict[str, Any]:
    """Everything an operator needs to see where a rollout stands and why."""
    rollout = _get(session, name)
    detail = _summary(rollout)
    rows = members_of(session, rollout)
    devices = devices_by_id(session, (row.device_id for row in rows))
    last_events: dict[str, UpdateEvent] = {}
    for event in session.scalars(
        select(UpdateEvent)
        .where(UpdateEvent.model == rollout.model, UpdateEvent.at >= rollout.created_at)
        .order_by(UpdateEvent.at, UpdateEvent.id)
    ):
        if event.device_id in devices:
            last_events[event.device_id] = event

    steps = [float(s) for s in rollout.steps]
    n = len(rows)
    cohorts = []
    previous_target = 0
    for index, fraction in enumerate(steps):
        target = cohort_size(fraction, n)
        in_step = [row for row in rows if row.step_index == index]
        states = Counter(row.state for row in in_step)
        confirmed = sum(
            1 for row in in_step
            if row.state == SERVING
            and is_confirmed(devices[row.device_id].actual, rollout.model, rollout.version)
        )
        cohorts.append({
            "step": index + 1,
            "step_index": index,
            "fraction": fraction,
            "planned": max(0, target - previous_target),
            "assigned": len(in_step),
            "pending": states.get(PENDING, 0),
            "shadowing": states.get(SHADOWING, 0),
            "serving": states.get(SERVING, 0),
            "confirmed": confirmed,
            "failed": states.get(FAILED, 0),
            "rolled_back": states.get(ROLLED_BACK, 0),
        })
        previous_target = target

    device_items = []
    for row in rows[:DEVICE_LIST_LIMIT]:
        device = devices[row.device_id]
        state = model_state(device.actual, rollout.model) or {}
        update = state.get("update") or {}
        event = last_events.get(row.device_id)
        device_items.append({
            "device": row.device_id,
            "rank": round(row.rank, 6),
            "step_index": row.step_index,
            "state": row.state,
            "reason": row.reason,
            "baseline_version": row.baseline_version,
            "connected": bool(device.connected),
            "last_seen_at": _iso(device.last_seen_at),
            "serving_version": slot_version(device.actual, rollout.model, "serving"),
            "shadow_version": slot_version(device.actual, rollout.model, "shadow"),
            "confirmed": is_confirmed(device.actual, rollout.model, rollout.version),
            "update_state": update.get("state") or None,
            "update_target": update.get("target_version") or None,
            "update_error": update.get("error") or None,
            "last_event": None if event is None else {
                "at": _iso(event.at), "version": event.version, "role": event.role, "state": event.state,
                "reason": event.reason,
            },
        })

    decisions = list(session.scalars(
        select(Decision).where(Decision.rollout_id == rollout.id).order_by(Decision.at, Decision.id)
    ))
    gates = [d for d in decisions if d.kind == "gate" or (d.kind == "pause" and d.metrics.get("metrics"))]
    analysis = None
    if gates:
        latest = gates[-1]
        analysis = {
            "at": _iso(latest.at),
            "step_index": latest.step_index,
            "verdict": latest.verdict,
            "reason": latest.reason,
            "actor": latest.actor,
            "metrics": (latest.metrics or {}).get("metrics", []),
        }
    detail.update({
        "devices_total": n,
        "devices_unassigned": sum(1 for row in rows if row.step_index is None),
        "cohorts": cohorts,
        "devices": device_items,
        "devices_truncated": n > DEVICE_LIST_LIMIT,
        "analysis": analysis,
        "decisions": [_decision_dict(d) for d in decisions],
    })
    return detail


# -- operator actions -----------------------------------------------------------------------------


def _reason(reason: str | None, default: str) -> str:
    text = (reason or "").strip()
    return (text or default)[:MAX_REASON]


def _finished_error(rollout: Rollout, action: str) -> ConflictError:
    return ConflictError(
        f"cannot {action} rollout {rollout.id!r}: it is {rollout.phase} (finished); "
        f"start a new rollout with `fleet rollout {rollout.model}:VERSION`",
        rollout=rollout.id, phase=rollout.phase,
    )


def pause_rollout(ctx: ControllerContext, session: Session, name: str, reason: str | None = None, *,
                  now: datetime | None = None) -> dict[str, Any]:
    """Hold the rollout: devices stay exactly where they are until it is resumed."""
    now = now or _now()
    rollout = _get(session, name)
    phase = Phase(rollout.phase)
    if phase.is_finished:
        raise _finished_error(rollout, "pause")
    if phase is Phase.PAUSED:
        raise ConflictError(
            f"rollout {name!r} is already paused; resume it with `fleet rollout resume {name}`", rollout=name
        )
    text = _reason(reason, "paused by operator")
    rollout.phase = Phase.PAUSED.value
    rollout.message = f"paused: {text}"
    rollout.updated_at = now
    record(session, rollout, now, "pause", actor="operator", reason=text)
    session.flush()
    ctx.kick()
    return rollout_detail(session, name)


def resume_rollout(ctx: ControllerContext, session: Session, name: str, reason: str | None = None, *,
                   now: datetime | None = None) -> dict[str, Any]:
    """Continue a paused rollout; the analysis deadline counts again from now."""
    now = now or _now()
    rollout = _get(session, name)
    phase = Phase(rollout.phase)
    if phase.is_finished:
        raise _finished_error(rollout, "resume")
    if phase is not Phase.PAUSED:
        raise ConflictError(f"rollout {name!r} is {phase.value}, not Paused: there is nothing to resume",
                            rollout=name, phase=phase.value)
    text = _reason(reason, "resumed by operator")
    # A rollout paused before it ever started goes back to Pending, so the engine starts it.
    rollout.phase = (Phase.PROGRESSING if rollout.step_started_at is not None else Phase.PENDING).value
    rollout.message = f"resumed: {text}"
    rollout.updated_at = now
    record(session, rollout, now, "resume", actor="operator", reason=text)
    session.flush()
    ctx.kick()
    return rollout_detail(session, name)


def promote_rollout(ctx: ControllerContext, session: Session, name: str, reason: str | None = None, *,
                    now: datetime | None = None) -> dict[str, Any]:
    """Operator override: pass the current step now.

    In Shadow, the gate passes (recorded with the evidence as it stands) and the step's devices
    serve the candidate; in Serving, the step counts as confirmed and the next step starts (or
    the rollout completes). A paused rollout is resumed by the promotion.
    """
    now = now or _now()
    rollout = _get(session, name)
    phase = Phase(rollout.phase)
    if phase.is_finished:
        raise _finished_error(rollout, "promote")
    if rollout.step_started_at is None:
        raise ConflictError(
            f"rollout {name!r} has not started yet (the reconciler starts it within seconds); "
            "promote it once its first step is running",
            rollout=name,
        )
    text = _reason(reason, "promoted by operator")
    rollout.phase = Phase.PROGRESSING.value
    affected: set[str]
    if StepPhase(rollout.step_phase) is StepPhase.SHADOW:
        assessment = analyze(session, rollout, now)
        metrics = assessment.to_dict()
        metrics["engine_verdict"] = assessment.verdict.value
        record(session, rollout, now, "gate", verdict=Verdict.PASS.value, actor="operator",
               reason=f"{text} (the engine's verdict was {assessment.verdict.value}: {assessment.reason})",
               metrics=metrics)
        affected = enter_serving(session, rollout, now)
    else:
        record(session, rollout, now, "promote", actor="operator", reason=text)
        affected = advance(session, rollout, now, actor="operator", reason=text)
    session.flush()
    notify_after_commit(ctx, session, refresh_desired(ctx, session, sorted(affected)))
    ctx.kick()
    return rollout_detail(session, name)


def abort_rollout(ctx: ControllerContext, session: Session, name: str, reason: str | None = None, *,
                  now: datetime | None = None) -> dict[str, Any]:
    """Stop the rollout for good: every device that got the candidate goes back to its baseline."""
    now = now or _now()
    rollout = _get(session, name)
    if Phase(rollout.phase).is_finished:
        raise _finished_error(rollout, "abort")
    text = _reason(reason, "aborted by operator")
    holding = {row.device_id for row in session.scalars(
        select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id,
                                    RolloutDevice.state.in_(CANDIDATE_STATES)))}
    affected = finish_back(session, rollout, now, Phase.ABORTED, f"aborted: {text}")
    record(session, rollout, now, "abort", actor="operator", reason=text,
           metrics={"devices_sent_back": len(holding)})
    session.flush()
    notify_after_commit(ctx, session, refresh_desired(ctx, session, sorted(affected | holding)))
    ctx.kick()
    return rollout_detail(session, name)
