"""Reference profiles: what a model's inputs and outputs looked like, compactly, for drift.

The rules this module enforces:

- **One feature plan per manifest.** `plan_features(manifest)` decides, from the signature, the
  task and `outputs_layout` alone, which scalar features of a request are monitored, so the
  operator's machine (building a reference profile) and the device (monitoring, or learning a
  profile) always extract the same features the same way:
  - inputs: image-like tensors (rank 4, `[N, C, H, W]`, or `[N, H, W, C]` when only the last dim
    looks like channels) give one feature per channel, the channel's mean per image
    (`input:<tensor>:c<k>`); `[N, F]` tensors give one feature per column (`input:<tensor>:f<k>`,
    at most `MAX_INPUT_FEATURES` per tensor); anything else gives the mean per row
    (`input:<tensor>:mean`);
  - outputs by task: classification gives the max score per row (`output:<scores>:max_score`)
    and the top-1 class (`output:<scores>:class`, categorical); detection gives the number of
    boxes at or above the layout's `score_threshold` per image (`output:<boxes>:count`), their
    scores (`output:<scores>:score`) and, with a `classes` output, their classes
    (`output:<classes>:class`); segmentation and generic models give each output's mean per row
    (`output:<tensor>:mean`).
  At most `MAX_FEATURES` features per model (outputs always kept, inputs fill the rest).
- **A profile is self-describing and bounded.** Each feature records how to extract it
  (`tensor`, `stat`, `index`, `axis`, `threshold`), its bins (numeric: `edges` at the reference
  quantiles, at most `DEFAULT_BINS` bins with open-ended first and last bins; categorical:
  `categories`, class ids as strings, with a final `"other"`), the reference `proportions` per
  bin, and for numeric features `mean`, `std`, `min`, `max`. A profile never holds raw samples.
- **Extraction never raises on a live request.** A tensor missing from a request or of an
  unexpected rank yields no values for that feature; drift monitoring must not fail serving.

Profile format (`Manifest.profile`): `{"source": "reference" | "learned", "samples": N,
"features": [feature, ...]}`. Pure numpy; no IO.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet.core.drift import CATEGORICAL, NUMERIC, FeatureMonitor, bin_categorical, bin_numeric
from fleet.core.errors import InvalidInputError
from fleet.core.manifest import Manifest, TensorSpec

DEFAULT_BINS = 16
MAX_BINS = 64
MAX_INPUT_FEATURES = 32
MAX_FEATURES = 64
# Categorical features beyond this many classes keep the most frequent ones; the rest are "other".
MAX_CATEGORIES = 64
OTHER = "other"
# Channels-last is assumed only when dim 1 cannot be a channel axis and the last dim can.
_MAX_CHANNELS = 16
DEFAULT_SCORE_THRESHOLD = 0.5
SOURCES = ("reference", "learned")

# stats: how a feature's values come out of one tensor (per batch row unless said otherwise)
CHANNEL_MEAN = "channel_mean"
COLUMN = "column"
MEAN = "mean"
MAX_SCORE = "max_score"
TOP1_CLASS = "top1_class"
BOX_COUNT = "box_count"
BOX_SCORE = "box_score"
BOX_CLASS = "box_class"
_STATS = (CHANNEL_MEAN, COLUMN, MEAN, MAX_SCORE, TOP1_CLASS, BOX_COUNT, BOX_SCORE, BOX_CLASS)


@dataclass(frozen=True)
class FeatureSpec:
    """How to get one monitored feature's values out of a request's inputs or outputs."""

    name: str
    kind: str  # "input" | "output"
    type: str  # "numeric" | "categorical"
    tensor: str
    stat: str
    index: int = 0  # channel or column for CHANNEL_MEAN / COLUMN
    axis: int = 1  # channel axis for CHANNEL_MEAN
    threshold: float = DEFAULT_SCORE_THRESHOLD  # detection: kept boxes have score >= threshold
    scores: str = ""  # detection: the scores output that selects the kept boxes
    num_classes: int = 0  # categorical: known number of classes (0 = learn from the data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "type": self.type, "tensor": self.tensor,
                               "stat": self.stat}
        if self.stat in (CHANNEL_MEAN, COLUMN):
            out["index"] = self.index
        if self.stat == CHANNEL_MEAN:
            out["axis"] = self.axis
        if self.stat in (BOX_COUNT, BOX_SCORE, BOX_CLASS):
            out["threshold"] = self.threshold
            out["scores"] = self.scores
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FeatureSpec:
        stat = str(raw.get("stat", ""))
        if stat not in _STATS:
            raise InvalidInputError(f"profile feature {raw.get('name')!r}: unknown stat {stat!r}")
        try:
            index, axis = int(raw.get("index", 0)), int(raw.get("axis", 1))
            threshold = float(raw.get("threshold", DEFAULT_SCORE_THRESHOLD))
        except (TypeError, ValueError, OverflowError) as exc:
            # A profile arrives inside a manifest: a bad field is the author's mistake, not a crash.
            raise InvalidInputError(
                f"profile feature {raw.get('name')!r}: 'index' and 'axis' must be integers and 'threshold' a number"
            ) from exc
        return cls(
            name=str(raw["name"]), kind=str(raw.get("kind", "")), type=str(raw.get("type", NUMERIC)),
            tensor=str(raw.get("tensor", "")), stat=stat, index=index, axis=axis, threshold=threshold,
            scores=str(raw.get("scores", "")),
        )


# --------------------------------------------------------------------------------------------
# The feature plan
# --------------------------------------------------------------------------------------------


def _channel_axis(spec: TensorSpec) -> int | None:
    if len(spec.shape) != 4:
        return None
    c1, c_last = spec.shape[1], spec.shape[-1]
    if 0 < c1 <= _MAX_CHANNELS:
        return 1
    if 0 < c_last <= _MAX_CHANNELS:
        return 3
    return None


def _input_features(spec: TensorSpec) -> list[FeatureSpec]:
    axis = _channel_axis(spec)
    if axis is not None:
        return [FeatureSpec(f"input:{spec.name}:c{k}", "input", NUMERIC, spec.name, CHANNEL_MEAN, index=k, axis=axis)
                for k in range(spec.shape[axis])]
    if len(spec.shape) == 2 and spec.shape[1] > 0:
        return [FeatureSpec(f"input:{spec.name}:f{k}", "input", NUMERIC, spec.name, COLUMN, index=k)
                for k in range(min(spec.shape[1], MAX_INPUT_FEATURES))]
    return [FeatureSpec(f"input:{spec.name}:mean", "input", NUMERIC, spec.name, MEAN)]


def _mean_features(specs: Iterable[TensorSpec]) -> list[FeatureSpec]:
    return [FeatureSpec(f"output:{s.name}:mean", "output", NUMERIC, s.name, MEAN) for s in specs]


def _output_features(manifest: Manifest) -> list[FeatureSpec]:
    outputs = {s.name: s for s in manifest.outputs}
    layout = manifest.outputs_layout or {}
    task = manifest.task
    if task == "classification":
        name = layout.get("scores") if layout.get("scores") in outputs else manifest.outputs[0].name
        spec = outputs[str(name)]
        if len(spec.shape) < 1:
            return _mean_features(manifest.outputs)
        classes = spec.shape[-1] if spec.shape[-1] > 0 else len(manifest.class_names)
        return [
            FeatureSpec(f"output:{name}:max_score", "output", NUMERIC, str(name), MAX_SCORE),
            FeatureSpec(f"output:{name}:class", "output", CATEGORICAL, str(name), TOP1_CLASS, num_classes=classes),
        ]
    if task == "detection" and layout.get("boxes") in outputs and layout.get("scores") in outputs:
        boxes, scores = str(layout["boxes"]), str(layout["scores"])
        threshold = float(layout.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
        out = [
            FeatureSpec(f"output:{boxes}:count", "output", NUMERIC, boxes, BOX_COUNT, threshold=threshold,
                        scores=scores),
            FeatureSpec(f"output:{scores}:score", "output", NUMERIC, scores, BOX_SCORE, threshold=threshold,
                        scores=scores),
        ]
        classes = layout.get("classes")
        if classes in outputs:
            out.append(FeatureSpec(f"output:{classes}:class", "output", CATEGORICAL, str(classes), BOX_CLASS,
                                   threshold=threshold, scores=scores, num_classes=len(manifest.class_names)))
        return out
    return _mean_features(manifest.outputs)


def plan_features(manifest: Manifest) -> list[FeatureSpec]:
    """The features monitored for this manifest's model (inputs first, at most `MAX_FEATURES`)."""
    # Output features are few and say the most about the model; inputs fill the rest of the cap.
    outputs = _output_features(manifest)[: MAX_FEATURES // 2]
    inputs = [f for spec in manifest.inputs for f in _input_features(spec)]
    return inputs[: MAX_FEATURES - len(outputs)] + outputs


# --------------------------------------------------------------------------------------------
# Extraction: one request -> values per feature
# --------------------------------------------------------------------------------------------


def _rows(arr: np.ndarray) -> np.ndarray:
    """The tensor as (rows, rest) in float64: the leading dim is the batch."""
    a = np.asarray(arr)
    if a.ndim == 0:
        return a.reshape(1, 1).astype(np.float64)
    if a.ndim == 1:
        return a.reshape(1, -1).astype(np.float64)
    return a.reshape(a.shape[0], -1).astype(np.float64, copy=False)


def _per_image(arr: np.ndarray, rank: int) -> np.ndarray:
    """A detection tensor with a batch dim: `[N, K(, 4)]`; without one, add it."""
    a = np.asarray(arr)
    return a[np.newaxis] if a.ndim == rank - 1 else a


def _extract_one(spec: FeatureSpec, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
                 ) -> np.ndarray | None:
    source = inputs if spec.kind == "input" else outputs
    arr = source.get(spec.tensor)
    if arr is None:
        return None
    a = np.asarray(arr)
    if spec.stat == CHANNEL_MEAN:
        if a.ndim != 4 or spec.index >= a.shape[spec.axis]:
            return None
        channel = np.take(a, spec.index, axis=spec.axis)
        return np.asarray(channel.reshape(channel.shape[0], -1).mean(axis=1, dtype=np.float64))
    if spec.stat == COLUMN:
        if a.ndim != 2 or spec.index >= a.shape[1]:
            return None
        return a[:, spec.index].astype(np.float64)
    if spec.stat == MEAN:
        rows = _rows(a)
        return np.asarray(rows.mean(axis=1)) if rows.shape[1] else None
    if spec.stat in (MAX_SCORE, TOP1_CLASS):
        if a.ndim == 0 or a.shape[-1] == 0:
            return None
        flat = a.reshape(-1, a.shape[-1])
        if spec.stat == MAX_SCORE:
            return np.asarray(flat.max(axis=1), dtype=np.float64)
        return np.asarray(flat.argmax(axis=1), dtype=np.int64)
    # Detection: boxes kept are those whose score reaches the threshold.
    scores = outputs.get(spec.scores)
    if scores is None:
        return None
    s = _per_image(np.asarray(scores, dtype=np.float64), 2)
    if s.ndim != 2:
        return None
    kept = s >= spec.threshold
    if spec.stat == BOX_COUNT:
        return np.asarray(kept.sum(axis=1), dtype=np.float64)
    if spec.stat == BOX_SCORE:
        return np.asarray(s[kept])
    classes = _per_image(a, 2)
    if classes.shape != s.shape:
        return None
    return np.asarray(np.rint(classes[kept]), dtype=np.int64)


def extract(specs: Sequence[FeatureSpec], inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
    """Values of each feature in one request (features that do not apply are left out)."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            values = _extract_one(spec, inputs, outputs)
        except (ValueError, TypeError, IndexError):  # an odd live tensor must not fail serving
            values = None
        if values is not None:
            out[spec.name] = values
    return out


# --------------------------------------------------------------------------------------------
# Building a profile from samples
# --------------------------------------------------------------------------------------------


def quantile_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> list[float]:
    """Interior bin edges at the reference quantiles (duplicates dropped; at least one edge)."""
    vals = np.asarray(values, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise InvalidInputError("cannot place bin edges without finite reference values")
    qs = np.quantile(vals, np.linspace(0.0, 1.0, max(2, bins) + 1)[1:-1])
    edges = np.unique(qs)
    # Values equal to an edge fall in the bin above it; a distribution whose mass sits on its
    # minimum would otherwise have an empty first bin and an overfull second one, which is fine,
    # but a constant feature needs one edge to tell "below" from "at or above".
    return [float(e) for e in edges] if edges.size else [float(vals[0])]


def _categories(values: np.ndarray, num_classes: int) -> list[int]:
    if 0 < num_classes <= MAX_CATEGORIES:
        return list(range(num_classes))
    ids, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
    top = ids[np.argsort(-counts, kind="stable")[:MAX_CATEGORIES]]
    return sorted(int(i) for i in top)


def build_feature(spec: FeatureSpec, values: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, Any] | None:
    """One profile feature from its reference values (None when there are none)."""
    vals = np.asarray(values).ravel()
    if spec.type == NUMERIC:
        vals = vals.astype(np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            return None
        edges = quantile_edges(vals, bins)
        counts = bin_numeric(np.asarray(edges), vals)
        return {**spec.to_dict(), "edges": edges, "proportions": [float(c) for c in counts / counts.sum()],
                "mean": float(vals.mean()), "std": float(vals.std()), "min": float(vals.min()),
                "max": float(vals.max()), "samples": int(vals.size)}
    if vals.size == 0:
        return None
    codes = _categories(vals, spec.num_classes)
    counts = bin_categorical(np.asarray(codes, dtype=np.int64), vals)
    return {**spec.to_dict(), "categories": [str(c) for c in codes] + [OTHER],
            "proportions": [float(c) for c in counts / counts.sum()], "samples": int(vals.size)}


def build_profile(specs: Sequence[FeatureSpec], values: Mapping[str, np.ndarray | Sequence[float]], *,
                  samples: int, source: str = "reference", bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """A profile from each feature's reference values; features without values are left out."""
    if source not in SOURCES:
        raise InvalidInputError(f"profile source must be one of {', '.join(SOURCES)}, got {source!r}")
    if not 2 <= bins <= MAX_BINS:
        raise InvalidInputError(f"bins must be within [2, {MAX_BINS}], got {bins}")
    features = []
    for spec in specs:
        if spec.name in values:
            feature = build_feature(spec, np.asarray(values[spec.name]), bins)
            if feature is not None:
                features.append(feature)
    return {"source": source, "samples": int(samples), "features": features}


def profile_from_requests(manifest: Manifest,
                          requests: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]], *,
                          source: str = "reference", bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """The profile of (inputs, outputs) pairs of a model run on reference data."""
    specs = plan_features(manifest)
    collected: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    count = 0
    for inputs, outputs in requests:
        count += 1
        for name, vals in extract(specs, inputs, outputs).items():
            collected[name].append(np.asarray(vals).ravel())
    if count == 0:
        raise InvalidInputError("no reference requests: a profile needs at least one")
    values = {n: np.concatenate(v) for n, v in collected.items() if v}
    return build_profile(specs, values, samples=count, source=source, bins=bins)


# --------------------------------------------------------------------------------------------
# Checking a profile and monitoring against it
# --------------------------------------------------------------------------------------------


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _finite_number(value: Any) -> bool:
    """A JSON number a float can hold: not a bool, NaN, an infinity, or an int beyond float range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # json.loads gives arbitrarily large ints
        return False


def validate_profile(raw: Any) -> dict[str, Any]:
    """`raw` if it is a well-formed profile; `InvalidInputError` saying what is wrong otherwise."""
    if not isinstance(raw, dict):
        raise InvalidInputError("a profile must be an object")
    features = raw.get("features")
    if not isinstance(features, list) or len(features) > MAX_FEATURES:
        raise InvalidInputError(f"a profile needs a 'features' list of at most {MAX_FEATURES}")
    names = set()
    for i, feature in enumerate(features):
        where = f"profile feature {i} ({feature.get('name') if isinstance(feature, dict) else '?'})"
        if not isinstance(feature, dict) or not isinstance(feature.get("name"), str):
            raise InvalidInputError(f"{where}: expected an object with a 'name'")
        if feature["name"] in names:
            raise InvalidInputError(f"{where}: the name appears twice")
        names.add(feature["name"])
        FeatureSpec.from_dict(feature)
        props = feature.get("proportions")
        if not isinstance(props, list) or not props or len(props) > MAX_BINS + 1:
            raise InvalidInputError(f"{where}: 'proportions' must list 1 to {MAX_BINS + 1} numbers")
        if not all(_finite_number(p) and p >= 0 for p in props) or not math.isclose(sum(props), 1.0, abs_tol=1e-6):
            raise InvalidInputError(f"{where}: 'proportions' must be non-negative and sum to 1")
        if feature.get("type") == NUMERIC:
            edges = feature.get("edges")
            if (not isinstance(edges, list) or len(edges) + 1 != len(props)
                    or not all(_finite_number(e) for e in edges)
                    or any(b <= a for a, b in itertools.pairwise(edges))):
                raise InvalidInputError(f"{where}: 'edges' must be increasing finite numbers, one fewer than bins")
        elif feature.get("type") == CATEGORICAL:
            cats = feature.get("categories")
            if not isinstance(cats, list) or len(cats) != len(props) or cats[-1:] != [OTHER]:
                raise InvalidInputError(f"{where}: 'categories' must match the bins and end with {OTHER!r}")
            try:
                ids = [int(c) for c in cats[:-1]]
            except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf)
                raise InvalidInputError(f"{where}: categories must be class ids") from exc
            # Live counting keeps class ids in int64 arrays; a larger id would crash the monitor.
            if any(not _INT64_MIN <= i <= _INT64_MAX for i in ids):
                raise InvalidInputError(f"{where}: class ids must fit in a 64-bit integer")
        else:
            raise InvalidInputError(f"{where}: 'type' must be numeric or categorical")
    return raw


class ProfileMonitor:
    """Live counts of every feature of a profile; fixed memory (see `fleet.core.drift`)."""

    def __init__(self, profile: Mapping[str, Any]) -> None:
        validate_profile(profile)
        self.source = str(profile.get("source", "reference"))
        self.specs = [FeatureSpec.from_dict(f) for f in profile["features"]]
        self.monitors = {f["name"]: FeatureMonitor(f) for f in profile["features"]}

    def add_values(self, values: Mapping[str, np.ndarray]) -> None:
        for name, vals in values.items():
            monitor = self.monitors.get(name)
            if monitor is not None:
                monitor.add(vals)

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Ingest one request (extraction and binning)."""
        self.add_values(extract(self.specs, inputs, outputs))

    def memory_bytes(self) -> int:
        return sum(m.memory_bytes() for m in self.monitors.values())

    def emit(self) -> list[dict[str, Any]]:
        """The window's `drift` list (one entry per feature, even with no samples) and reset."""
        return [m.emit() for m in self.monitors.values()]


__all__ = [
    "DEFAULT_BINS",
    "MAX_FEATURES",
    "FeatureSpec",
    "ProfileMonitor",
    "build_feature",
    "build_profile",
    "extract",
    "plan_features",
    "profile_from_requests",
    "quantile_edges",
    "validate_profile",
]
