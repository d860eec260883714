"""Every statistic of `fleet.core.stats` against scipy (or brute force) on fixed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from fleet.core.histogram import LatencyHistogram
from fleet.core.stats import (
    MannWhitney,
    bonferroni,
    bucket_values,
    hodges_lehmann,
    mann_whitney_histograms,
    proportion_p_below,
    wilson_interval,
)


def histogram(values: np.ndarray) -> LatencyHistogram:
    h = LatencyHistogram()
    h.record_many(float(v) for v in values)
    return h


def expanded(h: LatencyHistogram) -> np.ndarray:
    values, counts = bucket_values(h)
    return np.repeat(values, counts.astype(int))


RNG = np.random.default_rng(1234)
SERVING = RNG.lognormal(math.log(20.0), 0.15, 300)
CANDIDATE = RNG.lognormal(math.log(21.5), 0.15, 240)


@pytest.mark.parametrize(("tolerance", "slack"), [(0.0, 0.0), (0.05, 0.0), (0.05, 0.5), (0.2, 0.5)])
def test_mann_whitney_from_histograms_matches_scipy_on_expanded_midpoints(tolerance: float, slack: float) -> None:
    cand, serv = histogram(CANDIDATE), histogram(SERVING)
    result = mann_whitney_histograms(cand, serv, tolerance=tolerance, slack=slack)
    x = (expanded(cand) - slack) / (1 + tolerance)
    y = expanded(serv)
    ref = sps.mannwhitneyu(x, y, alternative="greater", method="asymptotic", use_continuity=True)
    assert result.u == pytest.approx(ref.statistic)
    assert result.p_greater == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)


def test_mann_whitney_ties_within_buckets_match_scipy() -> None:
    # Few distinct values: heavy ties, where the tie correction matters.
    cand = histogram(np.array([1.0] * 30 + [2.0] * 50 + [3.0] * 20))
    serv = histogram(np.array([1.0] * 40 + [2.0] * 50 + [3.0] * 10 + [0.0] * 5))
    result = mann_whitney_histograms(cand, serv)
    ref = sps.mannwhitneyu(expanded(cand), expanded(serv), alternative="greater", method="asymptotic")
    assert result.u == pytest.approx(ref.statistic)
    assert result.p_greater == pytest.approx(ref.pvalue, rel=1e-9)


def test_mann_whitney_strata_add_and_empty_has_no_p_value() -> None:
    a = mann_whitney_histograms(histogram(CANDIDATE[:100]), histogram(SERVING[:100]))
    b = mann_whitney_histograms(histogram(CANDIDATE[100:]), histogram(SERVING[100:]))
    both = MannWhitney.combine([a, b])
    assert both.u == a.u + b.u and both.variance == a.variance + b.variance and both.n_x == 240
    assert math.isnan(mann_whitney_histograms(LatencyHistogram(), histogram(SERVING)).p_greater)


def test_a_regression_beyond_the_tolerance_is_significant_and_one_within_is_not() -> None:
    serv = histogram(RNG.lognormal(math.log(20.0), 0.1, 2000))
    slower = histogram(RNG.lognormal(math.log(22.0), 0.1, 2000))  # +10%
    assert mann_whitney_histograms(slower, serv, tolerance=0.05).p_greater < 1e-6
    assert mann_whitney_histograms(slower, serv, tolerance=0.15).p_greater > 0.5


def test_hodges_lehmann_matches_brute_force_median_of_pairwise_differences() -> None:
    for n_x, n_y in ((41, 37), (40, 30), (1, 1), (2, 3)):
        cand, serv = histogram(CANDIDATE[:n_x]), histogram(SERVING[:n_y])
        brute = float(np.median(np.subtract.outer(expanded(cand), expanded(serv)).ravel()))
        assert hodges_lehmann(cand, serv) == pytest.approx(brute, rel=1e-12, abs=1e-12)
    assert math.isnan(hodges_lehmann(LatencyHistogram(), histogram(SERVING)))


def test_hodges_lehmann_finds_a_known_shift() -> None:
    base = RNG.lognormal(math.log(20.0), 0.1, 3000)
    assert hodges_lehmann(histogram(base + 2.0), histogram(base)) == pytest.approx(2.0, abs=0.25)


@pytest.mark.parametrize(("k", "n", "confidence"), [(0, 10, 0.95), (10, 10, 0.95), (57, 60, 0.98), (930, 1000, 0.96),
                                                     (3, 7, 0.5)])
def test_wilson_interval_matches_scipy(k: int, n: int, confidence: float) -> None:
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = wilson_interval(k, n, confidence)
    assert low == pytest.approx(ref.low, abs=1e-12) and high == pytest.approx(ref.high, abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0, 0.95))


@pytest.mark.parametrize(("k", "n", "threshold"), [(880, 1000, 0.9), (950, 1000, 0.9), (55, 60, 0.95)])
def test_proportion_p_value_inverts_the_one_sided_wilson_bound(k: int, n: int, threshold: float) -> None:
    p_value = proportion_p_below(k, n, threshold)
    ref = sps.norm.cdf((k / n - threshold) / math.sqrt(threshold * (1 - threshold) / n))
    assert p_value == pytest.approx(ref, rel=1e-9)
    for alpha in (0.01, 0.02, 0.1):
        _, upper = wilson_interval(k, n, 1 - 2 * alpha)  # one-sided bound at level 1 - alpha
        assert (upper < threshold) == (p_value < alpha)


def test_bonferroni() -> None:
    assert bonferroni(0.02, 4) == pytest.approx(0.005)
    assert bonferroni(0.02, 0) == 0.02
