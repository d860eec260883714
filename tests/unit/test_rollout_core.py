"""Rollout planning rules: step parsing, stable cohorts, and each device's desired models."""

from __future__ import annotations

import statistics

import pytest

from fleet.core.errors import InvalidInputError
from fleet.core.rollout import (
    AssignmentRecord,
    DeviceRolloutState,
    Phase,
    RolloutMembership,
    StepPhase,
    cohort_rank,
    cohort_size,
    desired_for_device,
    newest_assignment,
    parse_percent,
    parse_selector,
    plan_steps,
    selector_matches,
    step_for_rank,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10%", 0.1),
        ("12.5%", 0.125),
        (" 5 % ", 0.05),
        ("100%", 1.0),
        ("0.1", 0.1),
        ("1", 1.0),
        (0.25, 0.25),
        ("0.001", 0.001),
    ],
)
def test_parse_percent_accepts(text: str | float, expected: float) -> None:
    assert parse_percent(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", "ambiguous"),  # a bare number above 1 is neither guessed as 10% nor as 1000%
        ("0", "more than 0%"),
        ("0%", "more than 0%"),
        ("-5%", "more than 0%"),
        ("150%", "cannot exceed 100%"),
        ("ten", "expected a percentage"),
        ("", "expected a percentage"),
        ("nan", "finite"),
        (True, "expected a percentage"),
    ],
)
def test_parse_percent_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_percent(text)


def test_parse_percent_bare_as_percent() -> None:
    assert parse_percent("5", bare="percent") == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("canary", "steps", "expected"),
    [
        ("10%", None, [0.1, 1.0]),
        ("0.1", None, [0.1, 1.0]),
        ("100%", None, [1.0]),
        (None, "5,25,100", [0.05, 0.25, 1.0]),
        (None, "5,25", [0.05, 0.25, 1.0]),  # 1.0 appended
        (None, "5%,25%,100%", [0.05, 0.25, 1.0]),
        (None, "0.05,0.25,1", [0.05, 0.25, 1.0]),
        (None, ["10%", "50%"], [0.1, 0.5, 1.0]),
        (None, [0.1, 0.5, 1.0], [0.1, 0.5, 1.0]),
        ("5%", "25,100", [0.05, 0.25, 1.0]),
        ("10%", "10,50,100", [0.1, 0.5, 1.0]),  # the canary repeated as first step is one step
        (None, None, [1.0]),
        ("", None, [1.0]),
    ],
)
def test_plan_steps(canary: str | None, steps: str | list[str] | None, expected: list[float]) -> None:
    planned = plan_steps(canary, steps)
    assert planned == pytest.approx(expected)
    assert planned[-1] == 1.0


@pytest.mark.parametrize(
    ("canary", "steps", "message"),
    [
        (None, "25,5,100", "grow strictly"),
        (None, "5,5,100", "grow strictly"),
        ("50%", "10,100", "canary comes first"),
        (None, "", "empty"),
        (None, "5,abc", "expected a percentage"),
        (None, "5,200", "cannot exceed 100%"),
        ("10", None, "ambiguous"),
        (None, ",".join(str(i) for i in range(1, 30)), "at most 20 steps"),
    ],
)
def test_plan_steps_rejects(canary: str | None, steps: str | None, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        plan_steps(canary, steps)


def test_cohort_rank_is_stable_and_uniform() -> None:
    assert cohort_rank("det-v3", "cam-1") == cohort_rank("det-v3", "cam-1")
    assert cohort_rank("det-v3", "cam-1") != cohort_rank("det-v4", "cam-1")
    # The separator keeps concatenations apart.
    assert cohort_rank("ab", "c") != cohort_rank("a", "bc")
    ranks = [cohort_rank("det-v3", f"cam-{i}") for i in range(2000)]
    assert all(0 <= r < 1 for r in ranks)
    assert statistics.mean(ranks) == pytest.approx(0.5, abs=0.03)
    assert sum(r < 0.1 for r in ranks) == pytest.approx(200, abs=45)


@pytest.mark.parametrize(
    ("fraction", "n", "expected"),
    [
        (0.1, 10, 1),
        (0.1, 3, 1),  # at least one device
        (0.1, 11, 2),
        (0.7, 10, 7),  # 0.7 * 10 is 7.000000000000001 in floating point
        (0.25, 4, 1),
        (1.0, 10, 10),
        (0.01, 1000, 10),
        (0.5, 0, 0),
        (0.0, 10, 0),
    ],
)
def test_cohort_size(fraction: float, n: int, expected: int) -> None:
    assert cohort_size(fraction, n) == expected


def test_step_for_rank() -> None:
    steps = [0.1, 0.5, 1.0]
    assert step_for_rank(steps, 0.05, upto=2) == 0
    assert step_for_rank(steps, 0.3, upto=0) is None  # its step has not started yet
    assert step_for_rank(steps, 0.3, upto=1) == 1
    assert step_for_rank(steps, 0.99, upto=2) == 2


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {}, True),
        ({}, {"site": "a"}, True),
        ({"site": "a"}, {"site": "a", "tier": "x"}, True),
        ({"site": "a"}, {"site": "b"}, False),
        ({"site": "a"}, {}, False),
        ({"site": ["a", "b"]}, {"site": "b"}, True),
        ({"site": ["a", "b"]}, {"site": "c"}, False),
        ({"site": "a", "tier": "x"}, {"site": "a"}, False),
    ],
)
def test_selector_matches(selector: dict[str, object], labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


def test_parse_selector() -> None:
    assert parse_selector("site=berlin, tier=edge") == {"site": "berlin", "tier": "edge"}
    assert parse_selector(None) == {}
    assert parse_selector("") == {}
    assert parse_selector({"a": "b"}) == {"a": "b"}
    assert parse_selector({"site": ["b", "a"]}) == {"site": ["a", "b"]}
    with pytest.raises(InvalidInputError, match="list of strings"):
        parse_selector({"site": []})
    with pytest.raises(InvalidInputError, match="list of strings"):
        parse_selector({"site": 3})
    with pytest.raises(InvalidInputError, match="KEY=VALUE"):
        parse_selector("site")
    with pytest.raises(InvalidInputError, match="twice"):
        parse_selector("a=1,a=2")


def test_phase_predicates() -> None:
    names = ["Pending", "Progressing", "Paused", "Completed", "RolledBack", "Aborted"]
    assert [p.value for p in Phase] == names
    assert {p for p in Phase if p.is_finished} == {Phase.COMPLETED, Phase.ROLLED_BACK, Phase.ABORTED}
    assert {p for p in Phase if p.is_active} == {Phase.PENDING, Phase.PROGRESSING, Phase.PAUSED}
    assert Phase("Paused") is Phase.PAUSED and str(Phase.PAUSED) == "Paused"
    assert StepPhase("Shadow") is StepPhase.SHADOW
    assert DeviceRolloutState.SHADOWING.has_candidate and not DeviceRolloutState.FAILED.has_candidate


# -- desired_for_device ---------------------------------------------------------------------------


def ref(model: str, version: str) -> dict[str, object]:
    return {"version": version, "url": f"/b/{model}/{version}", "sha256": "0" * 64, "length": 10,
            "target_path": f"{model}/{version}/bundle.tar"}


V1 = AssignmentRecord("det", "v1", {}, order=1, rollout="det-v1")


def membership(
    state: str | None, phase: str = "Progressing", baseline: str | None = "v1"
) -> RolloutMembership:
    return RolloutMembership("det-v2", "det", "v2", phase, 0.5, state, baseline)


def summary(models: list[dict[str, object]]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for m in models:
        serving, shadow = m["serving"], m["shadow"]
        out.append((
            m["model"],
            serving["version"] if isinstance(serving, dict) else None,
            shadow["version"] if isinstance(shadow, dict) else None,
            m["shadow_sample_rate"],
            m["rollout"],
        ))
    return out


@pytest.mark.parametrize(
    ("rollouts", "assignments", "expected"),
    [
        # No rollout: the newest matching assignment.
        ([], [V1], [("det", "v1", None, 0.0, "det-v1")]),
        # No assignment and no rollout: the model is absent.
        ([], [], []),
        # Shadowing: baseline serves, candidate shadows at the rollout's rate.
        ([membership("Shadowing")], [V1], [("det", "v1", "v2", 0.5, "det-v2")]),
        # Serving: the candidate serves, no shadow.
        ([membership("Serving")], [V1], [("det", "v2", None, 0.0, "det-v2")]),
        # Pending, RolledBack, Failed, not a member: the assignment.
        ([membership("Pending")], [V1], [("det", "v1", None, 0.0, "det-v1")]),
        ([membership("RolledBack")], [V1], [("det", "v1", None, 0.0, "det-v1")]),
        ([membership("Failed")], [V1], [("det", "v1", None, 0.0, "det-v1")]),
        ([membership(None)], [V1], [("det", "v1", None, 0.0, "det-v1")]),
        # A paused rollout keeps its devices where they are.
        ([membership("Shadowing", "Paused")], [V1], [("det", "v1", "v2", 0.5, "det-v2")]),
        ([membership("Serving", "Paused")], [V1], [("det", "v2", None, 0.0, "det-v2")]),
        # Aborted / RolledBack rollouts send their devices back to the baseline (the assignment).
        ([membership("Serving", "Aborted")], [V1], [("det", "v1", None, 0.0, "det-v1")]),
        ([membership("Shadowing", "RolledBack")], [V1], [("det", "v1", None, 0.0, "det-v1")]),
        # First install: nothing to shadow against, the candidate serves at once.
        ([membership("Shadowing", baseline=None)], [], [("det", "v2", None, 0.0, "det-v2")]),
        # Aborted first install: the model goes away again.
        ([membership("Serving", "Aborted", baseline=None)], [], []),
        # Baseline recorded on the device wins over the assignment while shadowing.
        ([membership("Shadowing", baseline="v0")], [V1], [("det", "v0", "v2", 0.5, "det-v2")]),
    ],
)
def test_desired_for_device(
    rollouts: list[RolloutMembership], assignments: list[AssignmentRecord], expected: list[tuple[object, ...]]
) -> None:
    assert summary(desired_for_device({"site": "a"}, rollouts, assignments, ref)) == expected


def test_desired_uses_newest_matching_assignment_per_model() -> None:
    assignments = [
        AssignmentRecord("det", "v1", {}, order=1),
        AssignmentRecord("det", "v2", {"site": "a"}, order=2),
        AssignmentRecord("det", "v3", {"site": "b"}, order=3),  # newer, but does not match
        AssignmentRecord("cls", "c1", {}, order=1),
    ]
    labels = {"site": "a"}
    assert newest_assignment("det", labels, assignments) == assignments[1]
    got = summary(desired_for_device(labels, [], assignments, ref))
    assert got == [("cls", "c1", None, 0.0, ""), ("det", "v2", None, 0.0, "")]
    # The refs are the lookup's dicts, copied.
    models = desired_for_device(labels, [], assignments, ref)
    assert models[1]["serving"] == ref("det", "v2")


def test_desired_rollout_of_one_model_leaves_others_alone() -> None:
    assignments = [V1, AssignmentRecord("cls", "c1", {}, order=1)]
    got = summary(desired_for_device({}, [membership("Serving")], assignments, ref))
    assert got == [("cls", "c1", None, 0.0, ""), ("det", "v2", None, 0.0, "det-v2")]
