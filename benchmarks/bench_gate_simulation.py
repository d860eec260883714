"""Does the statistical gate decide right, at its default sample size, and fast enough?

The claims under test (fleet.core.gate with the default `GatePolicy`):

- A/A: a candidate no different from the serving model fails at most 2% of the time;
- a candidate 10% slower (every request) is caught (Fail) at least 95% of the time;
- a 5-point agreement drop is caught at least 95% of the time, both from an otherwise identical
  model (top-1 agreement 1.00 -> 0.95) and from a close retrain (0.99 -> 0.94);
- (also shown) how often a good retrain that agrees 0.985, just above the 0.98 default, is held back;
- (also shown) a candidate 10% slower on one label group only is caught, and the failure names
  that group;
- judging a cohort of 1,000 devices x 60 samples takes well under a second.

The simulated cohort (stated, since every power figure depends on it): `--devices` devices
(default 20) share `min_samples` mirrored requests equally, half of them labelled `hw=a`, half
`hw=b` (so the group tests and their Bonferroni share are part of every trial). Device speeds
differ (median latency lognormal around 20 ms, sigma 0.3 between devices); per request, the
serving and the candidate latency on the same input are independent lognormal draws around the
device's median (sigma 0.12, i.e. ~12% request-to-request spread). Top-1 agreement per request
is a Bernoulli draw: 0.99 for a candidate that behaves like the serving model (a close retrain),
with device-to-device spread (+-0.005). Histograms, agreement sums and the gate are the real
ones: `Evidence` is built per device exactly as telemetry windows would build it.

Run: `python benchmarks/bench_gate_simulation.py` (about 30 s on one core); `--trials N`,
`--devices N`, `--quick` for a smoke run. Prints a table; the last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np

from fleet.core.agreement import AgreementSums
from fleet.core.gate import DeviceEvidence, Evidence, GatePolicy, Verdict, assess
from fleet.core.histogram import LatencyHistogram

TARGETS = {"aa_false_failure_max": 0.02, "power_min": 0.95, "judge_1000x60_max_s": 1.0}


def _hist(values: np.ndarray) -> LatencyHistogram:
    h = LatencyHistogram()
    for v in values.tolist():
        h.record(v)
    return h


def simulate(rng: np.random.Generator, *, devices: int, samples_per_device: int, slow: float = 1.0,
             slow_group: str | None = None, agreement: float = 0.99) -> Evidence:
    """One cohort's evidence: `slow` multiplies candidate latency (on `slow_group` only if given)."""
    ids = [f"dev-{i:04d}" for i in range(devices)]
    labels = {d: {"hw": "a" if i % 2 == 0 else "b"} for i, d in enumerate(ids)}
    evidence = Evidence(cohort_size=devices, baseline_devices=devices, labels=labels)
    medians = rng.lognormal(math.log(20.0), 0.3, devices)
    for device_id, median in zip(ids, medians, strict=True):
        factor = slow if slow_group is None or labels[device_id]["hw"] == slow_group else 1.0
        n = samples_per_device
        serving = median * rng.lognormal(0.0, 0.12, n)
        candidate = median * factor * rng.lognormal(0.0, 0.12, n)
        p = min(1.0, max(0.0, agreement + rng.uniform(-0.005, 0.005)))
        agree = int(rng.binomial(n, p))
        device = DeviceEvidence(device_id, requests=n, shadow_latency=_hist(candidate),
                                serving_latency=_hist(serving))
        device.agreement["probs"] = AgreementSums(samples=n, cosine_sum=0.99 * n, cosine_min=0.5,
                                                  top1_agree=agree, top1_samples=n)
        evidence.devices[device_id] = device
    for device in evidence.devices.values():
        evidence.requests += device.requests
        evidence.shadow_latency.merge(device.shadow_latency)
        evidence.serving_latency.merge(device.serving_latency)
        for name, sums in device.agreement.items():
            evidence.agreement.setdefault(name, AgreementSums()).merge(sums)
    return evidence


def _failed_metrics(rows: list[dict[str, Any]]) -> set[str]:
    return {r["metric"] + (f"@{r['group']}" if r.get("group") else "") for r in rows if r.get("ok") is False}


def run_scenario(name: str, trials: int, seed: int, policy: GatePolicy, devices: int,
                 **kwargs: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    per_device = math.ceil(policy.min_samples / devices)
    fails = inconclusive = 0
    named_group = 0
    for _ in range(trials):
        evidence = simulate(rng, devices=devices, samples_per_device=per_device, **kwargs)
        result = assess(policy, evidence, "classification", 10.0)
        if result.verdict is Verdict.FAIL:
            fails += 1
            if kwargs.get("slow_group") and f"group hw={kwargs['slow_group']}" in result.reason:
                named_group += 1
        elif result.verdict is Verdict.INCONCLUSIVE:
            inconclusive += 1
    out = {"scenario": name, "trials": trials, "fail_rate": fails / trials,
           "inconclusive_rate": inconclusive / trials, "samples": per_device * devices}
    if kwargs.get("slow_group"):
        out["group_named_rate"] = named_group / fails if fails else 0.0
    return out


def time_judging(policy: GatePolicy, devices: int = 1000, samples: int = 60, repeats: int = 3) -> dict[str, float]:
    """Seconds to judge `devices` x `samples` (median of repeats), with and without building Evidence."""
    rng = np.random.default_rng(7)
    evidence = simulate(rng, devices=devices, samples_per_device=samples)
    windows = [{
        "device_id": d.device_id, "role": "shadow", "version": "v2", "requests": d.requests, "errors": 0,
        "latency_ms": d.shadow_latency.to_dict(), "paired_serving_latency_ms": d.serving_latency.to_dict(),
        "agreement": [s.to_dict(n) for n, s in d.agreement.items()],
    } for d in evidence.devices.values()]
    assess_times, total_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        built = Evidence.from_windows(windows, candidate="v2", cohort=list(evidence.devices),
                                      labels=evidence.labels)
        middle = time.perf_counter()
        assess(policy, built, "classification", 10.0)
        end = time.perf_counter()
        assess_times.append(end - middle)
        total_times.append(end - start)
    return {"assess_s": sorted(assess_times)[repeats // 2], "windows_and_assess_s": sorted(total_times)[repeats // 2]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trials", type=int, default=400, help="simulated rollouts per scenario")
    parser.add_argument("--devices", type=int, default=20, help="cohort devices sharing min_samples requests")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests (20 trials, no targets)")
    args = parser.parse_args(argv)
    trials = 20 if args.quick else args.trials
    policy = GatePolicy()
    scenarios = [
        run_scenario("A/A (no difference)", trials, args.seed, policy, args.devices),
        run_scenario("latency +10%", trials, args.seed + 1, policy, args.devices, slow=1.10),
        run_scenario("agreement 1.00 -> 0.95 (5-point drop)", trials, args.seed + 2, policy, args.devices,
                     agreement=0.95),
        run_scenario("agreement 0.99 -> 0.94 (5-point drop)", trials, args.seed + 4, policy, args.devices,
                     agreement=0.94),
        run_scenario("latency +10% on hw=b only", trials, args.seed + 3, policy, args.devices, slow=1.10,
                     slow_group="b"),
        # Not a target: the price of a strict default, a good candidate just above it is rarely held.
        run_scenario("good retrain agreeing 0.985", trials, args.seed + 5, policy, args.devices, agreement=0.985),
    ]
    timing = time_judging(policy)
    print(f"gate policy: min_samples={policy.min_samples} confidence={policy.confidence} "
          f"max_latency_regression={policy.max_latency_regression} latency_slack_ms={policy.latency_slack_ms} "
          f"min_agreement={policy.min_agreement}; {args.devices} devices, groups hw=a/hw=b")
    print(f"{'scenario':<44} {'trials':>6} {'samples':>7} {'fail':>7} {'inconcl.':>8}")
    for s in scenarios:
        extra = f"  (group named in {s['group_named_rate']:.0%} of failures)" if "group_named_rate" in s else ""
        print(f"{s['scenario']:<44} {s['trials']:>6} {s['samples']:>7} {s['fail_rate']:>7.1%} "
              f"{s['inconclusive_rate']:>8.1%}{extra}")
    print(f"judging 1000 devices x 60 samples: assess {timing['assess_s'] * 1000:.0f} ms, "
          f"from windows + assess {timing['windows_and_assess_s'] * 1000:.0f} ms")
    checks = {
        "aa_false_failure_ok": scenarios[0]["fail_rate"] <= TARGETS["aa_false_failure_max"],
        "latency_power_ok": scenarios[1]["fail_rate"] >= TARGETS["power_min"],
        "agreement_power_ok": min(scenarios[2]["fail_rate"], scenarios[3]["fail_rate"]) >= TARGETS["power_min"],
        "judge_time_ok": timing["windows_and_assess_s"] < TARGETS["judge_1000x60_max_s"],
    }
    result = {"policy": policy.to_dict(), "devices": args.devices, "quick": args.quick, "scenarios": scenarios,
              "timing": timing, "targets": TARGETS, "checks": checks}
    print("RESULT " + json.dumps(result, sort_keys=True))
    # A quick run is too small to hold the targets; a full run that misses one says so by its exit code.
    return 0 if args.quick or all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
