"""Drift scores of live data against a reference profile, and fixed-memory monitors that feed them.

The rules this module enforces:

- **Scores come from binned counts only.** A feature's live data is kept as counts on the bins of
  its profile (numeric: the profile's quantile edges; categorical: the profile's categories plus
  a final "other"), never as raw values, so memory per feature is fixed whatever the traffic,
  and windows from many devices merge by adding counts before the scores are recomputed.
- **Empty bins are smoothed with `EPSILON`.** PSI and Jensen-Shannon take logarithms of
  proportions; an empty bin would make them infinite. Both distributions get `EPSILON` (1e-4)
  added to every bin and are renormalised, which bounds a bin's PSI term at about
  |q - p| * ln(1e4) (~9.2 per unit of mass moved into an empty bin), yet changes a populated
  bin's proportion by under 0.01 %. The KS distance uses the unsmoothed proportions.
- **No data scores zero.** A feature with no live samples reports PSI = KS = JS = 0 and
  `samples = 0`; the controller ignores features under its minimum sample size.

The scores, each a function of the reference proportions and the live counts:

- `psi`: population stability index, sum((q - p) * ln(q / p)) over bins (natural log). The usual
  reading: < 0.1 stable, 0.1-0.2 moderate shift, >= 0.2 drift.
- `ks_binned`: the Kolmogorov-Smirnov distance on the bins, max |CDF_ref - CDF_live| taken at the
  bin edges, in [0, 1]. It equals the exact two-sample KS statistic of the raw data whenever the
  largest CDF gap falls on a bin edge, and is never larger than it. Numeric features only:
  categorical features report 0 (their categories have no order).
- `js`: the Jensen-Shannon *distance* with base-2 logarithms (the square root of the JS
  divergence, as `scipy.spatial.distance.jensenshannon(p, q, base=2)`), in [0, 1].

Memory: a `FeatureMonitor` holds its bin counts (int64) and reference proportions (float64) and,
for numeric features, the edges (float64): 24 bytes per bin, so a 16-bin feature keeps 376 bytes
of arrays (~1 KB with Python object overhead) and a categorical feature at the category cap
(`fleet.core.profile.MAX_CATEGORIES` + 1 bins) about 1.6 KB of arrays. Pure numpy; no IO.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fleet.core.errors import InvalidInputError

EPSILON = 1e-4
NUMERIC = "numeric"
CATEGORICAL = "categorical"


def _as_props(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    total = float(arr.sum())
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidInputError("a distribution needs a non-empty list of bin proportions or counts")
    if total <= 0:
        return np.full(arr.size, 1.0 / arr.size)
    return arr / total


def _check_pair(ref_props: Sequence[float] | np.ndarray, live_counts: Sequence[float] | np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, float]:
    ref = _as_props(ref_props)
    live = np.asarray(live_counts, dtype=np.float64)
    if live.shape != ref.shape:
        raise InvalidInputError(
            f"live counts have {live.size} bins but the reference has {ref.size}: both must use the profile's bins"
        )
    return ref, live, float(live.sum())


def smooth(props: np.ndarray, epsilon: float = EPSILON) -> np.ndarray:
    """Add `epsilon` to every bin and renormalise (see the module docstring for why)."""
    out = props + epsilon
    return np.asarray(out / out.sum(), dtype=np.float64)


def psi(ref_props: Sequence[float] | np.ndarray, live_counts: Sequence[float] | np.ndarray) -> float:
    """Population stability index of the live counts against the reference proportions."""
    ref, live, total = _check_pair(ref_props, live_counts)
    if total <= 0:
        return 0.0
    p, q = smooth(ref), smooth(live / total)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_binned(ref_props: Sequence[float] | np.ndarray, live_counts: Sequence[float] | np.ndarray) -> float:
    """Max absolute difference of the two CDFs at the bin edges, in [0, 1]."""
    ref, live, total = _check_pair(ref_props, live_counts)
    if total <= 0:
        return 0.0
    gap = np.abs(np.cumsum(ref) - np.cumsum(live / total))
    return float(min(1.0, gap.max()))


def js(ref_props: Sequence[float] | np.ndarray, live_counts: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon distance (base 2) between the reference and the live distribution, in [0, 1]."""
    ref, live, total = _check_pair(ref_props, live_counts)
    if total <= 0:
        return 0.0
    p, q = smooth(ref), smooth(live / total)
    m = 0.5 * (p + q)
    divergence = 0.5 * float(np.sum(p * np.log2(p / m))) + 0.5 * float(np.sum(q * np.log2(q / m)))
    return float(np.sqrt(min(1.0, max(0.0, divergence))))


def scores(ref_props: Sequence[float] | np.ndarray, live_counts: Sequence[float] | np.ndarray,
           feature_type: str = NUMERIC) -> dict[str, float]:
    """PSI, KS (numeric only; 0 for categorical) and JS of one feature."""
    return {
        "psi": psi(ref_props, live_counts),
        "ks": ks_binned(ref_props, live_counts) if feature_type == NUMERIC else 0.0,
        "js": js(ref_props, live_counts),
    }


# --------------------------------------------------------------------------------------------
# Binning
# --------------------------------------------------------------------------------------------


def bin_numeric(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts per bin for `len(edges) + 1` bins: bin 0 is (-inf, e0), bin i is [e(i-1), e(i)),
    the last is [e(-1), +inf). Non-finite values are not counted: they say nothing about where
    the distribution sits, and a NaN would land in the last bin and fake a shift."""
    vals = np.asarray(values, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    index = np.searchsorted(edges, vals, side="right")
    return np.bincount(index, minlength=edges.size + 1).astype(np.int64)


def bin_categorical(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts per category for the sorted integer `codes`, plus a last bin for every other value."""
    vals = np.asarray(values).ravel()
    if vals.size == 0:
        return np.zeros(codes.size + 1, dtype=np.int64)
    vals = vals.astype(np.int64, copy=False)
    pos = np.searchsorted(codes, vals)
    pos_clipped = np.minimum(pos, max(codes.size - 1, 0))
    known = (pos < codes.size) & (codes[pos_clipped] == vals) if codes.size else np.zeros(vals.size, bool)
    index = np.where(known, pos, codes.size)
    return np.bincount(index, minlength=codes.size + 1).astype(np.int64)


class FeatureMonitor:
    """Live counts of one profile feature on the profile's bins; fixed memory, reset per window."""

    __slots__ = ("codes", "counts", "edges", "feature", "kind", "reference", "type")

    def __init__(self, feature: Mapping[str, Any]) -> None:
        self.feature = str(feature["name"])
        self.kind = str(feature.get("kind", ""))
        self.type = str(feature.get("type", NUMERIC))
        self.reference = _as_props(feature["proportions"])
        if self.type == NUMERIC:
            self.edges = np.asarray(feature.get("edges", []), dtype=np.float64)
            self.codes = np.zeros(0, dtype=np.int64)
            nbins = self.edges.size + 1
        elif self.type == CATEGORICAL:
            self.edges = np.zeros(0, dtype=np.float64)
            # Categories are class ids written as strings; the last one is the "other" bin.
            self.codes = np.asarray([int(c) for c in feature.get("categories", [])[:-1]], dtype=np.int64)
            nbins = self.codes.size + 1
        else:
            raise InvalidInputError(f"feature {self.feature!r}: type must be numeric or categorical, got {self.type!r}")
        if nbins != self.reference.size:
            raise InvalidInputError(
                f"feature {self.feature!r}: {self.reference.size} proportions for {nbins} bins"
            )
        self.counts = np.zeros(nbins, dtype=np.int64)

    def add(self, values: np.ndarray | Iterable[float]) -> None:
        arr = np.asarray(values if isinstance(values, np.ndarray) else list(values))
        if self.type == NUMERIC:
            self.counts += bin_numeric(self.edges, arr)
        else:
            self.counts += bin_categorical(self.codes, arr)

    @property
    def samples(self) -> int:
        return int(self.counts.sum())

    def memory_bytes(self) -> int:
        """Bytes held in arrays: constant for the monitor's life."""
        return int(self.counts.nbytes + self.reference.nbytes + self.edges.nbytes + self.codes.nbytes)

    def emit(self, reset: bool = True) -> dict[str, Any]:
        """This window's `FeatureDrift` dict (counts, reference, samples, psi, ks, js)."""
        out: dict[str, Any] = {
            "feature": self.feature,
            "kind": self.kind,
            "type": self.type,
            "counts": [int(c) for c in self.counts],
            "reference": [float(r) for r in self.reference],
            "samples": self.samples,
            **scores(self.reference, self.counts, self.type),
        }
        if reset:
            self.counts[:] = 0
        return out


def merge_drift(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Add the counts of `FeatureDrift` dicts of the same feature and bins and rescore them.

    The caller groups entries by feature and reference (entries on other bins cannot be added);
    returns None for no entries.
    """
    merged: dict[str, Any] | None = None
    counts: np.ndarray | None = None
    for entry in entries:
        live = np.asarray(entry.get("counts", []), dtype=np.int64)
        if merged is None:
            merged = {k: entry.get(k, "") for k in ("feature", "kind", "type")}
            merged["reference"] = [float(r) for r in entry.get("reference", [])]
            counts = live.copy()
            continue
        assert counts is not None
        if live.shape != counts.shape:
            raise InvalidInputError(f"feature {merged['feature']!r}: cannot add counts on different bins")
        counts += live
    if merged is None or counts is None:
        return None
    merged["counts"] = [int(c) for c in counts]
    merged["samples"] = int(counts.sum())
    merged.update(scores(merged["reference"], counts, str(merged["type"])) if counts.size else
                  {"psi": 0.0, "ks": 0.0, "js": 0.0})
    return merged


__all__ = [
    "CATEGORICAL",
    "EPSILON",
    "NUMERIC",
    "FeatureMonitor",
    "bin_categorical",
    "bin_numeric",
    "js",
    "ks_binned",
    "merge_drift",
    "psi",
    "scores",
    "smooth",
]
