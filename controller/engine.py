"""The rollout reconciler: moves every unfinished rollout forward from what devices report.

Rules this module enforces:

- reconciling is a chain of ordered, idempotent steps (`reconcile_members`, `reconcile_start`,
  `reconcile_failures`, `reconcile_shadow`, `reconcile_serving`), each safe to repeat and
  returning early with the reason; one pass runs the chain for each rollout in its own
  transaction, so one broken rollout cannot block the others or leave half a transition;
- a device's cohort is fixed once drawn: at the start of step i the first
  `cohort_size(steps[i], n)` members by stable rank join step i; a device that becomes a member
  later joins the current step only if its rank is below `steps[i]`, else a later step;
- the gate (`fleet.core.gate.assess`) judges only the current step's shadow telemetry, received
  after the step began, with the cohort's device labels so that it can judge per label group;
  Pass moves the step's devices to serving, Fail sends every device that got the candidate back
  to its baseline and ends the rollout, Inconclusive waits, and past the
  analysis deadline pauses the rollout for an operator instead of guessing;
- a device counts as updated only when it reports the candidate loaded in its serving slot;
  offline devices do not hold a step back (they take the candidate from their desired state
  when they return), but a step needs at least one confirmed device to move on;
- every transition is recorded as a `Decision` with the numbers behind it; an Inconclusive
  analysis updates its latest row instead of writing one per pass;
- desired state follows from the rollout rows (`fleet.controller.desired.refresh_desired`); agents
  are notified only after the transaction that changed it has committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.controller.desired import refresh_desired
from fleet.controller.models import (
    FINISHED_PHASES,
    Assignment,
    Decision,
    Device,
    ModelVersion,
    Rollout,
    RolloutDevice,
    TelemetryWindow,
    UpdateEvent,
)
from fleet.core.errors import FleetError
from fleet.core.gate import CPU_KEYS, WALL_KEYS, Assessment, Evidence, GatePolicy, Verdict, assess
from fleet.core.rollout import (
    DeviceRolloutState,
    Phase,
    StepPhase,
    cohort_rank,
    cohort_size,
    selector_matches,
)

if TYPE_CHECKING:
    from fleet.controller.context import ControllerContext

log = logging.getLogger(__name__)

PENDING = DeviceRolloutState.PENDING.value
SHADOWING = DeviceRolloutState.SHADOWING.value
SERVING = DeviceRolloutState.SERVING.value
ROLLED_BACK = DeviceRolloutState.ROLLED_BACK.value
FAILED = DeviceRolloutState.FAILED.value
CANDIDATE_STATES = (SHADOWING, SERVING)

# An Inconclusive analysis refreshes its latest Decision row in place for this long, then starts
# a new one, so the log shows how the evidence grew without a row per pass.
ANALYSIS_RECORD_INTERVAL_S = 60.0
# Transitions chained within one pass (start -> shadow -> pass -> serving...), bounded so a bug
# cannot spin a pass forever.
MAX_CHAIN = 6
_CHUNK = 500


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- reading device reports -----------------------------------------------------------------------


def model_state(actual: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    for item in (actual or {}).get("models") or ():
        if isinstance(item, dict) and item.get("model") == model:
            return item
    return None


def slot_version(actual: dict[str, Any] | None, model: str, role: str) -> str | None:
    state = model_state(actual, model)
    for slot in (state or {}).get("slots") or ():
        if isinstance(slot, dict) and slot.get("role") == role and slot.get("version"):
            return str(slot["version"])
    return None


def is_confirmed(actual: dict[str, Any] | None, model: str, version: str) -> bool:
    """The device reports `version` loaded in its serving slot."""
    state = model_state(actual, model)
    return any(
        isinstance(slot, dict) and slot.get("role") == "serving" and slot.get("version") == version
        and bool(slot.get("loaded"))
        for slot in (state or {}).get("slots") or ()
    )


def reported_failure(device: Device, model: str, version: str) -> str | None:
    """Why the device's update to `version` failed, if its current report says it did.

    Only a report made after the agent took in its newest desired state counts: a Failed status
    left over from an earlier attempt at the same version must not fail a fresh one.
    """
    if int(device.acked_generation or 0) < int(device.desired_generation or 0):
        return None
    update = (model_state(device.actual, model) or {}).get("update") or {}
    if update.get("state") != "Failed":
        return None
    if version not in (update.get("failed_version"), update.get("target_version")):
        return None
    return str(update.get("error") or "the update failed (no reason reported)")


def desired_serving_version(desired: dict[str, Any] | None, model: str) -> str | None:
    for item in (desired or {}).get("models") or ():
        if isinstance(item, dict) and item.get("model") == model and item.get("serving"):
            return str(item["serving"].get("version") or "") or None
    return None


def baseline_of(device: Device, model: str) -> str | None:
    """What the device serves now: its desired serving version, else the one it reports."""
    return desired_serving_version(device.desired, model) or slot_version(device.actual, model, "serving")


# -- shared transitions (also used by the operator actions in `fleet.controller.rollouts`) ---------


def members_of(session: Session, rollout: Rollout) -> list[RolloutDevice]:
    """The rollout's member rows whose devices are still enrolled, by rank."""
    rows = session.execute(
        select(RolloutDevice)
        .join(Device, Device.id == RolloutDevice.device_id)
        .where(RolloutDevice.rollout_id == rollout.id, Device.decommissioned.is_(False))
        .order_by(RolloutDevice.rank, RolloutDevice.device_id)
    ).scalars()
    return list(rows)


def devices_by_id(session: Session, ids: Iterable[str]) -> dict[str, Device]:
    wanted = sorted(set(ids))
    out: dict[str, Device] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        out.update({d.id: d for d in session.scalars(select(Device).where(Device.id.in_(chunk)))})
    return out


def record(
    session: Session,
    rollout: Rollout,
    now: datetime,
    kind: str,
    *,
    reason: str,
    verdict: str | None = None,
    actor: str = "engine",
    metrics: dict[str, Any] | None = None,
) -> Decision:
    decision = Decision(
        rollout_id=rollout.id, step_index=rollout.step_index, at=now, kind=kind, verdict=verdict,
        actor=actor, reason=reason, metrics=metrics or {},
    )
    session.add(decision)
    return decision


def set_state(row: RolloutDevice, state: str, now: datetime, reason: str = "") -> bool:
    if row.state == state and (not reason or row.reason == reason):
        return False
    row.state = state
    row.reason = reason
    row.updated_at = now
    return True


def _set_message(rollout: Rollout, message: str, now: datetime) -> None:
    if rollout.message != message:
        rollout.message = message
        rollout.updated_at = now


def enter_step(session: Session, rollout: Rollout, index: int, now: datetime, *, actor: str = "engine",
               reason: str = "") -> set[str]:
    """Start step `index` in Shadow: draw its cohort and move it to the candidate as shadow."""
    members = members_of(session, rollout)
    steps = [float(s) for s in rollout.steps]
    target = cohort_size(steps[index], len(members))
    joined: list[str] = []
    # Members are ordered by rank: the first `target` form the cumulative cohort up to this step.
    for row in members[:target]:
        if row.step_index is None:
            row.step_index = index
            joined.append(row.device_id)
    for row in members:
        if row.step_index == index and row.state == PENDING:
            set_state(row, SHADOWING, now)
    rollout.step_index = index
    rollout.step_phase = StepPhase.SHADOW.value
    rollout.step_started_at = now
    rollout.updated_at = now
    in_step = sum(1 for row in members if row.step_index == index)
    message = (f"step {index + 1}/{len(steps)} ({steps[index]:.0%}): {in_step} new devices shadow "
               f"{rollout.model}:{rollout.version}; {target} of {len(members)} devices in cohorts so far")
    _set_message(rollout, message, now)
    record(session, rollout, now, "step", actor=actor, reason=f"{reason}; {message}" if reason else message,
           metrics={"step": index, "fraction": steps[index], "cohort_devices": in_step,
                    "cumulative_target": target, "members": len(members), "joined": joined[:100]})
    return {row.device_id for row in members if row.step_index == index}


def enter_serving(session: Session, rollout: Rollout, now: datetime) -> set[str]:
    """The current step's devices serve the candidate."""
    rollout.step_phase = StepPhase.SERVING.value
    # The Serving phase has its own clock: the deadline for confirmations counts from here.
    rollout.step_started_at = now
    rollout.updated_at = now
    affected: set[str] = set()
    for row in members_of(session, rollout):
        if row.step_index == rollout.step_index and row.state in (PENDING, SHADOWING) \
                and set_state(row, SERVING, now):
            affected.add(row.device_id)
    steps = list(rollout.steps)
    _set_message(rollout, f"step {rollout.step_index + 1}/{len(steps)}: {len(affected)} devices switch to "
                          f"serving {rollout.model}:{rollout.version}; waiting for them to confirm", now)
    return affected


def finish_back(session: Session, rollout: Rollout, now: datetime, phase: Phase, reason: str) -> set[str]:
    """End the rollout (RolledBack or Aborted): every device holding the candidate goes back."""
    affected: set[str] = set()
    for row in session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)):
        if row.state in CANDIDATE_STATES:
            set_state(row, ROLLED_BACK, now, reason[:2000])
            affected.add(row.device_id)
    rollout.phase = phase.value
    rollout.finished_at = now
    rollout.updated_at = now
    _set_message(rollout, reason, now)
    return affected


def advance(session: Session, rollout: Rollout, now: datetime, *, actor: str = "engine",
            reason: str = "") -> set[str]:
    """After the current step serves: start the next step, or complete the rollout."""
    steps = list(rollout.steps)
    if rollout.step_index + 1 < len(steps):
        return enter_step(session, rollout, rollout.step_index + 1, now, actor=actor, reason=reason)
    return complete(session, rollout, now, actor=actor, reason=reason)


def complete(session: Session, rollout: Rollout, now: datetime, *, actor: str = "engine",
             reason: str = "") -> set[str]:
    """The whole selection serves the candidate: make it the assignment and the `stable` alias."""
    from fleet.controller.registry import set_alias

    session.add(Assignment(model=rollout.model, version=rollout.version,
                           selector=dict(rollout.selector or {}), rollout_id=rollout.id, created_at=now))
    alias_note = ""
    try:
        set_alias(session, rollout.model, "stable", rollout.version)
    except FleetError as exc:
        # A version literally named "stable" blocks the alias; that must not block the rollout.
        alias_note = f"; the stable alias was not moved: {exc}"
    rollout.phase = Phase.COMPLETED.value
    rollout.finished_at = now
    rollout.updated_at = now
    message = (reason + "; " if reason else "") + (
        f"completed: {rollout.model}:{rollout.version} is assigned to every device matching "
        f"{_selector_text(rollout.selector)}"
        + (alias_note or f" and is now {rollout.model}:stable"))
    _set_message(rollout, message, now)
    record(session, rollout, now, "complete", actor=actor, reason=message)
    # The new assignment reaches every matching device, members or not.
    affected = {row.device_id for row in session.scalars(
        select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id))}
    for device_id, labels in session.execute(select(Device.id, Device.labels)
                                             .where(Device.decommissioned.is_(False))):
        if selector_matches(rollout.selector, labels):
            affected.add(device_id)
    return affected


def _selector_text(selector: dict[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector or {}).items())) or "(all devices)"


def analysis_clock_start(session: Session, rollout: Rollout) -> datetime:
    """When the current wait began: the step phase's start, or a later resume by an operator."""
    start = rollout.step_started_at or rollout.created_at
    resumed = session.scalar(
        select(Decision.at)
        .where(Decision.rollout_id == rollout.id, Decision.kind == "resume", Decision.at >= start)
        .order_by(Decision.at.desc())
        .limit(1)
    )
    return max(start, resumed) if resumed is not None else start


def analyze(session: Session, rollout: Rollout, now: datetime) -> Assessment:
    """Judge the current step's shadow evidence with the rollout's gate."""
    policy = GatePolicy.from_dict(rollout.gate)
    cohort = [row for row in members_of(session, rollout) if row.step_index == rollout.step_index]
    since = rollout.step_started_at or rollout.created_at
    members = {row.device_id for row in cohort}
    windows: list[dict[str, Any]] = []
    # Selected by the (model, version, role, time) index; cohort filtering happens in Python so
    # the query stays the same size for any cohort.
    for window in session.scalars(
        select(TelemetryWindow).where(
            TelemetryWindow.model == rollout.model,
            TelemetryWindow.version == rollout.version,
            TelemetryWindow.role == "shadow",
            TelemetryWindow.window_end >= since,
        )
    ):
        if window.device_id not in members:
            continue
        payload = window.payload or {}
        windows.append({
            "device_id": window.device_id, "model": window.model, "version": window.version,
            "role": window.role, "requests": window.requests, "errors": window.errors,
            **{key: payload.get(key) for key in (*CPU_KEYS, *WALL_KEYS)},
            "agreement": payload.get("agreement") or [],
        })
    # Labels feed the per-group analysis (a candidate slower only on one kind of device).
    labels = {device_id: dict(device_labels or {}) for device_id, device_labels in session.execute(
        select(Device.id, Device.labels).where(Device.id.in_(sorted(members)))
    )} if len(members) <= _CHUNK else {d.id: dict(d.labels or {}) for d in devices_by_id(session, members).values()}
    evidence = Evidence.from_windows(
        windows,
        candidate=rollout.version,
        cohort=[row.device_id for row in cohort],
        failed=[row.device_id for row in cohort if row.state == FAILED],
        baseline_devices=sum(1 for row in cohort if row.baseline_version),
        labels=labels,
    )
    task = session.scalar(select(ModelVersion.task).where(
        ModelVersion.name == rollout.model, ModelVersion.version == rollout.version)) or "generic"
    elapsed = (now - analysis_clock_start(session, rollout)).total_seconds()
    assessment = assess(policy, evidence, task, elapsed)
    assessment.summary["step"] = rollout.step_index
    return assessment


def latest_decision(session: Session, rollout: Rollout, kind: str | None = None) -> Decision | None:
    query = select(Decision).where(Decision.rollout_id == rollout.id)
    if kind is not None:
        query = query.where(Decision.kind == kind)
    return session.scalar(query.order_by(Decision.at.desc(), Decision.id.desc()).limit(1))


# -- the reconciler -------------------------------------------------------------------------------


class Reconciler:
    """Runs reconciliation passes. `reconcile_once` is blocking; the server runs it on a worker thread."""

    def __init__(
        self,
        ctx: ControllerContext,
        *,
        clock: Callable[[], datetime] = _utcnow,
        analysis_record_interval_s: float = ANALYSIS_RECORD_INTERVAL_S,
        strict: bool = False,
    ) -> None:
        self.ctx = ctx
        self.clock = clock
        self.analysis_record_interval_s = analysis_record_interval_s
        # strict: re-raise a rollout's failure (tests); otherwise log it and go on with the others.
        self.strict = strict

    def reconcile_once(self, now: datetime | None = None) -> list[str]:
        """One pass over new devices and every unfinished rollout; returns the devices notified."""
        now = now or self.clock()
        changed: list[str] = []
        changed += self._transaction("new devices", self.reconcile_new_devices)
        with self.ctx.session_factory() as session:
            open_ids = list(session.scalars(
                select(Rollout.id).where(Rollout.phase.not_in(FINISHED_PHASES)).order_by(Rollout.created_at)
            ))
        for rollout_id in open_ids:
            changed += self._transaction(f"rollout {rollout_id}", partial(self.reconcile_rollout,
                                                                          rollout_id=rollout_id, now=now))
        return sorted(set(changed))

    def _transaction(self, what: str, work: Callable[[Session], list[str]]) -> list[str]:
        try:
            with self.ctx.session_factory() as session, session.begin():
                changed = work(session)
        except Exception:
            if self.strict:
                raise
            log.exception("reconciling %s failed; it is retried on the next pass", what)
            return []
        # Only now is the new generation durable: wake the agents.
        if changed:
            self.ctx.on_desired_changed(changed)
        return changed

    def reconcile_new_devices(self, session: Session) -> list[str]:
        """Devices that never got a desired state (generation 0) get one."""
        ids = list(session.scalars(
            select(Device.id).where(Device.desired_generation == 0, Device.decommissioned.is_(False))
        ))
        if not ids:
            return []  # every device has a desired state already
        return refresh_desired(self.ctx, session, ids)

    def reconcile_rollout(self, session: Session, rollout_id: str, now: datetime) -> list[str]:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None or Phase(rollout.phase).is_finished:
            return []  # finished (or deleted) since the pass listed it, e.g. by an operator's abort
        affected: set[str] = set()
        for _ in range(MAX_CHAIN):
            if not self._chain(session, rollout, now, affected):
                break
        session.flush()
        return refresh_desired(self.ctx, session, sorted(affected)) if affected else []

    def _chain(self, session: Session, rollout: Rollout, now: datetime, affected: set[str]) -> bool:
        """Run the ordered steps once; True when the rollout moved on and the chain should run again."""
        phase = Phase(rollout.phase)
        if phase.is_finished:
            return False  # a step below finished it
        if phase is Phase.PAUSED:
            return False  # paused by an operator or the deadline: every device stays where it is
        self.reconcile_members(session, rollout, now)
        if self.reconcile_start(session, rollout, now, affected):
            return True
        affected |= self.reconcile_failures(session, rollout, now)
        if StepPhase(rollout.step_phase) is StepPhase.SHADOW:
            return self.reconcile_shadow(session, rollout, now, affected)
        return self.reconcile_serving(session, rollout, now, affected)

    # -- the ordered steps ------------------------------------------------------------------------

    def reconcile_members(self, session: Session, rollout: Rollout, now: datetime) -> None:
        """Devices matching the selector that are not members yet become members."""
        known = set(session.scalars(
            select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
        ))
        new_ids = [
            device_id
            for device_id, labels in session.execute(
                select(Device.id, Device.labels).where(Device.decommissioned.is_(False))
            )
            if device_id not in known and selector_matches(rollout.selector, labels)
        ]
        if not new_ids:
            return  # no device joined the selection since the last pass
        started = Phase(rollout.phase) is not Phase.PENDING
        steps = [float(s) for s in rollout.steps]
        devices = devices_by_id(session, new_ids)
        for device_id in new_ids:
            rank = cohort_rank(rollout.id, device_id)
            # The current step's cohort was drawn already: a late device joins it only if its rank
            # would have put it there; otherwise a later step's draw picks it up.
            step = rollout.step_index if started and rank < steps[rollout.step_index] else None
            session.add(RolloutDevice(
                rollout_id=rollout.id, device_id=device_id, rank=rank, step_index=step, state=PENDING,
                baseline_version=baseline_of(devices[device_id], rollout.model), reason="", updated_at=now,
            ))
        session.flush()

    def reconcile_start(self, session: Session, rollout: Rollout, now: datetime, affected: set[str]) -> bool:
        """A Pending rollout starts: Progressing, step 0 in Shadow."""
        if Phase(rollout.phase) is not Phase.PENDING:
            return False  # already started
        rollout.phase = Phase.PROGRESSING.value
        affected |= enter_step(session, rollout, 0, now)
        return True

    def reconcile_failures(self, session: Session, rollout: Rollout, now: datetime) -> set[str]:
        """Devices whose update to the candidate failed leave the rollout's candidate (state Failed)."""
        holding = [row for row in members_of(session, rollout) if row.state in CANDIDATE_STATES]
        if not holding:
            return set()  # nobody holds the candidate, so nobody can fail it
        devices = devices_by_id(session, (row.device_id for row in holding))
        events: dict[str, str] = {}
        for device_id, event_reason in session.execute(
            select(UpdateEvent.device_id, UpdateEvent.reason)
            .where(UpdateEvent.model == rollout.model, UpdateEvent.version == rollout.version,
                   UpdateEvent.state == "Failed", UpdateEvent.at >= rollout.created_at)
            .order_by(UpdateEvent.at)
        ):
            events[device_id] = event_reason
        failed: set[str] = set()
        for row in holding:
            device = devices.get(row.device_id)
            reason: str | None
            if row.device_id in events:
                reason = events[row.device_id] or "no reason reported"
            else:
                reason = reported_failure(device, rollout.model, rollout.version) if device else None
            if reason is None:
                continue  # no failure reported for this device
            text = f"update to {rollout.version} failed: {reason}"
            set_state(row, FAILED, now, text[:2000])
            failed.add(row.device_id)
        return failed

    def reconcile_shadow(
        self, session: Session, rollout: Rollout, now: datetime, affected: set[str]
    ) -> bool:
        """The step's cohort shadows the candidate until the gate decides."""
        for row in members_of(session, rollout):
            in_step = row.step_index == rollout.step_index
            if in_step and row.state == PENDING and set_state(row, SHADOWING, now):
                affected.add(row.device_id)
        assessment = analyze(session, rollout, now)
        metrics = assessment.to_dict()
        if assessment.verdict is Verdict.PASS:
            record(session, rollout, now, "gate", verdict=Verdict.PASS.value, reason=assessment.reason,
                   metrics=metrics)
            affected |= enter_serving(session, rollout, now)
            return True
        if assessment.verdict is Verdict.FAIL:
            reason = f"gate failed at step {rollout.step_index + 1}: {assessment.reason}"
            record(session, rollout, now, "gate", verdict=Verdict.FAIL.value, reason=reason, metrics=metrics)
            affected |= finish_back(session, rollout, now, Phase.ROLLED_BACK, reason)
            record(session, rollout, now, "rollback", reason=reason)
            return True
        self._record_analysis(session, rollout, now, assessment)
        if assessment.deadline_passed:
            rollout.phase = Phase.PAUSED.value
            _set_message(rollout, f"paused: {assessment.reason}", now)
            record(session, rollout, now, "pause", verdict=Verdict.INCONCLUSIVE.value,
                   reason=assessment.reason, metrics=metrics)
            return False
        _set_message(rollout, assessment.reason, now)
        return False

    def _record_analysis(
        self, session: Session, rollout: Rollout, now: datetime, assessment: Assessment
    ) -> None:
        last = latest_decision(session, rollout)
        fresh = (
            last is not None and last.kind == "gate" and last.verdict == Verdict.INCONCLUSIVE.value
            and last.step_index == rollout.step_index
            and (now - last.at).total_seconds() < self.analysis_record_interval_s
        )
        if fresh and last is not None:
            if last.metrics.get("metrics") != assessment.rows or last.reason != assessment.reason:
                last.metrics = assessment.to_dict()
                last.reason = assessment.reason
            return
        record(session, rollout, now, "gate", verdict=Verdict.INCONCLUSIVE.value, reason=assessment.reason,
               metrics=assessment.to_dict())

    def reconcile_serving(
        self, session: Session, rollout: Rollout, now: datetime, affected: set[str]
    ) -> bool:
        """The step's cohort serves the candidate; once every connected device confirms, move on."""
        cohort = [row for row in members_of(session, rollout) if row.step_index == rollout.step_index]
        for row in cohort:
            # Late joiners of a step whose gate already passed serve directly.
            if row.state in (PENDING, SHADOWING) and set_state(row, SERVING, now):
                affected.add(row.device_id)
        policy = GatePolicy.from_dict(rollout.gate)
        failed = [row.device_id for row in cohort if row.state == FAILED]
        share = len(failed) / len(cohort) if cohort else 0.0
        if share > policy.max_install_failure_share + 1e-12:
            reason = (f"{len(failed)} of {len(cohort)} devices of step {rollout.step_index + 1} failed to "
                      f"serve {rollout.version} ({share:.0%} > {policy.max_install_failure_share:.0%}): "
                      + ", ".join(failed[:5]))
            record(session, rollout, now, "gate", verdict=Verdict.FAIL.value, reason=reason, metrics={
                "metrics": [{"metric": "install_failure_share", "value": round(share, 6),
                          "threshold": policy.max_install_failure_share, "comparison": "<=", "ok": False,
                          "samples": len(cohort), "detail": reason,
                          "worst_devices": [{"device": d, "value": 1.0, "samples": 1} for d in failed[:3]]}],
            })
            affected |= finish_back(session, rollout, now, Phase.ROLLED_BACK, reason)
            record(session, rollout, now, "rollback", reason=reason)
            return True

        serving = [row for row in cohort if row.state == SERVING]
        devices = devices_by_id(session, (row.device_id for row in serving))
        confirmed, waiting, offline = [], [], []
        for row in serving:
            device = devices.get(row.device_id)
            if device is not None and is_confirmed(device.actual, rollout.model, rollout.version):
                confirmed.append(row.device_id)
            elif device is not None and device.connected:
                waiting.append(row.device_id)
            else:
                offline.append(row.device_id)
        total = len(rollout.steps)
        if waiting or (serving and not confirmed):
            elapsed = (now - analysis_clock_start(session, rollout)).total_seconds()
            pending = waiting or offline
            status = (f"step {rollout.step_index + 1}/{total}: {len(confirmed)} of {len(serving)} devices "
                      f"confirm serving {rollout.version}; waiting for " + ", ".join(pending[:5])
                      + (f" and {len(pending) - 5} more" if len(pending) > 5 else "")
                      + (" (all offline)" if not waiting else ""))
            if elapsed > policy.analysis_deadline_s:
                rollout.phase = Phase.PAUSED.value
                reason = (f"paused: {len(pending)} devices did not confirm serving {rollout.version} within "
                          f"{policy.analysis_deadline_s:g}s: " + ", ".join(pending[:5])
                          + "; check `fleet devices show`, then resume or abort")
                _set_message(rollout, reason, now)
                record(session, rollout, now, "pause", reason=reason, metrics={
                    "confirmed": len(confirmed), "waiting": waiting[:100], "offline": offline[:100]})
                return False
            _set_message(rollout, status, now)
            return False  # the step is not confirmed yet
        reason = (f"step {rollout.step_index + 1}/{total} confirmed: {len(confirmed)} devices serve "
                  f"{rollout.version}" + (f", {len(offline)} offline will follow" if offline else "")
                  + (f", {len(failed)} failed" if failed else ""))
        affected |= advance(session, rollout, now, reason=reason)
        return True
