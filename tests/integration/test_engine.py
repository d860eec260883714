"""The rollout reconciler on a real SQLite database, driven pass by pass with a fake clock.

Given devices, model versions and assignments inserted as the registry and enrolment would,
when agents report state and shadow telemetry (written as the gRPC service stores them) and
`reconcile_once` runs, then rollouts move through their steps, gates decide from the numbers,
and every device's desired state says what it should run at each point.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.controller import rollouts as ops
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.desired import desired_state
from fleet.controller.engine import Reconciler
from fleet.controller.models import (
    Assignment,
    Decision,
    Device,
    ModelAlias,
    ModelVersion,
    RolloutDevice,
    TelemetryWindow,
    UpdateEvent,
)
from fleet.controller.registry import bundle_key
from fleet.controller.settings import ControllerSettings
from fleet.core.errors import ConflictError, InvalidInputError, NotFoundError
from fleet.core.histogram import LatencyHistogram
from fleet.core.rollout import cohort_rank


def _hist(value_ms: float, n: int) -> dict[str, Any]:
    h = LatencyHistogram()
    for i in range(n):
        h.record(value_ms * (0.9 + 0.02 * (i % 10)))
    return h.to_dict()


class Fleet:
    """A controller database plus simulated agents, on a fake clock."""

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self.notified: list[list[str]] = []
        self.kicks = 0
        ctx.on_desired_changed = self.notified.append
        ctx.kick = self._kick
        self.now = datetime.now(UTC).replace(microsecond=0)
        self.reconciler = Reconciler(ctx, clock=lambda: self.now, strict=True)
        self.seq = 0

    def _kick(self) -> None:
        self.kicks += 1

    @contextmanager
    def db(self) -> Iterator[Session]:
        with self.ctx.session_factory() as session, session.begin():
            yield session

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def reconcile(self) -> list[str]:
        return self.reconciler.reconcile_once(self.now)

    # -- registry and devices ---------------------------------------------------------------------

    def add_version(self, model: str, version: str, task: str = "classification") -> None:
        sha = hashlib.sha256(f"{model}:{version}".encode()).hexdigest()
        with self.db() as s:
            s.add(ModelVersion(name=model, version=version, task=task, release=1, manifest={},
                               bundle_key=bundle_key(model, version), sha256=sha, size=1000,
                               target_path=f"{model}/{version}/bundle.tar", created_at=self.now))

    def add_devices(self, ids: list[str], labels: dict[str, str] | None = None, *,
                    connected: bool = True) -> None:
        with self.db() as s:
            for device_id in ids:
                s.add(Device(id=device_id, labels=dict(labels or {"site": "a"}), hardware={}, secret_hash="x",
                             connected=connected, actual={}, desired={}, desired_generation=0))

    def assign(self, model: str, version: str, selector: dict[str, str] | None = None) -> None:
        with self.db() as s:
            s.add(Assignment(model=model, version=version, selector=selector or {}, rollout_id=None,
                             created_at=self.now - timedelta(hours=1)))

    def set_connected(self, device_id: str, connected: bool) -> None:
        with self.db() as s:
            s.get(Device, device_id).connected = connected  # type: ignore[union-attr]

    # -- simulated agents -------------------------------------------------------------------------

    def follow(self, ids: list[str]) -> None:
        """The agents apply their desired state and report it (slots loaded, update Idle)."""
        with self.db() as s:
            for device_id in ids:
                device = s.get(Device, device_id)
                assert device is not None
                models = []
                for item in device.desired.get("models", []):
                    slots = [{"role": "serving", "version": item["serving"]["version"], "sha256": "",
                              "loaded": True, "execution_providers": ["CPUExecutionProvider"]}]
                    if item.get("shadow"):
                        slots.append({"role": "shadow", "version": item["shadow"]["version"], "sha256": "",
                                      "loaded": True, "execution_providers": ["CPUExecutionProvider"]})
                    models.append({"model": item["model"], "slots": slots,
                                   "update": {"state": "Idle", "target_version": "", "error": ""}})
                device.actual = {"desired_generation": device.desired_generation, "models": models}
                device.acked_generation = device.desired_generation

    def fail_update(self, device_id: str, model: str, version: str, error: str) -> None:
        """The agent took in its desired state but could not load the candidate."""
        with self.db() as s:
            device = s.get(Device, device_id)
            assert device is not None
            device.actual = {"desired_generation": device.desired_generation, "models": [{
                "model": model, "slots": [],
                "update": {"state": "Failed", "target_version": version, "target_role": "shadow",
                           "error": error, "failed_version": version, "attempt": 1},
            }]}
            device.acked_generation = device.desired_generation

    def shadow_traffic(self, ids: list[str], requests: int, *, model: str = "det", version: str = "v2",
                       top1: float = 1.0, shadow_ms: float = 2.0, serving_ms: float = 2.0,
                       errors: int = 0, cpu_ms: tuple[float, float] | None = None) -> None:
        """Each device reports one telemetry window of mirrored requests, as the agent would
        (`cpu_ms`: the on-CPU times of candidate and serving, reported beside the wall times)."""
        with self.db() as s:
            for device_id in ids:
                self.seq += 1
                ok = requests - errors
                s.add(TelemetryWindow(
                    device_id=device_id, seq=self.seq, model=model, version=version, role="shadow",
                    compared_to="v1", window_start=self.now - timedelta(seconds=5), window_end=self.now,
                    requests=requests, errors=errors,
                    payload={
                        "latency_ms": _hist(shadow_ms, ok),
                        "paired_serving_latency_ms": _hist(serving_ms, ok),
                        "agreement": [{"output": "probs", "samples": ok, "cosine_sum": 0.99 * ok,
                                       "cosine_min": 0.9, "mean_abs_diff_sum": 0.01 * ok, "max_abs_diff": 0.1,
                                       "top1_agree": round(top1 * ok), "top1_samples": ok}],
                        "mirrored": 0, "shadow_dropped": 0,
                        **({"cpu_ms": _hist(cpu_ms[0], ok), "paired_serving_cpu_ms": _hist(cpu_ms[1], ok)}
                           if cpu_ms else {}),
                    },
                    received_at=self.now,
                ))

    # -- reading ----------------------------------------------------------------------------------

    def desired(self, device_id: str, model: str = "det") -> tuple[str | None, str | None, float]:
        with self.db() as s:
            state = desired_state(s, device_id)
        for item in state["models"]:
            if item["model"] == model:
                shadow = item["shadow"]["version"] if item["shadow"] else None
                return item["serving"]["version"], shadow, item["shadow_sample_rate"]
        return None, None, 0.0

    def generation(self, device_id: str) -> int:
        with self.db() as s:
            return int(desired_state(s, device_id)["generation"])

    def detail(self, name: str) -> dict[str, Any]:
        with self.db() as s:
            return ops.rollout_detail(s, name)

    def states(self, name: str) -> dict[str, str]:
        with self.db() as s:
            return {r.device_id: r.state for r in s.scalars(select(RolloutDevice)
                                                              .where(RolloutDevice.rollout_id == name))}

    def decisions(self, name: str) -> list[tuple[str, str | None, str]]:
        with self.db() as s:
            return [(d.kind, d.verdict, d.actor) for d in s.scalars(
                select(Decision).where(Decision.rollout_id == name).order_by(Decision.at, Decision.id))]

    def create(self, **kwargs: Any) -> dict[str, Any]:
        # The scenarios mirror a few hundred requests: min_samples 200 instead of the default 1000.
        args: dict[str, Any] = {"model": "det", "version": "v2", "steps": None, "selector": None,
                                "gate": {"min_samples": 200}, "shadow_sample_rate": 0.5, "name": None, "canary": "10%"}
        args.update(kwargs)
        with self.db() as s:
            return ops.create_rollout(self.ctx, s, now=self.now, **args)

    def act(self, action: str, name: str, reason: str | None = None) -> dict[str, Any]:
        with self.db() as s:
            operation = getattr(ops, f"{action}_rollout")
            result: dict[str, Any] = operation(self.ctx, s, name, reason, now=self.now)
            return result


DEVICES = [f"cam-{i:02d}" for i in range(10)]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    ctx = build_context(ControllerSettings(data_dir=tmp_path / "controller"))
    try:
        yield Fleet(ctx)
    finally:
        ctx.close()


@pytest.fixture
def running(fleet: Fleet) -> Fleet:
    """Ten devices serving det:v1 from an assignment; v2 pushed."""
    fleet.add_version("det", "v1")
    fleet.add_version("det", "v2")
    fleet.add_devices(DEVICES)
    fleet.assign("det", "v1")
    assert sorted(fleet.reconcile()) == DEVICES  # new devices get their first desired state
    fleet.follow(DEVICES)
    assert all(fleet.desired(d) == ("v1", None, 0.0) for d in DEVICES)
    fleet.notified.clear()
    return fleet


def by_rank(name: str, ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda d: (cohort_rank(name, d), d))


def test_promotion_through_canary_and_full_step(running: Fleet) -> None:
    f = running
    detail = f.create()
    name = detail["name"]
    assert name == "det-v2" and detail["phase"] == "Pending" and detail["steps"] == [0.1, 1.0]
    assert f.kicks == 1
    ordered = by_rank(name, DEVICES)
    canary, rest = ordered[0], ordered[1:]

    # Start: step 1 (10% of 10 = 1 device) shadows v2 next to v1, at the rollout's sample rate.
    f.tick(1)
    assert f.reconcile() == [canary]
    assert f.notified == [[canary]]
    assert f.desired(canary) == ("v1", "v2", 0.5)
    assert all(f.desired(d) == ("v1", None, 0.0) for d in rest)
    detail = f.detail(name)
    assert (detail["phase"], detail["step_index"], detail["step_phase"]) == ("Progressing", 0, "Shadow")
    assert detail["cohorts"][0]["shadowing"] == 1 and detail["devices_unassigned"] == 9

    # Not enough samples yet: Inconclusive, one analysis row updated in place, nothing moves.
    f.follow([canary])
    f.shadow_traffic([canary], 120)
    f.tick(2)
    assert f.reconcile() == []
    f.tick(2)
    f.reconcile()
    detail = f.detail(name)
    assert detail["analysis"]["verdict"] == "Inconclusive"
    samples = next(r for r in detail["analysis"]["metrics"] if r["metric"] == "samples")
    assert samples["value"] == 120 and samples["threshold"] == 200
    assert "120 of 200" in detail["message"]
    assert [d for d in f.decisions(name) if d[0] == "gate"] == [("gate", "Inconclusive", "engine")]

    # Enough good samples: the gate passes and the canary serves v2.
    f.shadow_traffic([canary], 100)
    f.tick(2)
    assert f.reconcile() == [canary]
    assert f.desired(canary) == ("v2", None, 0.0)
    detail = f.detail(name)
    assert detail["step_phase"] == "Serving"
    gate = [d for d in detail["decisions"] if d["kind"] == "gate"][-1]
    assert gate["verdict"] == "Pass" and gate["metrics"]["requests"] == 220
    assert {r["metric"] for r in gate["metrics"]["metrics"]} >= {
        "samples", "latency", "agreement[probs]", "install_failure_share", "error_rate"}

    # Until the canary confirms v2 loaded in its serving slot, the step waits.
    f.tick(2)
    assert f.reconcile() == []
    assert f.detail(name)["step_index"] == 0
    f.follow([canary])
    f.tick(2)
    changed = f.reconcile()
    assert sorted(changed) == sorted(rest)  # step 2 (100%): the other nine shadow v2
    detail = f.detail(name)
    assert (detail["step_index"], detail["step_phase"]) == (1, "Shadow")
    assert detail["cohorts"][0]["confirmed"] == 1 and detail["cohorts"][1]["shadowing"] == 9
    assert all(f.desired(d) == ("v1", "v2", 0.5) for d in rest)
    assert f.desired(canary) == ("v2", None, 0.0)

    # The gate of step 2 counts only step 2's cohort: 9 x 15 = 135 requests are not enough...
    f.follow(rest)
    f.shadow_traffic(rest, 15)
    f.tick(2)
    assert f.reconcile() == []
    assert "135 of 200" in f.detail(name)["message"]
    # ...9 x 25 = 225 are, and the nine serve v2.
    f.shadow_traffic(rest, 10)
    offline = rest[0]
    f.set_connected(offline, False)
    f.tick(2)
    assert sorted(f.reconcile()) == sorted(rest)
    assert all(f.desired(d) == ("v2", None, 0.0) for d in rest)
    # One device is offline: it does not hold the step back; the others confirm.
    f.follow(rest[1:])
    f.tick(2)
    f.reconcile()
    detail = f.detail(name)
    assert detail["phase"] == "Completed", detail["message"]
    assert [d[0] for d in f.decisions(name)] == [
        "step", "step", "gate", "gate", "step", "gate", "gate", "complete"]
    with f.db() as s:
        assignment = s.scalars(select(Assignment).order_by(Assignment.id.desc())).first()
        assert assignment is not None
        assert (assignment.version, assignment.rollout_id) == ("v2", name)
        assert s.get(ModelAlias, ("det", "stable")).version == "v2"  # type: ignore[union-attr]
    # Every device, the offline one included, now has v2 from the assignment.
    assert all(f.desired(d) == ("v2", None, 0.0) for d in DEVICES)
    assert f.desired(offline) == ("v2", None, 0.0)

    # Reconciling a finished rollout changes nothing: same generations, no notifications.
    generations = {d: f.generation(d) for d in DEVICES}
    f.notified.clear()
    f.tick(60)
    assert f.reconcile() == []
    assert {d: f.generation(d) for d in DEVICES} == generations and f.notified == []


def test_rollback_on_bad_agreement(running: Fleet) -> None:
    f = running
    name = f.create()["name"]
    canary = by_rank(name, DEVICES)[0]
    f.tick(1)
    f.reconcile()
    f.follow([canary])
    generation = f.generation(canary)
    f.shadow_traffic([canary], 250, top1=0.6)
    f.tick(5)
    assert f.reconcile() == [canary]
    detail = f.detail(name)
    assert detail["phase"] == "RolledBack"
    assert "agreement" in detail["message"] and "0.600 < 0.980" in detail["message"]
    row = next(r for r in detail["analysis"]["metrics"] if r["metric"] == "agreement[probs]")
    assert row["value"] == pytest.approx(0.6) and row["ok"] is False
    assert row["worst_devices"][0]["device"] == canary
    assert f.states(name)[canary] == "RolledBack"
    assert f.desired(canary) == ("v1", None, 0.0) and f.generation(canary) == generation + 1
    assert [d[:2] for d in f.decisions(name)][-2:] == [("gate", "Fail"), ("rollback", None)]
    # Nothing was assigned; a new rollout of the same model may start, named with a suffix.
    with f.db() as s:
        assert s.scalar(select(Assignment).where(Assignment.version == "v2")) is None
    assert f.create()["name"] == "det-v2-2"


def test_install_failure_rolls_back(running: Fleet) -> None:
    f = running
    name = f.create(canary="20%")["name"]
    cohort = by_rank(name, DEVICES)[:2]
    f.tick(1)
    assert sorted(f.reconcile()) == sorted(cohort)
    f.follow(cohort[1:])
    f.fail_update(cohort[0], "det", "v2", "ModelLoadError: unsupported opset 99")
    f.tick(1)
    f.reconcile()
    detail = f.detail(name)
    # One of two cohort devices failed: 50% > 20%, no need to wait for samples.
    assert detail["phase"] == "RolledBack"
    assert f.states(name) == {**f.states(name), cohort[0]: "Failed", cohort[1]: "RolledBack"}
    failed = next(d for d in detail["devices"] if d["device"] == cohort[0])
    assert "unsupported opset 99" in failed["reason"] and failed["update_state"] == "Failed"
    assert f.desired(cohort[0]) == ("v1", None, 0.0) and f.desired(cohort[1]) == ("v1", None, 0.0)


def test_failure_reported_as_update_event(running: Fleet) -> None:
    f = running
    name = f.create(canary="20%", gate={"min_samples": 200, "max_install_failure_share": 0.5})["name"]
    cohort = by_rank(name, DEVICES)[:2]
    f.tick(1)
    f.reconcile()
    with f.db() as s:
        s.add(UpdateEvent(device_id=cohort[0], model="det", version="v2", role="shadow", state="Failed",
                          reason="sha256 mismatch", at=f.now))
    f.tick(1)
    assert f.reconcile() == [cohort[0]]  # back to its baseline; 50% is within this gate's limit
    assert f.states(name)[cohort[0]] == "Failed" and f.detail(name)["phase"] == "Progressing"
    assert f.desired(cohort[0]) == ("v1", None, 0.0)


def test_pause_on_deadline_then_resume(running: Fleet) -> None:
    f = running
    name = f.create(gate={"min_samples": 200, "analysis_deadline_s": 300})["name"]
    canary = by_rank(name, DEVICES)[0]
    f.tick(1)
    f.reconcile()
    f.shadow_traffic([canary], 50)
    f.tick(299)
    f.reconcile()
    assert f.detail(name)["phase"] == "Progressing"
    f.tick(2)
    f.reconcile()
    detail = f.detail(name)
    assert detail["phase"] == "Paused"
    assert "deadline" in detail["message"] and "50 of 200" in detail["message"]
    assert f.decisions(name)[-1] == ("pause", "Inconclusive", "engine")
    # Paused: devices stay where they are, however long it takes.
    f.tick(3600)
    f.shadow_traffic([canary], 500)
    assert f.reconcile() == []
    assert f.desired(canary) == ("v1", "v2", 0.5)
    with pytest.raises(ConflictError, match="already paused"):
        f.act("pause", name)
    # Resume: the deadline counts again from now, and the evidence gathered meanwhile counts.
    f.act("resume", name, "traffic restored")
    f.tick(1)
    assert f.reconcile() == [canary]
    assert f.desired(canary) == ("v2", None, 0.0)
    assert f.decisions(name)[-2:] == [("resume", None, "operator"), ("gate", "Pass", "engine")]
    with pytest.raises(ConflictError, match="not Paused"):
        f.act("resume", name)


def test_operator_promote_and_abort(running: Fleet) -> None:
    f = running
    name = f.create(steps="10,50,100", canary=None)["name"]
    ordered = by_rank(name, DEVICES)
    with pytest.raises(ConflictError, match="not started"):
        f.act("promote", name)
    f.tick(1)
    f.reconcile()
    f.notified.clear()

    # Promote in Shadow: the gate passes by the operator's word; agents hear only after commit.
    detail = f.act("promote", name, "looks fine on the dashboard")
    assert f.notified == [[ordered[0]]]
    assert detail["step_phase"] == "Serving" and f.desired(ordered[0]) == ("v2", None, 0.0)
    gate = [d for d in detail["decisions"] if d["kind"] == "gate"][-1]
    assert (gate["verdict"], gate["actor"]) == ("Pass", "operator")
    assert gate["metrics"]["engine_verdict"] == "Inconclusive" and "dashboard" in gate["reason"]

    # Promote in Serving: the next step (50%: 4 more devices) starts without waiting.
    detail = f.act("promote", name)
    assert (detail["step_index"], detail["step_phase"]) == (1, "Shadow")
    assert detail["cohorts"][1]["assigned"] == 4
    assert all(f.desired(d) == ("v1", "v2", 0.5) for d in ordered[1:5])
    assert all(f.desired(d) == ("v1", None, 0.0) for d in ordered[5:])

    # Abort: every device that got v2 goes back to v1.
    f.notified.clear()
    detail = f.act("abort", name, "customer complaint")
    assert detail["phase"] == "Aborted"
    assert sorted(f.notified[0]) == sorted(ordered[:5])
    assert all(f.desired(d) == ("v1", None, 0.0) for d in DEVICES)
    assert f.decisions(name)[-1] == ("abort", None, "operator")
    for action in ("resume", "pause", "promote", "abort"):
        with pytest.raises(ConflictError, match="Aborted"):
            f.act(action, name)
    f.tick(1)
    assert f.reconcile() == []


def test_operator_action_rolled_back_notifies_nobody(running: Fleet) -> None:
    f = running
    name = f.create()["name"]
    f.tick(1)
    f.reconcile()
    f.notified.clear()
    with pytest.raises(RuntimeError), f.db() as s:
        ops.abort_rollout(f.ctx, s, name, "oops", now=f.now)
        raise RuntimeError("the REST handler failed after the abort")
    assert f.notified == [] and f.detail(name)["phase"] == "Progressing"


def test_device_enrolling_mid_rollout(running: Fleet) -> None:
    f = running
    name = f.create(selector="site=a")["name"]
    f.tick(1)
    f.reconcile()
    # Find new device ids whose rank puts them inside / outside the 10% canary.
    inside = next(f"late-{i}" for i in range(1000) if cohort_rank(name, f"late-{i}") < 0.1)
    outside = next(f"late-{i}" for i in range(1000) if cohort_rank(name, f"late-{i}") >= 0.1)
    f.add_devices([inside, outside])
    f.tick(1)
    assert sorted(f.reconcile()) == sorted([inside, outside])
    assert f.desired(inside) == ("v1", "v2", 0.5)  # joins the running canary step
    assert f.desired(outside) == ("v1", None, 0.0)  # waits for a later step
    states = f.states(name)
    assert states[inside] == "Shadowing" and states[outside] == "Pending"
    detail = f.detail(name)
    assert detail["devices_total"] == 12 and detail["cohorts"][0]["assigned"] == 2
    # A device outside the selector never joins.
    f.add_devices(["other-site"], {"site": "b"})
    f.tick(1)
    assert f.reconcile() == ["other-site"]
    assert "other-site" not in f.states(name) and f.desired("other-site") == ("v1", None, 0.0)


def test_first_install_without_baseline(fleet: Fleet) -> None:
    f = fleet
    f.add_version("det", "v1")
    f.add_devices(DEVICES[:4])
    assert sorted(f.reconcile()) == DEVICES[:4]
    assert all(f.desired(d) == (None, None, 0.0) for d in DEVICES[:4])  # nothing assigned yet
    name = f.create(version="v1", canary="25%")["name"]
    first = by_rank(name, DEVICES[:4])[0]
    f.tick(1)
    # No serving version to shadow against: the cohort gets v1 as serving at once and the gate
    # waives samples; the step moves on once the device confirms.
    assert f.reconcile() == [first]
    assert f.desired(first) == ("v1", None, 0.0)
    assert f.detail(name)["step_phase"] == "Serving"
    f.follow([first])
    f.tick(1)
    f.reconcile()
    rest = [d for d in DEVICES[:4] if d != first]
    assert all(f.desired(d) == ("v1", None, 0.0) for d in rest)
    f.follow(rest)
    f.tick(1)
    f.reconcile()
    assert f.detail(name)["phase"] == "Completed"


def test_create_rollout_validation(running: Fleet) -> None:
    f = running
    with pytest.raises(NotFoundError, match="det:v9 not found"):
        f.create(version="v9")
    with pytest.raises(InvalidInputError, match="grow strictly"):
        f.create(steps="50,10", canary=None)
    with pytest.raises(InvalidInputError, match="unknown gate setting"):
        f.create(gate={"min_sample": 3})
    with pytest.raises(InvalidInputError, match="shadow_sample_rate"):
        f.create(shadow_sample_rate=0)
    f.create(name="first", selector="site=a")
    with pytest.raises(ConflictError, match="'first'"):
        f.create()
    with f.db() as s:
        listed = ops.list_rollouts(s, model="det")
        assert [r["name"] for r in listed] == ["first"]
        assert listed[0]["devices"] == {"total": 10, "Pending": 10}
        assert ops.list_rollouts(s, phase="Completed") == []
        with pytest.raises(InvalidInputError, match="unknown phase"):
            ops.list_rollouts(s, phase="Done")
        with pytest.raises(NotFoundError, match="'nope'"):
            ops.rollout_detail(s, "nope")


def test_late_joiner_of_a_serving_step_serves_directly(running: Fleet) -> None:
    f = running
    name = f.create(selector="site=a")["name"]
    canary = by_rank(name, DEVICES)[0]
    f.tick(1)
    f.reconcile()
    f.act("promote", name)  # the canary step's gate passes: it serves v2 now
    inside = next(f"late-{i}" for i in range(1000) if cohort_rank(name, f"late-{i}") < 0.1)
    f.add_devices([inside])
    f.tick(1)
    f.reconcile()
    # Its step's gate already passed, so it skips the shadow and serves v2 like its cohort.
    assert f.states(name)[inside] == "Serving"
    assert f.desired(inside) == ("v2", None, 0.0) and f.desired(canary) == ("v2", None, 0.0)
    # The step waits for both to confirm.
    f.follow([canary])
    f.tick(1)
    f.reconcile()
    assert f.detail(name)["step_index"] == 0
    f.follow([inside])
    f.tick(1)
    f.reconcile()
    assert f.detail(name)["step_index"] == 1


def test_unconfirmed_serving_step_pauses_at_the_deadline(running: Fleet) -> None:
    f = running
    name = f.create(gate={"min_samples": 200, "analysis_deadline_s": 120})["name"]
    canary = by_rank(name, DEVICES)[0]
    f.tick(1)
    f.reconcile()
    f.act("promote", name)
    f.tick(100)
    f.reconcile()
    assert f.detail(name)["phase"] == "Progressing"
    assert f"waiting for {canary}" in f.detail(name)["message"]
    f.tick(30)
    f.reconcile()
    detail = f.detail(name)
    assert detail["phase"] == "Paused"
    assert "did not confirm" in detail["message"] and canary in detail["message"]
    # An offline cohort that never confirmed anything holds the step too: nothing proves v2 serves.
    f.act("resume", name)
    f.set_connected(canary, False)
    f.tick(1)
    f.reconcile()
    detail = f.detail(name)
    assert detail["step_index"] == 0 and "(all offline)" in detail["message"]


def test_latency_regression_rolls_back(running: Fleet) -> None:
    f = running
    name = f.create(canary="20%")["name"]
    cohort = by_rank(name, DEVICES)[:2]
    f.tick(1)
    f.reconcile()
    f.shadow_traffic(cohort, 150, shadow_ms=12.0, serving_ms=5.0)
    f.tick(5)
    f.reconcile()
    detail = f.detail(name)
    assert detail["phase"] == "RolledBack"
    row = next(r for r in detail["analysis"]["metrics"] if r["metric"] == "latency")
    assert row["ok"] is False and row["p95_ratio"] == pytest.approx(2.4, rel=0.05)
    assert row["value"] == pytest.approx(1.4, rel=0.05)  # Hodges-Lehmann: +7 ms on 5 ms
    # _hist spreads values over 0.9x..1.08x: the p95 sits at the top of that spread.
    assert row["candidate_p95_ms"] == pytest.approx(12.0 * 1.08, rel=0.02)
    assert all(f.desired(d) == ("v1", None, 0.0) for d in cohort)


def test_latency_is_judged_on_cpu_time_when_devices_report_it(running: Fleet) -> None:
    # Wall times alike (the shadow waited less for the CPU), on-CPU times 50% apart: the model's
    # own cost decides, and the decision record shows the on-CPU figures.
    f = running
    name = f.create(canary="20%")["name"]
    cohort = by_rank(name, DEVICES)[:2]
    f.tick(1)
    f.reconcile()
    f.shadow_traffic(cohort, 150, shadow_ms=6.0, serving_ms=6.0, cpu_ms=(7.5, 5.0))
    f.tick(5)
    f.reconcile()
    detail = f.detail(name)
    assert detail["phase"] == "RolledBack", detail["message"]
    row = next(r for r in detail["analysis"]["metrics"] if r["metric"] == "latency")
    assert row["ok"] is False and row["value"] == pytest.approx(0.5, rel=0.05)
    assert row["candidate_p95_ms"] == pytest.approx(7.5 * 1.08, rel=0.02)


def test_one_broken_rollout_does_not_stop_the_others(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    f = fleet
    for model in ("det", "cls"):
        f.add_version(model, "v1")
        f.add_version(model, "v2")
        f.assign(model, "v1")
    f.add_devices(DEVICES[:3])
    f.reconcile()
    f.create(model="det")
    f.create(model="cls")
    with f.db() as s:  # corrupt one rollout's stored gate, as a bad manual edit would
        rollout = s.get(ops.Rollout, "det-v2")
        assert rollout is not None
        rollout.gate = {"min_agreement": 7}
    lenient = Reconciler(f.ctx, clock=lambda: f.now)
    f.tick(1)
    lenient.reconcile_once(f.now)
    assert f.detail("cls-v2")["phase"] == "Progressing"
    assert f.detail("det-v2")["phase"] == "Pending"
    assert "reconciling rollout det-v2 failed" in caplog.text


def test_regression_on_one_label_group_rolls_back_and_the_decision_names_it(fleet: Fleet) -> None:
    # Given ten devices in two hardware groups, serving v1
    f = fleet
    f.add_version("det", "v1")
    f.add_version("det", "v2")
    fast, slow = DEVICES[:5], DEVICES[5:]
    f.add_devices(fast, {"hw": "jetson", "site": "a"})
    f.add_devices(slow, {"hw": "slowbox", "site": "a"})
    f.assign("det", "v1")
    f.reconcile()
    f.follow(DEVICES)
    name = f.create(canary="100%", gate=None)["name"]  # default gate: 1000 samples, groups automatic
    f.tick(1)
    f.reconcile()
    f.follow(DEVICES)

    # When v2 is 12% slower on the slowbox devices only (the cohort as a whole: ~6%)
    rng = np.random.default_rng(11)
    with f.db() as s:
        for device_id in DEVICES:
            f.seq += 1
            factor = 1.12 if device_id in slow else 1.0
            cand, serv = LatencyHistogram(), LatencyHistogram()
            serv.record_many(20.0 * rng.lognormal(0.0, 0.12, 200))
            cand.record_many(20.0 * factor * rng.lognormal(0.0, 0.12, 200))
            s.add(TelemetryWindow(
                device_id=device_id, seq=f.seq, model="det", version="v2", role="shadow", compared_to="v1",
                window_start=f.now - timedelta(seconds=5), window_end=f.now, requests=200, errors=0,
                payload={"latency_ms": cand.to_dict(), "paired_serving_latency_ms": serv.to_dict(),
                         "agreement": [{"output": "probs", "samples": 200, "cosine_sum": 199.0, "cosine_min": 0.9,
                                        "mean_abs_diff_sum": 1.0, "max_abs_diff": 0.1, "top1_agree": 199,
                                        "top1_samples": 200}]},
                received_at=f.now))
    f.tick(5)
    f.reconcile()

    # Then the rollout is rolled back and the decision names the group and its devices
    detail = f.detail(name)
    assert detail["phase"] == "RolledBack", detail["message"]
    assert "group hw=slowbox" in detail["message"] and "hw=jetson" not in detail["message"]
    gate = [d for d in detail["decisions"] if d["kind"] == "gate" and d["verdict"] == "Fail"][-1]
    rows = {(r["metric"], r["group"]): r for r in gate["metrics"]["metrics"]}
    assert rows[("latency", "hw=slowbox")]["ok"] is False and rows[("latency", "hw=jetson")]["ok"] is True
    assert {w["device"] for w in rows[("latency", "hw=slowbox")]["worst_devices"]} <= set(slow)
    assert gate["metrics"]["groups"] == ["hw=jetson", "hw=slowbox"] and gate["metrics"]["tests"] == 6

    # And the report and its time series are served over REST, built from the same evidence
    from fastapi.testclient import TestClient

    from fleet.controller.access import admin_headers
    from fleet.controller.app import create_app

    with TestClient(create_app(f.ctx), headers=admin_headers(f.ctx)) as client:
        series = client.get(f"/api/v1/rollouts/{name}/timeseries")
        assert series.status_code == 200, series.text
        data = series.json()
        assert data["latency"]["candidate"]["count"] == 2000 and data["latency"]["serving"]["count"] == 2000
        assert data["agreement_over_time"][0]["agreement"]["probs"]["value"] == pytest.approx(0.995)
        assert any(d["verdict"] == "Fail" for d in data["decisions"])
        page = client.get(f"/api/v1/rollouts/{name}/report")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<svg" in page.text and "group hw=slowbox" in page.text and "no drift data" in page.text
        assert client.get("/api/v1/rollouts/nope/report").status_code == 404
