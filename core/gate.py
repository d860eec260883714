"""The rollout gate: is the candidate, measured in shadow on this step's cohort, good enough to serve?

Rules this module enforces (pure: telemetry comes in as plain dicts, the clock as `elapsed_s`):

- failures beat waiting: an install-failure share over the limit fails the step at once, and so
  does an error count that can no longer meet the error-rate limit, however few samples exist;
- quality is judged only on enough evidence: latency and agreement are judged once the cohort
  has mirrored at least `min_samples` requests (a label group once it has `min_group_samples`),
  and until then the verdict is Inconclusive;
- every quality metric is a statistical test with a stated confidence (`confidence`, 98% by
  default as in Kayenta) and an effect-size tolerance, and fails only when the evidence says,
  at that confidence, that the candidate is worse than the tolerance allows:
  * latency: a one-sided Mann-Whitney U test on *paired* requests (the serving model's latency
    on the same mirrored requests; on-CPU time where the agent reports it, see
    `paired_latency_keys`), stratified by device so a slow device does not count
    against the candidate; the candidate may be up to `max_latency_regression` slower plus
    `latency_slack_ms` (which keeps sub-millisecond noise from failing a fast model); the size
    of the shift is reported as a Hodges-Lehmann estimate;
  * agreement (per output; the worst output decides): the task's primary agreement
    (`AgreementSums.score`) as a proportion; it fails when the one-sided Wilson upper bound is
    below `min_agreement`. For means of values in [0, 1] (cosine) the binomial variance is an
    upper bound of the true one, so the test stays conservative;
- per-group analysis: the same tests run per device label group (`group_by` names the label key;
  by default every label key that splits the cohort into 2..`MAX_GROUPS_PER_KEY` groups,
  not one per device), so a
  candidate that is slower only on one kind of device fails and the verdict names the group;
- multiple comparisons: every test judged in one assessment (metrics x groups) shares the
  family-wise level 1 - confidence by Bonferroni, so adding groups cannot add false failures;
- an Inconclusive verdict past `analysis_deadline_s` says so (`deadline_passed`); the reconciler
  then pauses the rollout for an operator rather than guessing;
- every verdict carries its metric rows (value, threshold, test, p-value or interval, effect,
  samples, group, verdict, the devices that pulled each metric most), so every decision can be
  explained with its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from fleet.core.agreement import AgreementSums
from fleet.core.errors import InvalidInputError
from fleet.core.histogram import LatencyHistogram
from fleet.core.stats import (
    MannWhitney,
    bonferroni,
    hodges_lehmann,
    mann_whitney_histograms,
    proportion_p_below,
    wilson_interval,
)

TOP_DEVICES = 3
# Automatic grouping skips label keys with more values than this in the cohort (a serial number
# or a per-device name is not a group), and analyses at most MAX_GROUPS groups in all, so that
# judging stays cheap and the Bonferroni share of each test stays meaningful.
MAX_GROUPS_PER_KEY = 8
MAX_GROUPS = 24
# `group_by` values with a meaning of their own.
GROUP_AUTO = ""
GROUP_NONE = "-"
NO_LABEL = "(unlabelled)"


class Verdict(str, Enum):
    PASS = "Pass"
    FAIL = "Fail"
    INCONCLUSIVE = "Inconclusive"

    def __str__(self) -> str:
        return self.value


CPU_KEYS = ("cpu_ms", "paired_serving_cpu_ms")
WALL_KEYS = ("latency_ms", "paired_serving_latency_ms")


def paired_latency_keys(window: Mapping[str, Any]) -> tuple[str, str]:
    """The (candidate, serving) histogram keys of a shadow window that latency is judged on.

    The on-CPU times of the paired runs when the window has both (the models' own cost: the
    shadow's wall time also measures its lower scheduling priority and whatever else the device
    ran meanwhile), else the wall times. Both sides of one window always use the same kind.
    """
    return CPU_KEYS if window.get(CPU_KEYS[0]) and window.get(CPU_KEYS[1]) else WALL_KEYS


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of one rollout's gate. The defaults are meant to work without tuning."""

    # The defaults meet the targets of benchmarks/bench_gate_simulation.py: an A/A false-failure
    # rate <= 2%, and a 10% latency regression and a 5-point agreement drop (1.00 -> 0.95 for an
    # otherwise identical model, 0.99 -> 0.94 for a close retrain) each caught >= 95% of the time
    # once `min_samples` requests are mirrored. `min_agreement` 0.98 means a candidate that
    # changes more than about 2% of the answers is held back; a deliberate change of behaviour
    # (a new class, a new training set) states its own `min_agreement` for its rollout.
    min_samples: int = 1000
    max_latency_regression: float = 0.05
    latency_slack_ms: float = 0.25
    min_agreement: float = 0.98
    max_install_failure_share: float = 0.2
    max_error_rate: float = 0.01
    analysis_deadline_s: float = 600.0
    # Family-wise confidence of the statistical tests of one assessment (Kayenta's default).
    confidence: float = 0.98
    # A label group is tested once it has this many mirrored requests.
    min_group_samples: int = 100
    # Label key to group devices by; "" (default): every key that splits the cohort; "-": none.
    group_by: str = GROUP_AUTO

    # (low, high, integer?) per field: the range a value must fall in.
    _RANGES = {
        "min_samples": (1, 10_000_000, True),
        "max_latency_regression": (0.0, 100.0, False),
        "latency_slack_ms": (0.0, 60_000.0, False),
        "min_agreement": (0.0, 1.0, False),
        "max_install_failure_share": (0.0, 1.0, False),
        "max_error_rate": (0.0, 1.0, False),
        "analysis_deadline_s": (1.0, 30 * 24 * 3600.0, False),
        "confidence": (0.5, 0.999999, False),
        "min_group_samples": (1, 10_000_000, True),
    }
    _STRINGS = frozenset({"group_by"})

    def __post_init__(self) -> None:
        for name, (low, high, integer) in self._RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidInputError(f"gate.{name} must be a number, got {value!r}")
            if integer and value != int(value):
                raise InvalidInputError(f"gate.{name} must be a whole number, got {value!r}")
            if not low <= value <= high:
                raise InvalidInputError(f"gate.{name} must be between {low:g} and {high:g}, got {value!r}")
        if not isinstance(self.group_by, str) or len(self.group_by) > 63:
            raise InvalidInputError(f"gate.group_by must be a device label key (or '' for automatic, '-' for "
                                    f"none), got {self.group_by!r}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> GatePolicy:
        """Defaults overridden by `raw`; unknown keys and out-of-range values are refused."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown gate setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for name, given in raw.items():
            value = given
            if name in cls._STRINGS:
                values[name] = "" if value is None else str(value).strip()
                continue
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise InvalidInputError(f"gate.{name} must be a number, got {given!r}") from None
            if name in ("min_samples", "min_group_samples") and isinstance(value, float) and value.is_integer():
                value = int(value)
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- evidence -------------------------------------------------------------------------------------


@dataclass
class DeviceEvidence:
    device_id: str
    requests: int = 0
    errors: int = 0
    shadow_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    serving_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    agreement: dict[str, AgreementSums] = field(default_factory=dict)


@dataclass
class Evidence:
    """What a step's cohort has measured of the candidate in shadow, merged over devices."""

    cohort_size: int = 0
    # Cohort devices that have a serving version to compare the candidate with. Zero on a first
    # install: there is nothing to shadow against, so the sample requirement cannot apply.
    baseline_devices: int = 0
    failed_devices: list[str] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    shadow_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    serving_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    agreement: dict[str, AgreementSums] = field(default_factory=dict)
    devices: dict[str, DeviceEvidence] = field(default_factory=dict)
    # Device labels (device id -> labels) for the per-group analysis; devices missing here
    # belong to no group of any key.
    labels: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def install_failures(self) -> int:
        return len(self.failed_devices)

    @property
    def devices_reporting(self) -> int:
        return sum(1 for d in self.devices.values() if d.requests)

    @classmethod
    def from_windows(
        cls,
        windows: Iterable[Mapping[str, Any]],
        *,
        candidate: str,
        cohort: Iterable[str],
        failed: Iterable[str] = (),
        baseline_devices: int | None = None,
        labels: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Evidence:
        """Merge telemetry windows (ARCHITECTURE shape plus `device_id`) of the cohort's shadows.

        Windows of other versions, roles or devices are skipped, so a caller may pass a broad
        query result. Restricting to windows after the step started is the caller's job (it
        knows the clock and can do it in the database).
        """
        cohort_ids = list(dict.fromkeys(cohort))
        members = set(cohort_ids)
        evidence = cls(
            cohort_size=len(cohort_ids),
            baseline_devices=len(cohort_ids) if baseline_devices is None else baseline_devices,
            failed_devices=sorted(set(failed) & members),
            labels={d: {str(k): str(v) for k, v in (labels or {}).get(d, {}).items()} for d in cohort_ids
                    if labels and d in labels},
        )
        for window in windows:
            device_id = str(window.get("device_id", ""))
            wanted = window.get("role") == "shadow" and window.get("version") == candidate
            if not wanted or device_id not in members:
                continue
            device = evidence.devices.get(device_id)
            if device is None:
                device = evidence.devices[device_id] = DeviceEvidence(device_id)
            requests, errors = int(window.get("requests", 0) or 0), int(window.get("errors", 0) or 0)
            device.requests += requests
            device.errors += errors
            keys = paired_latency_keys(window)
            for key, target in ((keys[0], device.shadow_latency), (keys[1], device.serving_latency)):
                raw = window.get(key)
                if raw:
                    try:
                        target.merge(LatencyHistogram.from_dict(raw))
                    except ValueError:
                        # A malformed histogram from one device must not stop the whole gate;
                        # its requests still count, its latency does not.
                        continue
            for item in window.get("agreement") or ():
                name = str(item.get("output", ""))
                device.agreement.setdefault(name, AgreementSums()).add(item)
        for device in evidence.devices.values():
            evidence.requests += device.requests
            evidence.errors += device.errors
            evidence.shadow_latency.merge(device.shadow_latency)
            evidence.serving_latency.merge(device.serving_latency)
            for name, sums in device.agreement.items():
                evidence.agreement.setdefault(name, AgreementSums()).merge(sums)
        return evidence


# -- assessment -----------------------------------------------------------------------------------


@dataclass
class Assessment:
    verdict: Verdict
    reason: str
    rows: list[dict[str, Any]]
    deadline_passed: bool = False
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stored with decisions and shown by `fleet rollout status|explain`."""
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "deadline_passed": self.deadline_passed,
            "metrics": self.rows,
            **self.summary,
        }


def _num(value: float | None) -> float | None:
    """JSON has no NaN: unknown numbers are stored as null; 7 significant digits keep tiny p-values."""
    return None if value is None or math.isnan(value) or math.isinf(value) else float(f"{value:.7g}")


def _verdict(ok: bool | None) -> str:
    return Verdict.INCONCLUSIVE.value if ok is None else (Verdict.PASS.value if ok else Verdict.FAIL.value)


def _row(metric: str, value: float, threshold: float, comparison: str, ok: bool | None, *, samples: int,
         detail: str, worst: list[dict[str, Any]] | None = None, test: str = "threshold",
         group: str | None = None, **extra: Any) -> dict[str, Any]:
    row = {
        "metric": metric,
        "value": _num(value),
        "threshold": _num(threshold),
        "comparison": comparison,
        "ok": ok,
        "verdict": _verdict(ok),
        "test": test,
        "samples": samples,
        "group": group,
        "detail": detail,
        "worst_devices": worst or [],
    }
    row.update(extra)
    return row


def _worst(values: Iterable[tuple[str, float, int]], *, highest: bool) -> list[dict[str, Any]]:
    ranked = [(d, v, n) for d, v, n in values if not math.isnan(v)]
    ranked.sort(key=lambda item: (-item[1] if highest else item[1], item[0]))
    return [{"device": d, "value": _num(v), "samples": n} for d, v, n in ranked[:TOP_DEVICES]]


def _pulled(items: Iterable[tuple[str, float, float, int]]) -> list[dict[str, Any]]:
    """The devices that pulled a statistic most: (device, pull, shown value, samples), largest pull first."""
    ranked = [item for item in items if not math.isnan(item[1]) and item[1] > 0]
    ranked.sort(key=lambda item: (-item[1], item[0]))
    return [{"device": d, "value": _num(v), "samples": n, "pull": _num(p)} for d, p, v, n in ranked[:TOP_DEVICES]]


def _groups(policy: GatePolicy, evidence: Evidence) -> list[tuple[str, list[DeviceEvidence]]]:
    """The label groups to analyse, as ("key=value", devices), in a stable order."""
    if policy.group_by == GROUP_NONE or not evidence.labels:
        return []
    explicit = policy.group_by != GROUP_AUTO
    keys = [policy.group_by] if explicit else sorted({k for labels in evidence.labels.values() for k in labels})
    out: list[tuple[str, list[DeviceEvidence]]] = []
    for key in keys:
        split: dict[str, list[DeviceEvidence]] = {}
        for device in evidence.devices.values():
            value = evidence.labels.get(device.device_id, {}).get(key, NO_LABEL)
            split.setdefault(value, []).append(device)
        if not explicit and (not 2 <= len(split) <= MAX_GROUPS_PER_KEY or len(split) == len(evidence.devices)):
            # One group is the whole cohort (the overall test covers it); too many values, or one per
            # device (a serial number), are not groups.
            continue
        out.extend((f"{key}={value}", devices) for value, devices in sorted(split.items()))
    return out[:MAX_GROUPS]


@dataclass
class _Scope:
    """The evidence of the whole cohort or of one label group, with its per-device latency tests."""

    group: str | None
    devices: list[DeviceEvidence]
    requests: int
    latency: MannWhitney
    agreement: dict[str, AgreementSums]


def _scope(group: str | None, devices: list[DeviceEvidence], tests: Mapping[str, MannWhitney]) -> _Scope:
    agreement: dict[str, AgreementSums] = {}
    for device in devices:
        for name, sums in device.agreement.items():
            agreement.setdefault(name, AgreementSums()).merge(sums)
    return _Scope(group, devices, sum(d.requests for d in devices),
                  MannWhitney.combine(tests[d.device_id] for d in devices if d.device_id in tests), agreement)


def _merged(devices: Iterable[DeviceEvidence], attr: str) -> LatencyHistogram:
    out = LatencyHistogram()
    for device in devices:
        out.merge(getattr(device, attr))
    return out


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.1%}"


def _fmt_p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2g}"


LATENCY_TEST = "Mann-Whitney U, one-sided, stratified by device, candidate shifted by the tolerance"
AGREEMENT_TEST = "one-sided Wilson score bound (score test) of the agreement proportion"


def _latency_row(policy: GatePolicy, scope: _Scope, alpha: float, judged: bool,
                 tests: Mapping[str, MannWhitney]) -> tuple[dict[str, Any], str | None]:
    cand_hist = _merged(scope.devices, "shadow_latency")
    serv_hist = _merged(scope.devices, "serving_latency")
    cand_p95, serv_p95 = cand_hist.quantile(0.95), serv_hist.quantile(0.95)
    serv_median = serv_hist.quantile(0.5)
    shift_ms = hodges_lehmann(cand_hist, serv_hist) if judged else math.nan
    effect = shift_ms / serv_median if serv_median and not math.isnan(serv_median) else math.nan
    p_value = scope.latency.p_greater
    ok: bool | None = None
    failure = None
    if judged and not math.isnan(p_value):
        ok = p_value >= alpha
        if not ok:
            where = f" on group {scope.group}" if scope.group else ""
            failure = (f"latency{where}: candidate {_pct(effect)} ({shift_ms:+.3g} ms, Hodges-Lehmann) vs serving on "
                       f"the same requests, beyond the {policy.max_latency_regression:.0%} + "
                       f"{policy.latency_slack_ms:g} ms tolerance (p={_fmt_p(p_value)} < {alpha:.2g}); "
                       f"p95 {_fmt_ms(cand_p95)} vs {_fmt_ms(serv_p95)}")
    ratio = cand_p95 / serv_p95 if serv_p95 and not math.isnan(serv_p95) and serv_p95 > 0 else math.nan
    total_sd = math.sqrt(scope.latency.variance) if scope.latency.variance > 0 else math.nan
    worst = _pulled(
        (d.device_id, (tests[d.device_id].u - tests[d.device_id].mean) / total_sd, _device_ratio(d),
         d.shadow_latency.count)
        for d in scope.devices if d.device_id in tests and not math.isnan(total_sd))
    row = _row(
        "latency", effect, policy.max_latency_regression, "<=", ok, samples=scope.latency.n_x,
        detail=(f"candidate vs serving on paired requests: shift {_pct(effect)} (Hodges-Lehmann "
                f"{'n/a' if math.isnan(shift_ms) else f'{shift_ms:+.3g} ms'}), p95 {_fmt_ms(cand_p95)} vs "
                f"{_fmt_ms(serv_p95)}; fails if slower than serving x{1 + policy.max_latency_regression:.2f} + "
                f"{policy.latency_slack_ms:g} ms at {1 - alpha:.2%} confidence"
                + ("" if judged else "; not judged yet (too few samples)")),
        worst=worst, test=LATENCY_TEST, group=scope.group, p_value=_num(p_value), alpha=_num(alpha),
        effect=_num(effect), effect_ms=_num(shift_ms), candidate_p95_ms=_num(cand_p95),
        serving_p95_ms=_num(serv_p95), p95_ratio=_num(ratio),
    )
    return row, failure


def _agreement_rows(policy: GatePolicy, scope: _Scope, task: str, alpha: float,
                    judged: bool) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for name in sorted(scope.agreement):
        sums = scope.agreement[name]
        value, samples, what = sums.score(task)
        proportion = min(max(value, 0.0), 1.0) if not math.isnan(value) else math.nan
        low, high = (wilson_interval(proportion * samples, samples, 1 - 2 * alpha)
                     if samples and not math.isnan(proportion) else (math.nan, math.nan))
        p_value = proportion_p_below(proportion * samples, samples, policy.min_agreement) if samples else math.nan
        ok: bool | None = None
        if judged and samples and not math.isnan(p_value):
            ok = p_value >= alpha
            if not ok:
                where = f" on group {scope.group}" if scope.group else ""
                failures.append(f"output {name!r}{where}: {what} {value:.3f} < {policy.min_agreement:.3f} "
                                f"(upper bound {high:.3f} at {1 - alpha:.2%}, p={_fmt_p(p_value)}, n={samples})")
        components: list[dict[str, Any]] = []
        metrics = getattr(sums, "metrics", None)
        if callable(metrics):
            # Task-aware detail (top-k, IoU, box counts...) for the record; the score above decides.
            components = [{"name": str(m), "value": _num(float(v)), "samples": int(n)} for m, v, n in metrics(task)]
        deficit = ((d.device_id, *_device_score(d, name, task)) for d in scope.devices if name in d.agreement)
        worst = _pulled((dev, (policy.min_agreement - v) * n, v, n) for dev, v, n in deficit)
        rows.append(_row(
            f"agreement[{name}]", value, policy.min_agreement, ">=", ok, samples=samples,
            detail=f"{what} of output {name!r} between candidate and serving model"
            + ("" if math.isnan(low) else f"; {1 - 2 * alpha:.1%} interval [{low:.3f}, {high:.3f}]")
            + ("" if judged else "; not judged yet (too few samples)"),
            worst=worst, test=AGREEMENT_TEST, group=scope.group, output=name, p_value=_num(p_value),
            alpha=_num(alpha), interval=[_num(low), _num(high)], effect=_num(value - policy.min_agreement),
            components=components,
        ))
    return rows, failures


def assess(policy: GatePolicy, evidence: Evidence, task: str, elapsed_s: float) -> Assessment:
    """Judge one step's shadow evidence: Pass, Fail or Inconclusive, with the numbers."""
    rows: list[dict[str, Any]] = []
    failures: list[str] = []

    # Install failures: judged at once, since no amount of waiting un-fails a device.
    share = evidence.install_failures / evidence.cohort_size if evidence.cohort_size else 0.0
    install_ok = share <= policy.max_install_failure_share + 1e-12
    rows.append(_row(
        "install_failure_share", share, policy.max_install_failure_share, "<=", install_ok,
        samples=evidence.cohort_size,
        detail=f"{evidence.install_failures} of {evidence.cohort_size} cohort devices failed to install "
        "the candidate",
        worst=[{"device": d, "value": 1.0, "samples": 1} for d in evidence.failed_devices[:TOP_DEVICES]],
    ))
    if not install_ok:
        failures.append(
            f"{evidence.install_failures} of {evidence.cohort_size} devices failed to install the candidate "
            f"({share:.0%} > {policy.max_install_failure_share:.0%})"
        )

    # Errors: fail early once the error count can no longer meet the limit even if every
    # request still needed for `min_samples` succeeded; after that, the plain rate decides.
    requests, errors = evidence.requests, evidence.errors
    error_rate = errors / requests if requests else 0.0
    budget = policy.max_error_rate * max(requests, policy.min_samples)
    errors_ok = errors <= budget + 1e-9
    rows.append(_row(
        "error_rate", error_rate, policy.max_error_rate, "<=", errors_ok, samples=requests,
        detail=f"{errors} candidate errors in {requests} mirrored requests"
        + ("" if requests >= policy.min_samples else f" (at most {math.floor(budget + 1e-9)} allowed "
                                                     f"over the first {policy.min_samples})"),
        worst=_worst(((d.device_id, d.errors / d.requests if d.requests else math.nan, d.requests)
                for d in evidence.devices.values()), highest=True),
    ))
    if not errors_ok:
        failures.append(f"candidate error rate {error_rate:.2%} ({errors}/{requests}) over "
                        f"{policy.max_error_rate:.2%}")

    # Samples. With no baseline in the cohort nothing can be mirrored: the step is judged on
    # install failures and errors alone (the Serving phase then waits for every install).
    # An empty cohort (a step that adds no device: 1 device, steps 10%, 100%) has nothing to judge.
    waived = evidence.baseline_devices == 0
    enough = waived or requests >= policy.min_samples
    if not waived:
        samples_detail = (f"{requests} mirrored requests from {evidence.devices_reporting} of "
                          f"{evidence.cohort_size} cohort devices")
    elif evidence.cohort_size:
        samples_detail = ("no cohort device has a serving version to compare against (first install): "
                          "sample requirement waived")
    else:
        samples_detail = "this step adds no device: nothing to judge"
    rows.append(_row(
        "samples", float(requests), float(policy.min_samples), ">=", enough, samples=requests,
        detail=samples_detail,
        worst=_worst(((d.device_id, float(d.requests), d.requests) for d in evidence.devices.values()),
                     highest=False),
    ))

    # Statistical tests: the whole cohort, then each label group with enough samples. Every
    # test judged here counts in the Bonferroni family, so the family-wise level stays 1 - confidence.
    judged = requests >= policy.min_samples
    tests = {
        d.device_id: mann_whitney_histograms(d.shadow_latency, d.serving_latency,
                                             tolerance=policy.max_latency_regression, slack=policy.latency_slack_ms)
        for d in evidence.devices.values() if d.shadow_latency.count and d.serving_latency.count
    }
    scopes = [_scope(None, list(evidence.devices.values()), tests)]
    group_scopes = [_scope(name, devices, tests) for name, devices in _groups(policy, evidence)]
    scopes += [s for s in group_scopes if s.requests >= policy.min_group_samples]
    skipped_groups = [s.group for s in group_scopes if s.requests < policy.min_group_samples]
    family = sum((1 if s.latency.n_x else 0) + len(s.agreement) for s in scopes) if judged else 0
    alpha = bonferroni(1 - policy.confidence, family)
    for scope in scopes:
        latency_row, failure = _latency_row(policy, scope, alpha, judged, tests)
        if scope.group is None or latency_row["ok"] is not None:
            rows.append(latency_row)
        if failure:
            failures.append(failure)
        agreement_rows, agreement_failures = _agreement_rows(policy, scope, task, alpha, judged)
        rows.extend(agreement_rows)
        failures.extend(agreement_failures)
    if not evidence.agreement and requests >= policy.min_samples and not waived:
        # Mirrored requests without a single comparison: the agent could not compare outputs.
        failures.append("no output comparisons were reported for the mirrored requests")
        rows.append(_row("agreement", math.nan, policy.min_agreement, ">=", False, samples=0,
                         detail="no output comparisons were reported for the mirrored requests"))

    summary = {
        "cohort_size": evidence.cohort_size,
        "devices_reporting": evidence.devices_reporting,
        "requests": requests,
        "errors": errors,
        "install_failures": evidence.install_failures,
        "elapsed_s": round(elapsed_s, 3),
        "policy": policy.to_dict(),
        "confidence": policy.confidence,
        "tests": family,
        "alpha_per_test": _num(alpha) if family else None,
        "groups": [s.group for s in scopes if s.group],
        "groups_too_small": skipped_groups,
    }
    if failures:
        return Assessment(Verdict.FAIL, "; ".join(failures), rows, summary=summary)
    if not enough:
        deadline_passed = elapsed_s > policy.analysis_deadline_s
        reason = (f"waiting for samples: {requests} of {policy.min_samples} mirrored requests from "
                  f"{evidence.devices_reporting} of {evidence.cohort_size} cohort devices")
        if deadline_passed:
            reason = (f"analysis deadline of {policy.analysis_deadline_s:g}s passed with only {requests} of "
                      f"{policy.min_samples} mirrored requests; check that the cohort devices receive "
                      f"traffic, or lower gate.min_samples, then resume")
        return Assessment(Verdict.INCONCLUSIVE, reason, rows, deadline_passed=deadline_passed,
                          summary=summary)
    if waived and not evidence.cohort_size:
        reason = "this step adds no device: nothing to judge"
    elif waived:
        reason = ("first install: no serving version to compare against; install failures and "
                  "errors within limits")
    else:
        groups = [s.group for s in scopes if s.group]
        reason = (f"{requests} mirrored requests: latency, agreement, errors and installs within limits at "
                  f"{policy.confidence:.0%} confidence ({family} tests"
                  + (f", groups {', '.join(g for g in groups if g)}" if groups else "") + ")")
    return Assessment(Verdict.PASS, reason, rows, summary=summary)


def _fmt_ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g} ms"


def _device_ratio(device: DeviceEvidence) -> float:
    """The device's candidate/serving median latency ratio (what a reader compares first)."""
    cand, serv = device.shadow_latency.quantile(0.5), device.serving_latency.quantile(0.5)
    if math.isnan(cand) or math.isnan(serv) or serv <= 0:
        return math.nan
    return cand / serv


def _device_score(device: DeviceEvidence, output: str, task: str) -> tuple[float, int]:
    value, samples, _ = device.agreement[output].score(task)
    return value, samples
