"""The rollout gate: is the candidate, measured in shadow on this step's cohort, good enough to serve?

Rules this module enforces (pure: telemetry comes in as plain dicts, the clock as `elapsed_s`):

- failures beat waiting: an install-failure share over the limit fails the step at once, and so
  does an error count that can no longer meet the error-rate limit, however few samples exist;
- quality is judged only on enough evidence: latency and agreement are judged once the cohort
  has mirrored at least `min_samples` requests, and until then the verdict is Inconclusive;
- latency is compared on *paired* requests (the serving model's latency on the same mirrored
  requests), so a busy or slow device does not count against the candidate; candidate p95 must
  stay within `serving p95 * (1 + max_latency_regression) + latency_slack_ms`, the slack keeping
  sub-millisecond noise from failing a fast model;
- agreement is top-1 agreement for classification and mean cosine similarity otherwise, per
  output; the worst output decides;
- an Inconclusive verdict past `analysis_deadline_s` says so (`deadline_passed`); the reconciler
  then pauses the rollout for an operator rather than guessing;
- every verdict carries its metric rows (value, threshold, samples, the devices that pulled each
  metric most), so every decision can be explained with its numbers.
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

TOP_DEVICES = 3


class Verdict(str, Enum):
    PASS = "Pass"
    FAIL = "Fail"
    INCONCLUSIVE = "Inconclusive"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of one rollout's gate. The defaults are meant to work without tuning."""

    min_samples: int = 200
    max_latency_regression: float = 0.20
    latency_slack_ms: float = 0.5
    min_agreement: float = 0.95
    max_install_failure_share: float = 0.2
    max_error_rate: float = 0.01
    analysis_deadline_s: float = 600.0

    # (low, high, integer?) per field: the range a value must fall in.
    _RANGES = {
        "min_samples": (1, 10_000_000, True),
        "max_latency_regression": (0.0, 100.0, False),
        "latency_slack_ms": (0.0, 60_000.0, False),
        "min_agreement": (0.0, 1.0, False),
        "max_install_failure_share": (0.0, 1.0, False),
        "max_error_rate": (0.0, 1.0, False),
        "analysis_deadline_s": (1.0, 30 * 24 * 3600.0, False),
    }

    def __post_init__(self) -> None:
        for name, (low, high, integer) in self._RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidInputError(f"gate.{name} must be a number, got {value!r}")
            if integer and value != int(value):
                raise InvalidInputError(f"gate.{name} must be a whole number, got {value!r}")
            if not low <= value <= high:
                raise InvalidInputError(f"gate.{name} must be between {low:g} and {high:g}, got {value!r}")

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
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise InvalidInputError(f"gate.{name} must be a number, got {given!r}") from None
            if name == "min_samples" and isinstance(value, float) and value.is_integer():
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
            for key, target in (("latency_ms", device.shadow_latency),
                                ("paired_serving_latency_ms", device.serving_latency)):
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
        """JSON-ready: stored with decisions and shown by `fleet rollout status`."""
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "deadline_passed": self.deadline_passed,
            "metrics": self.rows,
            **self.summary,
        }


def _num(value: float) -> float | None:
    """JSON has no NaN: unknown numbers are stored as null."""
    return None if value is None or math.isnan(value) or math.isinf(value) else round(value, 6)


def _row(metric: str, value: float, threshold: float, comparison: str, ok: bool | None, *, samples: int,
         detail: str, worst: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    row = {
        "metric": metric,
        "value": _num(value),
        "threshold": _num(threshold),
        "comparison": comparison,
        "ok": ok,
        "samples": samples,
        "detail": detail,
        "worst_devices": worst or [],
    }
    row.update(extra)
    return row


def _worst(values: Iterable[tuple[str, float, int]], *, highest: bool) -> list[dict[str, Any]]:
    ranked = [(d, v, n) for d, v, n in values if not math.isnan(v)]
    ranked.sort(key=lambda item: (-item[1] if highest else item[1], item[0]))
    return [{"device": d, "value": _num(v), "samples": n} for d, v, n in ranked[:TOP_DEVICES]]


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

    # Latency on paired requests.
    cand_p95 = evidence.shadow_latency.quantile(0.95)
    serv_p95 = evidence.serving_latency.quantile(0.95)
    limit_ratio = 1 + policy.max_latency_regression
    ratio = cand_p95 / serv_p95 if serv_p95 and not math.isnan(serv_p95) and serv_p95 > 0 else math.nan
    latency_known = not math.isnan(cand_p95) and not math.isnan(serv_p95)
    latency_ok: bool | None = None
    if latency_known and requests >= policy.min_samples:
        latency_ok = cand_p95 <= serv_p95 * limit_ratio + policy.latency_slack_ms
        if not latency_ok:
            failures.append(
                f"candidate p95 latency {cand_p95:.3g} ms vs serving {serv_p95:.3g} ms on the same requests "
                f"(x{ratio:.2f} > x{limit_ratio:.2f} + {policy.latency_slack_ms:g} ms)"
            )
    rows.append(_row(
        "latency_p95_ratio", ratio, limit_ratio, "<=", latency_ok, samples=evidence.shadow_latency.count,
        detail=f"candidate p95 {_fmt_ms(cand_p95)} vs serving p95 {_fmt_ms(serv_p95)} on paired requests; "
        f"allowed up to serving x{limit_ratio:.2f} + {policy.latency_slack_ms:g} ms",
        worst=_worst(((d.device_id, _device_ratio(d), d.shadow_latency.count)
                      for d in evidence.devices.values()), highest=True),
        candidate_p95_ms=_num(cand_p95), serving_p95_ms=_num(serv_p95),
    ))

    # Agreement per output; the worst output decides.
    for name in sorted(evidence.agreement):
        value, samples, what = evidence.agreement[name].score(task)
        agree_ok: bool | None = None
        if samples and requests >= policy.min_samples:
            agree_ok = value >= policy.min_agreement - 1e-12
            if not agree_ok:
                failures.append(f"output {name!r}: {what} {value:.3f} < {policy.min_agreement:.3f}")
        rows.append(_row(
            f"agreement[{name}]", value, policy.min_agreement, ">=", agree_ok, samples=samples,
            detail=f"{what} of output {name!r} between candidate and serving model",
            worst=_worst(((d.device_id, *_device_score(d, name, task)) for d in evidence.devices.values()
                          if name in d.agreement), highest=False),
            output=name,
        ))
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
        reason = (f"{requests} mirrored requests: latency, agreement, errors and installs within limits")
    return Assessment(Verdict.PASS, reason, rows, summary=summary)


def _fmt_ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g} ms"


def _device_ratio(device: DeviceEvidence) -> float:
    cand, serv = device.shadow_latency.quantile(0.95), device.serving_latency.quantile(0.95)
    if math.isnan(cand) or math.isnan(serv) or serv <= 0:
        return math.nan
    return cand / serv


def _device_score(device: DeviceEvidence, output: str, task: str) -> tuple[float, int]:
    value, samples, _ = device.agreement[output].score(task)
    return value, samples
