"""Agreement between a shadow model and the serving model on the same input.

The rule this module enforces: a comparison never raises, whatever the two models return. A
shadow that answers with the wrong shape, NaNs or nothing at all is *evidence* against the
candidate, so it is recorded as the worst possible agreement (cosine 0, a huge but finite
difference, every top-1 row in disagreement) instead of crashing the shadow worker or
poisoning sums with inf/NaN that JSON and protobuf carry badly.

Per output and per request: the cosine similarity of the two outputs flattened to float64
vectors (two all-zero vectors are identical: cosine 1; exactly one all-zero vector: cosine 0),
the mean and max absolute difference, and, for classification models, top-1 agreement counted
per batch row (argmax over the last axis). `AgreementAccumulator` keeps running sums in the
`OutputAgreement` dict shape of docs/ARCHITECTURE.md; sums (not means) are kept so that windows
from many devices merge by addition on the controller (`merge_dicts`).

Pure numpy; no IO.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Stands in for an infinite difference: finite so that sums, JSON and protobuf doubles stay sane,
# and far above any real difference so a mismatch can never pass a diff threshold.
MISMATCH_DIFF = 1e30


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the shadow compares with the serving model's on one request."""

    output: str
    cosine: float
    mean_abs_diff: float
    max_abs_diff: float
    top1_agree: int = 0
    top1_samples: int = 0
    shape_match: bool = True


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two equally sized arrays, flattened, in float64, clipped to [-1, 1]."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    if not (math.isfinite(nx) and math.isfinite(ny)):
        # inf/NaN outputs: identical only if they are the very same values.
        return 1.0 if np.array_equal(x, y, equal_nan=True) else 0.0
    return float(np.clip(np.dot(x / nx, y / ny), -1.0, 1.0))


def _top1_rows(arr: np.ndarray) -> int:
    """Rows a top-1 comparison counts: every index of all but the last axis (1 for a vector)."""
    if arr.ndim == 0:
        return 0
    return int(np.prod(arr.shape[:-1], dtype=np.int64)) if arr.ndim > 1 else 1


def _top1_applies(arr: np.ndarray) -> bool:
    # A last axis of size 1 has a trivial argmax; booleans and empty tensors carry no ranking.
    return arr.ndim >= 1 and arr.shape[-1] >= 2 and arr.size > 0 and arr.dtype != np.bool_


def compare_output(
    name: str, task: str, serving: np.ndarray | None, shadow: np.ndarray | None
) -> OutputComparison:
    """Compare one output. `shadow` may be None (the shadow did not produce this output)."""
    classification = task == "classification"
    if serving is None or shadow is None or np.shape(serving) != np.shape(shadow):
        rows = 0
        if classification and serving is not None and _top1_applies(np.asarray(serving)):
            rows = max(1, _top1_rows(np.asarray(serving)))
        return OutputComparison(name, 0.0, MISMATCH_DIFF, MISMATCH_DIFF, 0, rows, shape_match=False)

    x = np.asarray(serving, dtype=np.float64)
    y = np.asarray(shadow, dtype=np.float64)
    if x.size == 0:
        return OutputComparison(name, 1.0, 0.0, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(x - y)
    # Positions where both are the same NaN/inf are equal; any other non-finite diff is a mismatch.
    same = (x == y) | (np.isnan(x) & np.isnan(y))
    diff = np.where(same, 0.0, np.nan_to_num(diff, nan=MISMATCH_DIFF, posinf=MISMATCH_DIFF))
    diff = np.minimum(diff, MISMATCH_DIFF)
    mean_diff, max_diff = float(diff.mean()), float(diff.max())

    agree = samples = 0
    if classification and _top1_applies(x):
        last = x.shape[-1]
        top_x = np.argmax(np.nan_to_num(x.reshape(-1, last), nan=-np.inf), axis=-1)
        top_y = np.argmax(np.nan_to_num(y.reshape(-1, last), nan=-np.inf), axis=-1)
        agree, samples = int(np.count_nonzero(top_x == top_y)), int(top_x.size)
    return OutputComparison(name, cosine_similarity(x, y), mean_diff, max_diff, agree, samples)


def compare(
    task: str, serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]
) -> dict[str, OutputComparison]:
    """Compare every output the serving model produced with the shadow's output of that name.

    Outputs only the shadow has are ignored: the serving model's contract is the reference.
    """
    return {name: compare_output(name, task, arr, shadow.get(name)) for name, arr in serving.items()}


@dataclass
class AgreementSums:
    """Running sums of the shadow/serving comparison of one output; merges by addition.

    The same sums travel as `OutputAgreement` dicts in telemetry; devices, the controller's
    merge and the gate all go through this one type.
    """

    samples: int = 0
    cosine_sum: float = 0.0
    cosine_min: float = math.inf
    mean_abs_diff_sum: float = 0.0
    max_abs_diff: float = 0.0
    top1_agree: int = 0
    top1_samples: int = 0

    def add_comparison(self, c: OutputComparison) -> None:
        self.samples += 1
        self.cosine_sum += c.cosine
        self.cosine_min = min(self.cosine_min, c.cosine)
        self.mean_abs_diff_sum += c.mean_abs_diff
        self.max_abs_diff = max(self.max_abs_diff, c.max_abs_diff)
        self.top1_agree += c.top1_agree
        self.top1_samples += c.top1_samples

    def add(self, raw: Mapping[str, Any]) -> None:
        """Add an `OutputAgreement` dict (an entry with no samples carries nothing)."""
        samples = int(raw.get("samples", 0) or 0)
        if samples <= 0:
            return
        self.samples += samples
        self.cosine_sum += float(raw.get("cosine_sum", 0.0) or 0.0)
        self.cosine_min = min(self.cosine_min, float(raw.get("cosine_min", 1.0)))
        self.mean_abs_diff_sum += float(raw.get("mean_abs_diff_sum", 0.0) or 0.0)
        self.max_abs_diff = max(self.max_abs_diff, float(raw.get("max_abs_diff", 0.0) or 0.0))
        self.top1_agree += int(raw.get("top1_agree", 0) or 0)
        self.top1_samples += int(raw.get("top1_samples", 0) or 0)

    def merge(self, other: AgreementSums) -> None:
        self.samples += other.samples
        self.cosine_sum += other.cosine_sum
        self.cosine_min = min(self.cosine_min, other.cosine_min)
        self.mean_abs_diff_sum += other.mean_abs_diff_sum
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.top1_agree += other.top1_agree
        self.top1_samples += other.top1_samples

    def to_dict(self, output: str) -> dict[str, Any]:
        return {
            "output": output,
            "samples": self.samples,
            "cosine_sum": self.cosine_sum,
            "cosine_min": self.cosine_min if self.samples else 1.0,
            "mean_abs_diff_sum": self.mean_abs_diff_sum,
            "max_abs_diff": self.max_abs_diff,
            "top1_agree": self.top1_agree,
            "top1_samples": self.top1_samples,
        }

    def score(self, task: str) -> tuple[float, int, str]:
        """(agreement, samples it rests on, what it is) for this task."""
        if task == "classification" and self.top1_samples:
            return self.top1_agree / self.top1_samples, self.top1_samples, "top-1 agreement"
        if self.samples:
            return self.cosine_sum / self.samples, self.samples, "mean cosine similarity"
        return math.nan, 0, "no comparisons"


class AgreementAccumulator:
    """Running agreement sums per output over one telemetry window. Not thread-safe by itself."""

    def __init__(self) -> None:
        self._sums: dict[str, AgreementSums] = {}

    def add(self, comparisons: Mapping[str, OutputComparison] | Iterable[OutputComparison]) -> None:
        items = comparisons.values() if isinstance(comparisons, Mapping) else comparisons
        for c in items:
            self._sums.setdefault(c.output, AgreementSums()).add_comparison(c)

    @property
    def samples(self) -> int:
        """Requests compared so far (the most any one output saw)."""
        return max((s.samples for s in self._sums.values()), default=0)

    def to_list(self) -> list[dict[str, Any]]:
        """The sums as `OutputAgreement` dicts, sorted by output name."""
        return [s.to_dict(name) for name, s in sorted(self._sums.items()) if s.samples]

    def reset(self) -> None:
        self._sums = {}

    @staticmethod
    def merge_dicts(
        a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Merge two lists of `OutputAgreement` dicts output by output (sums add, extremes combine)."""
        merged: dict[str, AgreementSums] = {}
        for entry in [*a, *b]:
            merged.setdefault(str(entry["output"]), AgreementSums()).add(entry)
        return [s.to_dict(name) for name, s in sorted(merged.items()) if s.samples]
