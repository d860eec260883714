"""The rollout gate: verdicts from shadow evidence, with the numbers behind them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fleet.core.errors import InvalidInputError
from fleet.core.gate import Evidence, GatePolicy, Verdict, assess
from fleet.core.histogram import LatencyHistogram


def hist(value_ms: float, n: int) -> dict[str, Any]:
    h = LatencyHistogram()
    # A narrow spread around the value, so p95 sits close to it.
    for i in range(n):
        h.record(value_ms * (0.9 + 0.1 * (i % 10) / 9))
    return h.to_dict()


def window(
    device: str,
    *,
    requests: int = 100,
    errors: int = 0,
    shadow_ms: float = 2.0,
    serving_ms: float = 2.0,
    top1: float = 1.0,
    cosine: float = 0.999,
    version: str = "v2",
    role: str = "shadow",
    outputs: tuple[str, ...] = ("probs",),
) -> dict[str, Any]:
    ok = requests - errors
    return {
        "device_id": device,
        "model": "det",
        "version": version,
        "role": role,
        "compared_to": "v1",
        "requests": requests,
        "errors": errors,
        "latency_ms": hist(shadow_ms, ok),
        "paired_serving_latency_ms": hist(serving_ms, ok),
        "agreement": [
            {"output": name, "samples": ok, "cosine_sum": cosine * ok, "cosine_min": cosine,
             "mean_abs_diff_sum": 0.01 * ok, "max_abs_diff": 0.05,
             "top1_agree": round(top1 * ok), "top1_samples": ok}
            for name in outputs
        ],
        "mirrored": 0,
        "shadow_dropped": 0,
    }


COHORT = ["d1", "d2", "d3", "d4"]
# The unit tests' cohorts mirror a few hundred requests; the default (1000) is checked separately.
# The mechanism tests below read agreement against 0.95 (the default is stricter).
POLICY = GatePolicy(min_samples=200, min_agreement=0.95)


def judge(windows: list[dict[str, Any]], *, failed: tuple[str, ...] = (), elapsed: float = 10.0,
          task: str = "classification", policy: GatePolicy | None = None,
          baseline_devices: int | None = None) -> Any:
    evidence = Evidence.from_windows(windows, candidate="v2", cohort=COHORT, failed=failed,
                                     baseline_devices=baseline_devices)
    return assess(policy or POLICY, evidence, task, elapsed)


def row(assessment: Any, metric: str) -> dict[str, Any]:
    matches = [r for r in assessment.rows if r["metric"] == metric]
    assert matches, f"no row {metric}: {[r['metric'] for r in assessment.rows]}"
    return matches[0]


def test_pass_with_good_evidence() -> None:
    a = judge([window(d) for d in COHORT])
    assert a.verdict is Verdict.PASS, a.reason
    assert row(a, "samples")["value"] == 400 and row(a, "samples")["ok"] is True
    lat = row(a, "latency")
    assert lat["ok"] is True and lat["verdict"] == "Pass" and lat["value"] == pytest.approx(0.0, abs=0.03)
    assert lat["candidate_p95_ms"] == pytest.approx(2.0, rel=0.05) and lat["p95_ratio"] == pytest.approx(1.0, abs=0.03)
    assert lat["test"].startswith("Mann-Whitney U") and 0 <= lat["p_value"] <= 1 and lat["group"] is None
    agree = row(a, "agreement[probs]")
    assert agree["value"] == 1.0 and agree["threshold"] == 0.95 and agree["samples"] == 400
    assert a.to_dict()["verdict"] == "Pass"


def test_inconclusive_until_enough_samples() -> None:
    a = judge([window("d1", requests=50), window("d2", requests=50)])
    assert a.verdict is Verdict.INCONCLUSIVE and not a.deadline_passed
    assert "100 of 200" in a.reason
    assert row(a, "samples")["ok"] is False
    # Quality is not judged on thin evidence, even when it looks bad.
    bad = judge([window("d1", requests=50, shadow_ms=50.0, top1=0.2)])
    assert bad.verdict is Verdict.INCONCLUSIVE
    assert row(bad, "latency")["ok"] is None and row(bad, "latency")["verdict"] == "Inconclusive"


def test_deadline_passed_is_reported() -> None:
    a = judge([window("d1", requests=20)], elapsed=601.0)
    assert a.verdict is Verdict.INCONCLUSIVE and a.deadline_passed
    assert "deadline" in a.reason and "20 of 200" in a.reason


def test_latency_regression_fails() -> None:
    a = judge([window(d, shadow_ms=3.0, serving_ms=2.0) for d in COHORT])
    assert a.verdict is Verdict.FAIL
    lat = row(a, "latency")
    # Hodges-Lehmann shift of +1 ms on a 2 ms median: +50%, against a 5% tolerance.
    assert lat["ok"] is False and lat["value"] == pytest.approx(0.5, abs=0.05) and lat["threshold"] == 0.05
    assert lat["p_value"] < lat["alpha"] and lat["effect_ms"] == pytest.approx(1.0, abs=0.1)
    assert "latency: candidate +5" in a.reason and "Hodges-Lehmann" in a.reason


def test_latency_slack_absorbs_sub_millisecond_noise() -> None:
    # 0.3 ms vs 0.2 ms is a 50% regression but far below the 0.5 ms slack.
    a = judge([window(d, shadow_ms=0.3, serving_ms=0.2) for d in COHORT])
    assert a.verdict is Verdict.PASS, a.reason


def test_latency_worst_devices_are_named() -> None:
    windows = [window(d) for d in COHORT[:3]] + [window("d4", shadow_ms=9.0, serving_ms=2.0)]
    a = judge(windows)
    worst = row(a, "latency")["worst_devices"]
    assert worst[0]["device"] == "d4" and worst[0]["value"] > 4 and worst[0]["pull"] > 0
    assert [w["device"] for w in worst] == ["d4"]  # devices with no regression pull nothing


def test_agreement_drop_fails_classification() -> None:
    windows = [window(d, top1=0.97) for d in COHORT[:2]] + [window(d, top1=0.80) for d in COHORT[2:]]
    a = judge(windows)
    assert a.verdict is Verdict.FAIL
    agree = row(a, "agreement[probs]")
    assert agree["value"] == pytest.approx(0.885) and agree["ok"] is False
    assert {d["device"] for d in agree["worst_devices"][:2]} == {"d3", "d4"}
    assert "top-1 agreement 0.885 < 0.950" in a.reason


def test_agreement_uses_cosine_for_other_tasks_and_worst_output_decides() -> None:
    windows = [window(d, cosine=0.99, top1=0.1, outputs=("boxes",)) for d in COHORT]
    windows += [window(d, requests=100, cosine=0.90, outputs=("scores",)) for d in COHORT]
    a = judge(windows, task="detection")
    assert row(a, "agreement[boxes]")["ok"] is True
    assert row(a, "agreement[scores]")["ok"] is False
    assert row(a, "agreement[scores]")["value"] == pytest.approx(0.90)
    assert a.verdict is Verdict.FAIL


def test_install_failures_fail_at_once() -> None:
    # Two of four failed installs (50% > 20%) fails even without a single sample.
    a = judge([], failed=("d1", "d2"))
    assert a.verdict is Verdict.FAIL
    r = row(a, "install_failure_share")
    assert r["value"] == 0.5 and r["threshold"] == 0.2 and r["ok"] is False
    assert [d["device"] for d in r["worst_devices"]] == ["d1", "d2"]
    # One of four is within 20%? No: 25% > 20%.
    assert judge([window(d) for d in COHORT], failed=("d1",)).verdict is Verdict.FAIL
    lenient = GatePolicy(min_samples=200, max_install_failure_share=0.25)
    assert judge([window(d) for d in COHORT], failed=("d1",), policy=lenient).verdict is Verdict.PASS


def test_errors_fail_early_once_the_limit_cannot_be_met() -> None:
    # 3 errors: more than 1% of the 200 requests needed, so no later success can save it.
    a = judge([window("d1", requests=30, errors=3)])
    assert a.verdict is Verdict.FAIL
    r = row(a, "error_rate")
    assert r["ok"] is False and r["value"] == pytest.approx(0.1) and r["worst_devices"][0]["device"] == "d1"
    # 2 errors in 30 requests could still end within 1% of 200: wait.
    assert judge([window("d1", requests=30, errors=2)]).verdict is Verdict.INCONCLUSIVE
    # With enough samples, the plain rate decides: 5/400 = 1.25% > 1%.
    windows = [window(d) for d in COHORT[:3]] + [window("d4", errors=5)]
    assert judge(windows).verdict is Verdict.FAIL
    windows = [window(d) for d in COHORT[:3]] + [window("d4", errors=4)]
    assert judge(windows).verdict is Verdict.PASS


def test_other_versions_roles_and_devices_are_ignored() -> None:
    windows = [window(d) for d in COHORT]
    windows += [window("d1", version="v9", top1=0.0), window("d1", role="serving", top1=0.0),
                window("outsider", top1=0.0)]
    a = judge(windows)
    assert a.verdict is Verdict.PASS
    assert a.summary["requests"] == 400 and a.summary["devices_reporting"] == 4


def test_first_install_waives_samples() -> None:
    a = judge([], baseline_devices=0)
    assert a.verdict is Verdict.PASS
    assert "waived" in row(a, "samples")["detail"]
    # ...but install failures still count.
    assert judge([], baseline_devices=0, failed=("d1", "d2")).verdict is Verdict.FAIL


def test_no_comparisons_with_enough_samples_fails() -> None:
    windows = [window(d, outputs=()) for d in COHORT]
    a = judge(windows)
    assert a.verdict is Verdict.FAIL and "no output comparisons" in a.reason


def test_rows_are_json_ready() -> None:
    a = judge([])
    for r in a.rows:
        assert set(r) >= {"metric", "value", "threshold", "comparison", "ok", "samples", "detail"}
        assert r["value"] is None or not math.isnan(r["value"])


def test_policy_from_dict_validates() -> None:
    assert GatePolicy.from_dict(None) == GatePolicy()
    policy = GatePolicy.from_dict({"min_samples": "50", "min_agreement": 0.9})
    assert policy.min_samples == 50 and policy.min_agreement == 0.9
    assert GatePolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(InvalidInputError, match=r"unknown gate setting.*min_sample"):
        GatePolicy.from_dict({"min_sample": 5})
    with pytest.raises(InvalidInputError, match="min_agreement must be between 0 and 1"):
        GatePolicy.from_dict({"min_agreement": 1.5})
    with pytest.raises(InvalidInputError, match="min_samples must be a whole number"):
        GatePolicy.from_dict({"min_samples": 2.5})
    with pytest.raises(InvalidInputError, match="must be a number"):
        GatePolicy.from_dict({"max_error_rate": "lots"})
    with pytest.raises(InvalidInputError, match="must be a number"):
        GatePolicy.from_dict({"max_error_rate": True})


# -- statistical tests, groups, multiple comparisons ------------------------------------------------


def lognormal_window(device: str, rng: np.random.Generator, *, n: int = 150, slow: float = 1.0,
                     median_ms: float = 20.0, top1: float = 0.99) -> dict[str, Any]:
    w = window(device, requests=n, top1=top1)
    serving, candidate = LatencyHistogram(), LatencyHistogram()
    serving.record_many(median_ms * rng.lognormal(0.0, 0.12, n))
    candidate.record_many(median_ms * slow * rng.lognormal(0.0, 0.12, n))
    w["latency_ms"], w["paired_serving_latency_ms"] = candidate.to_dict(), serving.to_dict()
    return w


GROUPED = [f"g{i}" for i in range(8)]
LABELS = {d: {"hw": "fast" if i < 4 else "slowbox", "site": "x", "serial": d} for i, d in enumerate(GROUPED)}


def judge_grouped(windows: list[dict[str, Any]], policy: GatePolicy | None = None) -> Any:
    evidence = Evidence.from_windows(windows, candidate="v2", cohort=GROUPED, labels=LABELS)
    return assess(policy or GatePolicy(), evidence, "classification", 10.0)


def test_a_regression_on_one_label_group_fails_and_names_the_group() -> None:
    rng = np.random.default_rng(3)
    # 10% slower on the four slowbox devices only; a 5% tolerance.
    windows = [lognormal_window(d, rng, slow=1.10 if LABELS[d]["hw"] == "slowbox" else 1.0) for d in GROUPED]
    a = judge_grouped(windows)
    assert a.verdict is Verdict.FAIL, a.reason
    assert "group hw=slowbox" in a.reason and "hw=fast" not in a.reason
    groups = {r["group"]: r for r in a.rows if r["metric"] == "latency"}
    # `site` does not split the cohort and `serial` is one group per device: neither is a group.
    assert set(groups) == {None, "hw=fast", "hw=slowbox"}
    assert groups["hw=slowbox"]["ok"] is False and groups["hw=fast"]["ok"] is True
    assert groups["hw=slowbox"]["value"] == pytest.approx(0.10, abs=0.03)
    assert {w["device"] for w in groups["hw=slowbox"]["worst_devices"]} <= {"g4", "g5", "g6", "g7"}
    # Bonferroni: 3 scopes x (latency + one agreement output) = 6 tests share the 2%.
    assert a.summary["tests"] == 6 and a.summary["alpha_per_test"] == pytest.approx(0.02 / 6, rel=1e-4)
    assert a.summary["groups"] == ["hw=fast", "hw=slowbox"]


def test_the_same_candidate_passes_without_groups_or_with_another_key() -> None:
    rng = np.random.default_rng(3)
    windows = [lognormal_window(d, rng, slow=1.10 if LABELS[d]["hw"] == "slowbox" else 1.0) for d in GROUPED]
    # The whole cohort is only ~5% slower: within the tolerance, which is the point of groups.
    assert judge_grouped(windows, GatePolicy(group_by="-")).verdict is Verdict.PASS
    explicit = judge_grouped(windows, GatePolicy(group_by="hw"))
    assert explicit.verdict is Verdict.FAIL and "group hw=slowbox" in explicit.reason


def test_a_candidate_within_the_tolerance_passes_with_a_known_p_value() -> None:
    rng = np.random.default_rng(5)
    a = judge_grouped([lognormal_window(d, rng, slow=1.02) for d in GROUPED])
    assert a.verdict is Verdict.PASS, a.reason
    lat = row(a, "latency")
    assert lat["p_value"] > lat["alpha"] and lat["samples"] == 8 * 150


def test_small_groups_are_not_judged() -> None:
    rng = np.random.default_rng(5)
    windows = [lognormal_window(d, rng, n=20 if LABELS[d]["hw"] == "slowbox" else 300,
                                slow=2.0 if LABELS[d]["hw"] == "slowbox" else 1.0) for d in GROUPED]
    a = judge_grouped(windows)
    assert a.summary["groups_too_small"] == ["hw=slowbox"] and a.summary["groups"] == ["hw=fast"]


def test_agreement_is_a_confidence_bound_not_a_point_estimate() -> None:
    # 0.94 on 400 rows is not significantly under 0.95 ...
    a = judge([window(d, top1=0.94) for d in COHORT])
    agree = row(a, "agreement[probs]")
    assert a.verdict is Verdict.PASS, a.reason
    low, high = agree["interval"]
    assert low < agree["value"] < agree["threshold"] < high and agree["p_value"] > agree["alpha"]
    # ... 0.90 is.
    bad = judge([window(d, top1=0.90) for d in COHORT])
    assert bad.verdict is Verdict.FAIL and row(bad, "agreement[probs]")["interval"][1] < 0.95


def test_default_policy_and_new_settings() -> None:
    policy = GatePolicy()
    assert (policy.min_samples, policy.confidence, policy.max_latency_regression, policy.group_by) == (
        1000, 0.98, 0.05, "")
    parsed = GatePolicy.from_dict({"confidence": "0.99", "group_by": "hw", "min_group_samples": 50.0})
    assert parsed.confidence == 0.99 and parsed.group_by == "hw" and parsed.min_group_samples == 50
    assert GatePolicy.from_dict(parsed.to_dict()) == parsed
    with pytest.raises(InvalidInputError, match="confidence must be between"):
        GatePolicy.from_dict({"confidence": 0.3})
    with pytest.raises(InvalidInputError, match="group_by"):
        GatePolicy(group_by=3)  # type: ignore[arg-type]
