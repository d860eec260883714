"""Mergeable latency histograms with a fixed relative accuracy (the DDSketch bucket scheme).

A positive value v falls in bucket i = ceil(log_gamma(v)) with gamma = (1 + a) / (1 - a), and a
quantile is answered with the bucket's midpoint 2 * gamma^i / (gamma + 1), which is within a
relative error `a` of every value in the bucket. Two histograms with the same accuracy merge by
adding counts, so devices send small deltas and the controller answers cohort quantiles without
raw samples. Memory is bounded by the bucket range: with a = 1% the span from 1 microsecond to
1 hour needs at most ~1,100 buckets, whatever the number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_ACCURACY = 0.01
# Values below this (in the recorded unit) count as zero: they have no meaningful log bucket.
MIN_VALUE = 1e-6
# Bound the bucket index range so a corrupt or hostile input cannot grow the map without limit.
MAX_INDEX = 5000


class LatencyHistogram:
    __slots__ = ("_gamma", "_log_gamma", "buckets", "count", "max", "min", "relative_accuracy", "sum",
                 "zero_count")

    def __init__(self, relative_accuracy: float = DEFAULT_ACCURACY) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be in (0, 1)")
        self.relative_accuracy = relative_accuracy
        self._gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._log_gamma = math.log(self._gamma)
        self.buckets: dict[int, int] = {}
        self.zero_count = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, value: float, times: int = 1) -> None:
        if times <= 0 or math.isnan(value):
            return
        value = max(value, 0.0)
        if value < MIN_VALUE:
            self.zero_count += times
        else:
            index = math.ceil(math.log(value) / self._log_gamma)
            index = max(-MAX_INDEX, min(MAX_INDEX, index))
            self.buckets[index] = self.buckets.get(index, 0) + times
        self.count += times
        self.sum += value * times
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def record_many(self, values: Iterable[float]) -> None:
        for value in values:
            self.record(value)

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """Add `other` into this histogram in place (and return self for chaining)."""
        if not math.isclose(other.relative_accuracy, self.relative_accuracy):
            raise ValueError("cannot merge histograms of different accuracy")
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1), or NaN when empty."""
        if self.count == 0:
            return math.nan
        if not 0 <= q <= 1:
            raise ValueError("q must be within [0, 1]")
        rank = q * (self.count - 1)
        seen = self.zero_count
        if rank < seen:
            return 0.0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if rank < seen:
                estimate = 2 * self._gamma**index / (self._gamma + 1)
                return min(max(estimate, self.min), self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(self.relative_accuracy).merge(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "relative_accuracy": self.relative_accuracy,
            "buckets": {str(k): v for k, v in sorted(self.buckets.items())},
            "zero_count": self.zero_count,
            "count": self.count,
            "sum": self.sum,
            "min": self.min if self.count else 0.0,
            "max": self.max if self.count else 0.0,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LatencyHistogram:
        hist = cls(float(raw.get("relative_accuracy", DEFAULT_ACCURACY)))
        for key, raw_n in dict(raw.get("buckets", {})).items():
            index, n = int(key), int(raw_n)
            if n < 0 or abs(index) > MAX_INDEX:
                raise ValueError("histogram bucket out of range")
            if n:
                hist.buckets[index] = hist.buckets.get(index, 0) + n
        hist.zero_count = int(raw.get("zero_count", 0))
        hist.count = int(raw.get("count", 0))
        if hist.count != hist.zero_count + sum(hist.buckets.values()):
            raise ValueError("histogram count does not match its buckets")
        hist.sum = float(raw.get("sum", 0.0))
        if hist.count:
            hist.min = float(raw.get("min", 0.0))
            hist.max = float(raw.get("max", 0.0))
        return hist

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"LatencyHistogram(count={self.count}, p50={self.quantile(0.5):.4g}, "
                f"p95={self.quantile(0.95):.4g}, p99={self.quantile(0.99):.4g})")
