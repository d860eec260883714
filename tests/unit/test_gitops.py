"""ModelRollout specs and `reconcile_resource`, on a real SQLite controller database.

Given a controller with devices serving det:v1 and det:v2 pushed, when a ModelRollout resource
(a plain dict, as the API server sends it) is reconciled, then the rollout it asks for exists
exactly once, pause/resume/abort follow the spec, and the returned status says where it stands.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fleet.controller import rollouts as ops
from fleet.controller.context import ControllerContext, build_context
from fleet.controller.engine import Reconciler
from fleet.controller.gitops import SPEC_FIELDS, ModelRolloutSpec, reconcile_resource
from fleet.controller.models import Assignment, Decision, Device, ModelVersion, Rollout
from fleet.controller.registry import bundle_key
from fleet.controller.settings import ControllerSettings
from fleet.core.errors import InvalidInputError
from fleet.core.gate import GatePolicy

# -- spec parsing ---------------------------------------------------------------------------------


def _cr(spec: Any, *, name: str = "det-rollout", namespace: str = "vision", generation: int = 1,
        status: dict[str, Any] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "generation": generation, "resourceVersion": "1"}
    if annotations:
        meta["annotations"] = annotations
    resource = {"apiVersion": "fleet.edge-fleet.dev/v1alpha1", "kind": "ModelRollout", "metadata": meta,
                "spec": copy.deepcopy(spec)}
    if status is not None:
        resource["status"] = status
    return resource


BASE = {"model": "det", "version": "v2"}


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, {"steps": (1.0,), "selector": {}, "paused": False, "abort": False, "shadow_sample_rate": None}),
    ({"canary": "10%"}, {"steps": (0.1, 1.0)}),
    ({"canary": 0.05, "steps": ["25%", "100%"]}, {"steps": (0.05, 0.25, 1.0)}),
    ({"steps": "5,25,100"}, {"steps": (0.05, 0.25, 1.0)}),
    ({"selector": {"matchLabels": {"site": "berlin"},
                   "matchExpressions": [{"key": "tier", "operator": "In", "values": ["edge", "lab"]}]}},
     {"selector": {"site": "berlin", "tier": ["edge", "lab"]}}),
    ({"shadowSampleRate": 0.25, "paused": True, "abort": False}, {"shadow_sample_rate": 0.25, "paused": True}),
    ({"abort": True}, {"abort": True}),
])
def test_valid_specs(extra: dict[str, Any], expected: dict[str, Any]) -> None:
    spec = ModelRolloutSpec.from_resource(_cr({**BASE, **extra}))
    assert (spec.model, spec.version) == ("det", "v2")
    for field_name, value in expected.items():
        assert getattr(spec, field_name) == value, field_name


def test_gate_accepts_camel_case_and_fills_defaults() -> None:
    spec = ModelRolloutSpec.from_resource(_cr({**BASE, "gate": {"minSamples": 200, "max_error_rate": 0.02,
                                                                "groupBy": "site"}}))
    assert spec.gate["min_samples"] == 200 and spec.gate["max_error_rate"] == 0.02
    assert spec.gate["group_by"] == "site" and spec.gate["min_agreement"] == 0.98  # default kept


@pytest.mark.parametrize(("spec", "message"), [
    (None, "has no spec"),
    ({"model": "det"}, "spec.version"),
    ({**BASE, "model": "Det!"}, "spec.model"),
    ({**BASE, "pasued": True}, "unknown field(s) pasued"),
    ({**BASE, "canary": True}, "spec.canary"),
    ({**BASE, "canary": "10"}, "ambiguous"),
    ({**BASE, "steps": ["50%", "10%"]}, "grow strictly"),
    ({**BASE, "steps": {"a": 1}}, "spec.steps"),
    ({**BASE, "selector": "site=a"}, "spec.selector must be an object"),
    ({**BASE, "selector": {"matchLabels": {"site": 3}}}, "matchLabels.site"),
    ({**BASE, "selector": {"matchExpressions": [{"key": "site", "operator": "NotIn", "values": ["a"]}]}},
     "operator must be In"),
    ({**BASE, "selector": {"matchLabels": {"site": "a"},
                           "matchExpressions": [{"key": "site", "operator": "In", "values": ["b"]}]}}, "twice"),
    ({**BASE, "gate": {"minSamplez": 3}}, "unknown gate setting(s) min_samplez"),
    ({**BASE, "gate": {"minAgreement": 1.5}}, "gate.min_agreement must be between"),
    ({**BASE, "shadowSampleRate": 0}, "shadowSampleRate"),
    ({**BASE, "shadowSampleRate": 1.5}, "shadowSampleRate"),
    ({**BASE, "paused": "yes"}, "spec.paused must be true or false"),
])
def test_invalid_specs_name_the_field(spec: Any, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        ModelRolloutSpec.from_resource(_cr(spec))
    assert message in str(info.value)


# -- reconcile against a real database ------------------------------------------------------------

DEVICES = [f"cam-{i:02d}" for i in range(6)]


class Cluster:
    """A controller database with devices serving det:v1; reconciles resources like the loop does."""

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self.now = datetime.now(UTC).replace(microsecond=0)
        self.reconciler = Reconciler(ctx, clock=lambda: self.now, strict=True)

    def add_version(self, model: str, version: str) -> None:
        with self.ctx.session_factory() as s, s.begin():
            s.add(ModelVersion(name=model, version=version, task="classification", release=1, manifest={},
                               bundle_key=bundle_key(model, version),
                               sha256=hashlib.sha256(f"{model}:{version}".encode()).hexdigest(), size=1000,
                               target_path=f"{model}/{version}/bundle.tar", created_at=self.now))

    def reconcile(self, resource: dict[str, Any]) -> dict[str, Any]:
        """One pass, as GitOpsLoop.handle runs it; the resource keeps the status written back."""
        self.now += timedelta(seconds=1)
        with self.ctx.session_factory() as s, s.begin():
            status = reconcile_resource(self.ctx, s, resource, now=self.now)
        resource["status"] = copy.deepcopy(status)
        return status

    def engine_pass(self) -> None:
        self.now += timedelta(seconds=1)
        self.reconciler.reconcile_once(self.now)

    def rollouts(self) -> list[tuple[str, str, str, str]]:
        with self.ctx.session_factory() as s:
            return [(r.id, r.version, r.phase, r.created_by)
                    for r in s.scalars(select(Rollout).order_by(Rollout.created_at, Rollout.id))]

    def decisions(self, rollout: str) -> list[tuple[str, str, str]]:
        with self.ctx.session_factory() as s:
            return [(d.kind, d.actor, d.reason) for d in s.scalars(
                select(Decision).where(Decision.rollout_id == rollout).order_by(Decision.at, Decision.id))]

    def act(self, action: str, name: str, reason: str | None = None) -> None:
        self.now += timedelta(seconds=1)
        with self.ctx.session_factory() as s, s.begin():
            getattr(ops, f"{action}_rollout")(self.ctx, s, name, reason, now=self.now)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    ctx = build_context(ControllerSettings(data_dir=tmp_path / "controller"))
    c = Cluster(ctx)
    c.add_version("det", "v1")
    c.add_version("det", "v2")
    with ctx.session_factory() as s, s.begin():
        for device_id in DEVICES:
            s.add(Device(id=device_id, labels={"site": "a"}, hardware={}, secret_hash="x", connected=True,
                         actual={}, desired={}, desired_generation=0))
        s.add(Assignment(model="det", version="v1", selector={}, rollout_id=None,
                         created_at=c.now - timedelta(hours=1)))
    # The devices get det:v1 and report it loaded, so each has a baseline to shadow against.
    c.engine_pass()
    with ctx.session_factory() as s, s.begin():
        for device in s.scalars(select(Device)):
            device.actual = {"desired_generation": device.desired_generation, "models": [{
                "model": "det", "update": {"state": "Idle", "target_version": "", "error": ""},
                "slots": [{"role": "serving", "version": "v1", "sha256": "", "loaded": True,
                           "execution_providers": ["CPUExecutionProvider"]}]}]}
            device.acked_generation = device.desired_generation
    try:
        yield c
    finally:
        ctx.close()


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_creates_the_rollout_once_and_reports_it(cluster: Cluster) -> None:
    resource = _cr({**BASE, "canary": "50%", "gate": {"minSamples": 100}, "shadowSampleRate": 0.5,
                    "selector": {"matchLabels": {"site": "a"}}})
    status = cluster.reconcile(resource)
    assert status["rollout"] == "gitops-vision-det-rollout"
    assert (status["phase"], status["step"], status["stepCount"], status["stepPhase"]) == ("Pending", 1, 2, "Shadow")
    assert (status["model"], status["version"], status["observedGeneration"]) == ("det", "v2", 1)
    assert status["lastDecision"]["kind"] == "step" and status["lastDecision"]["actor"] == "operator"
    assert "created by gitops:vision/det-rollout" in status["lastDecision"]["reason"]
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Ready": ("False", "Pending"), "Reconciling": ("True", "Pending"), "Stalled": ("False", "Pending")}
    with cluster.ctx.session_factory() as s:
        detail = ops.rollout_detail(s, "gitops-vision-det-rollout")
    assert detail["steps"] == [0.5, 1.0] and detail["gate"]["min_samples"] == 100
    assert detail["shadow_sample_rate"] == 0.5 and detail["selector"] == {"site": "a"}
    assert detail["devices_total"] == len(DEVICES)

    # Reconciling again changes nothing: same rollout, no new decision, an identical status (so
    # the loop writes nothing back).
    decisions = cluster.decisions("gitops-vision-det-rollout")
    assert cluster.reconcile(copy.deepcopy(resource)) == status
    # A status lost on the way (patch failed, object restored without status) adopts the rollout.
    del resource["status"]
    assert cluster.reconcile(resource)["rollout"] == "gitops-vision-det-rollout"
    assert len(cluster.rollouts()) == 1 and cluster.decisions("gitops-vision-det-rollout") == decisions


def test_status_follows_the_engine_and_keeps_transition_times(cluster: Cluster) -> None:
    resource = _cr({**BASE, "canary": "50%"})
    first = cluster.reconcile(resource)
    pending_since = _condition(first, "Reconciling")["lastTransitionTime"]
    cluster.engine_pass()
    status = cluster.reconcile(resource)
    assert (status["phase"], status["step"], status["stepPhase"]) == ("Progressing", 1, "Shadow")
    assert status["lastDecision"]["actor"] == "engine"
    # Still Reconciling=True: its transition time is the one written first.
    assert _condition(status, "Reconciling")["lastTransitionTime"] == pending_since
    cluster.act("promote", status["rollout"])
    status = cluster.reconcile(resource)
    assert status["stepPhase"] == "Serving" and status["lastDecision"]["kind"] == "gate"
    cluster.act("promote", status["rollout"])
    cluster.act("promote", status["rollout"])
    cluster.act("promote", status["rollout"])
    cluster.now += timedelta(minutes=5)
    status = cluster.reconcile(resource)
    assert status["phase"] == "Completed"
    assert _condition(status, "Ready")["status"] == "True"
    assert _condition(status, "Reconciling")["status"] == "False"
    assert _condition(status, "Reconciling")["lastTransitionTime"] != pending_since


def test_pause_and_resume_follow_the_spec_but_never_undo_someone_elses_pause(cluster: Cluster) -> None:
    resource = _cr({**BASE, "paused": True})
    status = cluster.reconcile(resource)
    name = status["rollout"]
    assert status["phase"] == "Paused"  # created paused: the engine never starts it
    assert _condition(status, "Reconciling")["status"] == "False"
    cluster.engine_pass()
    assert cluster.rollouts()[0][2] == "Paused"

    # Someone resumes by hand while Git says paused: Git wins.
    cluster.act("resume", name)
    assert cluster.reconcile(resource)["phase"] == "Paused"

    resource["spec"]["paused"] = False
    resource["metadata"]["generation"] = 2
    status = cluster.reconcile(resource)
    assert status["phase"] == "Pending" and status["observedGeneration"] == 2  # never started: back to Pending
    assert cluster.reconcile(resource)["phase"] == "Pending"  # and only once
    kinds = [(kind, actor) for kind, actor, _ in cluster.decisions(name)]
    assert kinds == [("step", "operator"), ("pause", "operator"), ("resume", "operator"), ("pause", "operator"),
                     ("resume", "operator")]

    # An operator's pause is theirs to lift: spec.paused=false does not resume it.
    cluster.engine_pass()
    cluster.act("pause", name, "looking at a device")
    status = cluster.reconcile(resource)
    assert status["phase"] == "Paused" and "looking at a device" in status["message"]


def test_abort_stops_the_rollout_and_starts_nothing_new(cluster: Cluster) -> None:
    resource = _cr(BASE)
    name = cluster.reconcile(resource)["rollout"]
    cluster.engine_pass()
    resource["spec"]["abort"] = True
    status = cluster.reconcile(resource)
    assert (status["phase"], status["rollout"]) == ("Aborted", name)
    assert _condition(status, "Stalled") == {**_condition(status, "Stalled"), "status": "True", "reason": "Aborted"}
    assert cluster.decisions(name)[-1][:2] == ("abort", "operator")
    # A new version while abort is set: still nothing starts.
    cluster.add_version("det", "v3")
    resource["spec"]["version"] = "v3"
    status = cluster.reconcile(resource)
    assert status["phase"] == "Aborted" and "no new rollout starts" in status["message"]
    assert len(cluster.rollouts()) == 1
    # Abort lifted: v3 starts as a second rollout of the same resource.
    resource["spec"]["abort"] = False
    resource["metadata"]["generation"] = 4
    status = cluster.reconcile(resource)
    assert status["rollout"] == f"{name}-g4" and status["version"] == "v3" and status["phase"] == "Pending"


def test_abort_before_any_rollout(cluster: Cluster) -> None:
    status = cluster.reconcile(_cr({**BASE, "abort": True}))
    assert (status["phase"], status["rollout"]) == ("Aborted", "")
    assert cluster.rollouts() == []


def test_a_new_version_waits_for_the_running_rollout(cluster: Cluster) -> None:
    resource = _cr(BASE)
    first = cluster.reconcile(resource)["rollout"]
    cluster.engine_pass()
    cluster.add_version("det", "v3")
    resource["spec"]["version"] = "v3"
    resource["metadata"]["generation"] = 2
    status = cluster.reconcile(resource)
    assert (status["phase"], status["rollout"], status["step"]) == ("Pending", "", 0)
    assert f"rollout {first} (det:v2) is Progressing" in status["message"]
    assert _condition(status, "Reconciling")["reason"] == "WaitingForPrevious"
    assert len(cluster.rollouts()) == 1
    # The previous rollout ends (here: an operator aborts it): v3 starts.
    cluster.act("abort", first)
    status = cluster.reconcile(resource)
    assert (status["rollout"], status["version"], status["phase"]) == (f"{first}-g2", "v3", "Pending")
    assert cluster.reconcile(resource)["rollout"] == f"{first}-g2"
    assert [r[:3] for r in cluster.rollouts()] == [(first, "v2", "Aborted"), (f"{first}-g2", "v3", "Pending")]


def test_finished_rollout_reports_why_and_is_not_retried(cluster: Cluster) -> None:
    resource = _cr(BASE)
    name = cluster.reconcile(resource)["rollout"]
    cluster.act("abort", name, "bad numbers")
    status = cluster.reconcile(resource)
    assert status["phase"] == "Aborted" and "change spec.version" in status["message"]
    assert _condition(status, "Stalled")["status"] == "True"
    assert len(cluster.rollouts()) == 1


def test_version_not_pushed_waits_then_starts(cluster: Cluster) -> None:
    resource = _cr({**BASE, "version": "v9"})
    status = cluster.reconcile(resource)
    assert (status["phase"], status["rollout"]) == ("Pending", "")
    assert "det:v9 not found" in status["message"]
    assert _condition(status, "Ready")["reason"] == "VersionNotFound"
    cluster.add_version("det", "v9")
    assert cluster.reconcile(resource)["rollout"] == "gitops-vision-det-rollout"


def test_model_busy_with_a_cli_rollout(cluster: Cluster) -> None:
    with cluster.ctx.session_factory() as s, s.begin():
        ops.create_rollout(cluster.ctx, s, model="det", version="v2", name="by-hand")
    status = cluster.reconcile(_cr(BASE))
    assert status["phase"] == "Pending" and _condition(status, "Reconciling")["reason"] == "ModelBusy"
    assert "by-hand" in status["message"]


def test_invalid_spec_changes_nothing(cluster: Cluster) -> None:
    status = cluster.reconcile(_cr({**BASE, "canary": "150%"}))
    assert (status["phase"], status["rollout"]) == ("Invalid", "")
    assert "spec refused" in status["message"] and "100%" in status["message"]
    assert _condition(status, "Stalled")["reason"] == "InvalidSpec"
    assert cluster.rollouts() == []

    resource = _cr(BASE)
    name = cluster.reconcile(resource)["rollout"]
    resource["spec"]["selector"] = {"matchLabels": {"site": 1}}
    resource["spec"]["abort"] = True  # an invalid spec is not acted on at all, abort included
    status = cluster.reconcile(resource)
    assert (status["phase"], status["rollout"]) == ("Pending", name)
    assert _condition(status, "Stalled")["reason"] == "InvalidSpec"
    assert cluster.rollouts()[0][2] == "Pending"


def test_rollout_name_from_annotation_and_long_names(cluster: Cluster) -> None:
    status = cluster.reconcile(_cr(BASE, annotations={"fleet.edge-fleet.dev/rollout-name": "det-v2-spring"}))
    assert status["rollout"] == "det-v2-spring"
    with cluster.ctx.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Rollout)) == 1

    other = _cr({"model": "cls", "version": "v1"}, name="x" * 200, namespace="n" * 63)
    cluster.add_version("cls", "v1")
    status = cluster.reconcile(other)
    assert len(status["rollout"]) <= 128 and status["rollout"].startswith("gitops-nnn")
    assert cluster.reconcile(other)["rollout"] == status["rollout"]  # adopted, not created twice
    assert len(cluster.rollouts()) == 2


# -- the CRD and the example ----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _crd() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return dict(yaml.safe_load((ROOT / "charts/edge-fleet/crds/modelrollouts.yaml").read_text()))


def test_crd_is_valid_and_matches_what_the_controller_reads_and_writes(cluster: Cluster) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    crd = _crd()
    kubernetes_validate.validate(crd, "1.30.0", strict=True)
    version = crd["spec"]["versions"][0]
    assert (crd["spec"]["group"], version["name"], crd["spec"]["names"]["plural"]) == (
        "fleet.edge-fleet.dev", "v1alpha1", "modelrollouts")
    assert version["subresources"] == {"status": {}} and crd["spec"]["scope"] == "Namespaced"
    assert {c["jsonPath"] for c in version["additionalPrinterColumns"]} >= {
        ".status.phase", ".status.step", ".spec.version"}
    schema = version["schema"]["openAPIV3Schema"]
    # Every spec field the controller accepts is in the schema (and no more), and every gate
    # setting of the schema is one GatePolicy knows: the API server prunes fields it does not know.
    spec_props = schema["properties"]["spec"]["properties"]
    assert set(spec_props) == set(SPEC_FIELDS)
    every_gate_setting = {k: "" if p["type"] == "string" else p["maximum"]
                          for k, p in spec_props["gate"]["properties"].items()}
    assert len(every_gate_setting) == len(GatePolicy().to_dict())
    ModelRolloutSpec.from_resource(_cr({**BASE, "gate": every_gate_setting}))  # all known, none refused

    # A status the controller writes passes the status schema.
    jsonschema = pytest.importorskip("jsonschema")
    status = cluster.reconcile(_cr(BASE))
    jsonschema.Draft4Validator(schema["properties"]["status"]).validate(status)
    assert set(status) == set(schema["properties"]["status"]["properties"])


def test_example_passes_the_schema_and_the_controller() -> None:
    yaml = pytest.importorskip("yaml")
    jsonschema = pytest.importorskip("jsonschema")
    example = yaml.safe_load((ROOT / "docs/examples/modelrollout.yaml").read_text())
    jsonschema.Draft4Validator(_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).validate(example)
    spec = ModelRolloutSpec.from_resource(example)
    assert spec.steps == (0.1, 0.5, 1.0) and spec.selector == {"site": ["berlin", "hamburg"], "tier": "edge"}
    assert spec.gate["min_samples"] == 500 and spec.shadow_sample_rate == 0.2
