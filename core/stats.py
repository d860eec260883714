"""Statistical tests the rollout gate uses, computed from mergeable summaries instead of raw samples.

Rules this module enforces (pure Python + numpy, no IO):

- latency is compared with a one-sided Mann-Whitney U test computed directly from two
  `LatencyHistogram`s: every value of a bucket stands at the bucket's midpoint, so values of one
  bucket tie, and the variance carries the usual tie correction; the p-value is the normal
  approximation with a continuity correction (the same numbers `scipy.stats.mannwhitneyu(x, y,
  alternative="greater", method="asymptotic")` gives on the expanded midpoints);
- an effect-size tolerance is applied the way Kayenta does: the candidate's values are first
  moved by the tolerance (`v -> (v - slack) / (1 + tolerance)`), so the test asks "is the
  candidate slower than the serving model *by more than the tolerance*?", not "is it slower at
  all?" (which, with enough samples, is always yes);
- per-device tests combine by adding U, its mean and its variance (a stratified, van Elteren
  style test without weights): each device is compared with itself, so a slow device does not
  count against the candidate and device-to-device spread does not drown a regression;
- the size of a latency shift is the Hodges-Lehmann estimate, the weighted median of all
  pairwise differences of bucket midpoints (O(Bx * By) with B buckets, never O(samples^2));
- proportions (agreement) get the Wilson score interval; the one-sided score test it inverts
  gives their p-value;
- a family of k tests at overall level alpha is judged at alpha / k each (Bonferroni).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from fleet.core.histogram import LatencyHistogram

_NORMAL = NormalDist()


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z, accurate in the far tail (erfc, not 1 - cdf)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """The standard normal p-quantile, 0 < p < 1."""
    return _NORMAL.inv_cdf(p)


def bonferroni(alpha: float, tests: int) -> float:
    """The per-test level that keeps the family-wise error rate of `tests` tests at `alpha`."""
    return alpha / max(1, tests)


def bucket_values(hist: LatencyHistogram) -> tuple[np.ndarray, np.ndarray]:
    """(values, counts) of a histogram: each bucket's midpoint (0 for the zero bucket), sorted."""
    gamma = (1 + hist.relative_accuracy) / (1 - hist.relative_accuracy)
    indices = sorted(hist.buckets)
    values = [2 * gamma**i / (gamma + 1) for i in indices]
    counts = [hist.buckets[i] for i in indices]
    if hist.zero_count:
        values.insert(0, 0.0)
        counts.insert(0, hist.zero_count)
    return np.asarray(values, dtype=np.float64), np.asarray(counts, dtype=np.float64)


@dataclass(frozen=True)
class MannWhitney:
    """A Mann-Whitney U statistic of x against y with its null mean and (tie-corrected) variance.

    `u` counts pairs with x > y (ties count one half). Results of independent strata add.
    """

    u: float
    n_x: int
    n_y: int
    mean: float
    variance: float

    @property
    def z(self) -> float:
        """Standardised U with a continuity correction towards the null (one-sided, x > y)."""
        if self.variance <= 0:
            return math.nan
        return (self.u - self.mean - 0.5) / math.sqrt(self.variance)

    @property
    def p_greater(self) -> float:
        """One-sided p-value of "x is stochastically greater than y"; NaN without data."""
        z = self.z
        return math.nan if math.isnan(z) else normal_sf(z)

    @property
    def common_language(self) -> float:
        """P(x > y) + P(x = y) / 2: 0.5 when neither side is larger."""
        pairs = self.n_x * self.n_y
        return self.u / pairs if pairs else math.nan

    def __add__(self, other: MannWhitney) -> MannWhitney:
        return MannWhitney(self.u + other.u, self.n_x + other.n_x, self.n_y + other.n_y,
                           self.mean + other.mean, self.variance + other.variance)

    @staticmethod
    def empty() -> MannWhitney:
        return MannWhitney(0.0, 0, 0, 0.0, 0.0)

    @staticmethod
    def combine(parts: Iterable[MannWhitney]) -> MannWhitney:
        total = MannWhitney.empty()
        for part in parts:
            total = total + part
        return total


def mann_whitney(x_values: np.ndarray, x_counts: np.ndarray, y_values: np.ndarray,
                 y_counts: np.ndarray) -> MannWhitney:
    """U of weighted samples x against y (values may repeat; equal values tie)."""
    n_x, n_y = float(x_counts.sum()), float(y_counts.sum())
    if n_x == 0 or n_y == 0:
        return MannWhitney(0.0, int(n_x), int(n_y), 0.0, 0.0)
    values = np.concatenate([x_values, y_values])
    distinct, inverse = np.unique(values, return_inverse=True)
    wx = np.bincount(inverse[: len(x_values)], weights=x_counts, minlength=len(distinct))
    wy = np.bincount(inverse[len(x_values):], weights=y_counts, minlength=len(distinct))
    y_below = np.concatenate([[0.0], np.cumsum(wy)[:-1]])
    u = float(np.dot(wx, y_below + 0.5 * wy))
    total = n_x + n_y
    ties = wx + wy
    tie_term = float(np.sum(ties**3 - ties)) / (total * (total - 1)) if total > 1 else 0.0
    variance = n_x * n_y / 12.0 * ((total + 1) - tie_term)
    return MannWhitney(u, int(n_x), int(n_y), n_x * n_y / 2.0, max(variance, 0.0))


def mann_whitney_histograms(candidate: LatencyHistogram, serving: LatencyHistogram, *,
                            tolerance: float = 0.0, slack: float = 0.0) -> MannWhitney:
    """U of the candidate's latencies, moved by the tolerance, against the serving model's.

    A candidate value v counts as `(v - slack) / (1 + tolerance)`: the test then rejects only when
    the candidate is slower than `serving * (1 + tolerance) + slack`.
    """
    x_values, x_counts = bucket_values(candidate)
    y_values, y_counts = bucket_values(serving)
    if tolerance or slack:
        x_values = (x_values - slack) / (1.0 + tolerance)
    return mann_whitney(x_values, x_counts, y_values, y_counts)


def hodges_lehmann(candidate: LatencyHistogram, serving: LatencyHistogram) -> float:
    """The Hodges-Lehmann shift (candidate - serving, in the histograms' unit); NaN if one is empty.

    The median of all pairwise differences, each bucket pair weighted by the product of counts;
    with an even number of pairs, the mean of the two middle ones (as `numpy.median` would).
    """
    x_values, x_counts = bucket_values(candidate)
    y_values, y_counts = bucket_values(serving)
    if not len(x_values) or not len(y_values):
        return math.nan
    diffs = np.subtract.outer(x_values, y_values).ravel()
    weights = np.outer(x_counts, y_counts).ravel()
    order = np.argsort(diffs, kind="stable")
    diffs, cum = diffs[order], np.cumsum(weights[order])
    total = cum[-1]
    # 0-based ranks of the middle element(s) among `total` expanded differences.
    low_rank, high_rank = (total - 1) // 2, total // 2
    low = diffs[np.searchsorted(cum, low_rank + 1)]
    high = diffs[np.searchsorted(cum, high_rank + 1)]
    return float((low + high) / 2.0)


def wilson_interval(successes: float, trials: float, confidence: float) -> tuple[float, float]:
    """Two-sided Wilson score interval for a proportion at `confidence` (NaNs without trials).

    For a one-sided bound at level c, ask for the two-sided interval at 2c - 1.
    """
    if trials <= 0:
        return math.nan, math.nan
    if not 0 < confidence < 1:
        raise ValueError("confidence must be within (0, 1)")
    z = normal_quantile(0.5 + confidence / 2.0)
    p = min(max(successes / trials, 0.0), 1.0)
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_p_below(successes: float, trials: float, threshold: float) -> float:
    """One-sided score-test p-value of "the true proportion is below `threshold`".

    The test the Wilson interval inverts: the upper one-sided Wilson bound at level 1 - alpha is
    below the threshold exactly when this p-value is below alpha.
    """
    if trials <= 0:
        return math.nan
    p = successes / trials
    if threshold >= 1.0:
        # Nothing exceeds 1: any disagreement at all is evidence against a threshold of 1.
        return 0.0 if p < 1.0 else 1.0
    if threshold <= 0.0:
        return 1.0
    z = (p - threshold) / math.sqrt(threshold * (1 - threshold) / trials)
    return 1.0 - normal_sf(z)
