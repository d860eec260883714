"""The mergeable latency histogram: quantiles within its stated relative accuracy, exact merges,
bounded memory, and strict parsing of what arrives over the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleet.core.histogram import LatencyHistogram


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "bimodal"])
def test_quantiles_within_relative_accuracy(dist: str) -> None:
    rng = np.random.default_rng(7)
    values = {
        "lognormal": rng.lognormal(mean=0.0, sigma=1.0, size=20_000),
        "uniform": rng.uniform(0.05, 50.0, size=20_000),
        "bimodal": np.concatenate([rng.normal(1.0, 0.05, 10_000), rng.normal(40.0, 2.0, 10_000)]).clip(0.01),
    }[dist]
    hist = LatencyHistogram(0.01)
    hist.record_many(values.tolist())
    ordered = np.sort(values)
    for q in (0.0, 0.5, 0.9, 0.95, 0.99, 1.0):
        exact = ordered[int(q * (len(ordered) - 1))]
        assert hist.quantile(q) == pytest.approx(exact, rel=0.0101), q
    assert hist.count == len(values)
    assert hist.mean == pytest.approx(values.mean())


def test_merge_equals_recording_everything_in_one() -> None:
    rng = np.random.default_rng(3)
    a_values, b_values = rng.exponential(2.0, 5000), rng.exponential(5.0, 3000)
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    a.record_many(a_values.tolist())
    b.record_many(b_values.tolist())
    both.record_many([*a_values.tolist(), *b_values.tolist()])
    merged = a.copy().merge(b)
    assert merged.buckets == both.buckets and merged.count == both.count
    assert merged.quantile(0.95) == both.quantile(0.95)
    with pytest.raises(ValueError, match="accuracy"):
        a.merge(LatencyHistogram(0.02))


def test_memory_is_bounded_by_the_value_range_not_the_sample_count() -> None:
    hist = LatencyHistogram(0.01)
    rng = np.random.default_rng(1)
    for _ in range(20):
        hist.record_many(rng.uniform(0.001, 3_600_000.0, 5000).tolist())
    assert hist.count == 100_000
    assert len(hist.buckets) < 1_300  # 1 microsecond .. 1 hour at 1 %


def test_zero_empty_and_nan() -> None:
    hist = LatencyHistogram()
    assert math.isnan(hist.quantile(0.5))
    hist.record(0.0)
    hist.record(float("nan"))
    assert hist.count == 1 and hist.quantile(0.5) == 0.0


def test_wire_round_trip_and_refusals() -> None:
    hist = LatencyHistogram()
    hist.record_many([0.2, 0.3, 5.0, 0.0])
    again = LatencyHistogram.from_dict(hist.to_dict())
    assert again.buckets == hist.buckets and again.count == 4 and again.max == 5.0
    raw = hist.to_dict()
    raw["count"] = 99
    with pytest.raises(ValueError, match="count"):
        LatencyHistogram.from_dict(raw)
    with pytest.raises(ValueError, match="range"):
        LatencyHistogram.from_dict({"buckets": {"999999": 1}, "count": 1})
