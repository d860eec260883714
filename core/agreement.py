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


class _Sums:
    __slots__ = ("cosine_min", "cosine_sum", "max_abs_diff", "mean_abs_diff_sum", "samples",
                 "top1_agree", "top1_samples")

    def __init__(self) -> None:
        self.samples = 0
        self.cosine_sum = 0.0
        self.cosine_min = 1.0
        self.mean_abs_diff_sum = 0.0
        self.max_abs_diff = 0.0
        self.top1_agree = 0
        self.top1_samples = 0


class AgreementAccumulator:
    """Running agreement sums per output over one telemetry window. Not thread-safe by itself."""

    def __init__(self) -> None:
        self._sums: dict[str, _Sums] = {}

    def add(self, comparisons: Mapping[str, OutputComparison] | Iterable[OutputComparison]) -> None:
        items = comparisons.values() if isinstance(comparisons, Mapping) else comparisons
        for c in items:
            s = self._sums.setdefault(c.output, _Sums())
            s.samples += 1
            s.cosine_sum += c.cosine
            s.cosine_min = min(s.cosine_min, c.cosine)
            s.mean_abs_diff_sum += c.mean_abs_diff
            s.max_abs_diff = max(s.max_abs_diff, c.max_abs_diff)
            s.top1_agree += c.top1_agree
            s.top1_samples += c.top1_samples

    @property
    def samples(self) -> int:
        """Requests compared so far (the most any one output saw)."""
        return max((s.samples for s in self._sums.values()), default=0)

    def to_list(self) -> list[dict[str, Any]]:
        """The sums as `OutputAgreement` dicts, sorted by output name."""
        return [
            {
                "output": name,
                "samples": s.samples,
                "cosine_sum": s.cosine_sum,
                "cosine_min": s.cosine_min,
                "mean_abs_diff_sum": s.mean_abs_diff_sum,
                "max_abs_diff": s.max_abs_diff,
                "top1_agree": s.top1_agree,
                "top1_samples": s.top1_samples,
            }
            for name, s in sorted(self._sums.items())
            if s.samples
        ]

    def reset(self) -> None:
        self._sums = {}

    @staticmethod
    def merge_dicts(
        a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Merge two lists of `OutputAgreement` dicts output by output (sums add, extremes combine)."""
        merged: dict[str, dict[str, Any]] = {}
        for entry in [*a, *b]:
            name = str(entry["output"])
            samples = int(entry.get("samples", 0))
            if samples <= 0:
                continue  # an empty entry carries no cosine_min worth keeping
            cur = merged.get(name)
            if cur is None:
                merged[name] = {
                    "output": name,
                    "samples": samples,
                    "cosine_sum": float(entry.get("cosine_sum", 0.0)),
                    "cosine_min": float(entry.get("cosine_min", 1.0)),
                    "mean_abs_diff_sum": float(entry.get("mean_abs_diff_sum", 0.0)),
                    "max_abs_diff": float(entry.get("max_abs_diff", 0.0)),
                    "top1_agree": int(entry.get("top1_agree", 0)),
                    "top1_samples": int(entry.get("top1_samples", 0)),
                }
                continue
            cur["samples"] += samples
            cur["cosine_sum"] += float(entry.get("cosine_sum", 0.0))
            cur["cosine_min"] = min(cur["cosine_min"], float(entry.get("cosine_min", 1.0)))
            cur["mean_abs_diff_sum"] += float(entry.get("mean_abs_diff_sum", 0.0))
            cur["max_abs_diff"] = max(cur["max_abs_diff"], float(entry.get("max_abs_diff", 0.0)))
            cur["top1_agree"] += int(entry.get("top1_agree", 0))
            cur["top1_samples"] += int(entry.get("top1_samples", 0))
        return [merged[name] for name in sorted(merged)]
