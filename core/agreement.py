"""Agreement between a shadow model and the serving model on the same input, task by task.

The rule this module enforces: a comparison never raises, whatever the two models return. A
shadow that answers with the wrong shape, NaNs or nothing at all is *evidence* against the
candidate, so it is recorded as the worst possible agreement (cosine 0, a huge but finite
difference, every top-1 row in disagreement, every box unmatched) instead of crashing the shadow
worker or poisoning sums with inf/NaN that JSON and protobuf carry badly.

Per output and per request, for every task: the cosine similarity of the two outputs flattened to
float64 vectors (two all-zero vectors are identical: cosine 1; exactly one all-zero vector:
cosine 0), the mean and max absolute difference. On top of that, what the task needs, read
through the manifest's `outputs_layout` (`LAYOUT_SPEC` lists the keys and their defaults):

- classification, on the scores output (`scores`, default the first output): top-1 agreement per
  batch row (argmax over the last axis), top-k agreement (the serving model's top-1 class is among
  the candidate's `top_k` best; only when there are more than k classes) and the confusion
  between the two models' labels, "a->b" = serving said a, candidate said b;
- detection: the tensors named `boxes`, `scores`, `classes` are read per image, boxes under
  `score_threshold` dropped, the rest matched one to one by IoU (`fleet.core.detection`, greedy or
  Hungarian) and counted into a logical entry named "detections": boxes each model saw, matched
  pairs, pairs with the same class, their IoU sum; the primary number is the F1-style match rate
  2 * matched / (serving boxes + candidate boxes);
- segmentation, on the `mask` output: masks thresholded at `mask_threshold`, IoU per mask (two
  empty masks agree: IoU 1) and pixel agreement;
- generic: the cosine and differences above.

Without a layout, conventional names apply (`boxes`/`scores`/`classes`, `mask`/`masks`), so
older agents and layout-less bundles still get task-aware numbers when the names fit.

`AgreementSums` keeps running sums (never means) in the `OutputAgreement` dict shape of
docs/ARCHITECTURE.md, task sums in `sums` (names ending `_max`/`_min` combine by max/min, the
others add) and label pairs in `confusion` (bounded to `MAX_CONFUSION_PAIRS`, the rarest folded
into "other"), so windows from many devices merge on the controller (`merge_dicts`).

Pure numpy; no IO.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fleet.core.detection import BOX_FORMATS, MATCHERS, match_boxes, to_xyxy
from fleet.core.errors import BundleError

# Stands in for an infinite difference: finite so that sums, JSON and protobuf doubles stay sane,
# and far above any real difference so a mismatch can never pass a diff threshold.
MISMATCH_DIFF = 1e30
# Label pairs kept per entry; a 1000-class model must not grow telemetry without bound. The
# rarest pairs are folded into OTHER_PAIR (which counts towards the bound).
MAX_CONFUSION_PAIRS = 64
OTHER_PAIR = "other"
# Task sums kept per entry: ours are a dozen; the bound protects the controller from a device
# that sends thousands of made-up names.
MAX_SUM_KEYS = 64
MAX_KEY_CHARS = 64
# Boxes per image considered for matching (the best-scored ones): bounds the O(n*m) IoU matrix.
MAX_BOXES_PER_IMAGE = 1000
DETECTIONS = "detections"

# outputs_layout keys per task: (kind, default). "output" names a model output; None: optional.
LAYOUT_SPEC: dict[str, dict[str, tuple[str, Any]]] = {
    "classification": {"scores": ("output", None), "top_k": ("int", 5)},
    "detection": {
        "boxes": ("output", "boxes"),
        "scores": ("output", "scores"),
        "classes": ("output", "classes"),
        "box_format": ("choice:" + "|".join(BOX_FORMATS), "xyxy"),
        "score_threshold": ("float", 0.5),
        "iou_threshold": ("unit", 0.5),
        "matching": ("choice:" + "|".join(MATCHERS), "greedy"),
    },
    "segmentation": {"mask": ("output", None), "mask_threshold": ("float", 0.5)},
    "generic": {},
}
_MASK_NAMES = ("mask", "masks")


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the shadow compares with the serving model's on one request.

    `sums` and `confusion` are this request's contributions to the task sums. For the logical
    "detections" entry, `cosine` carries the request's match rate and the diffs `1 - match rate`,
    so a reader that only knows cosines still reads it the right way round.
    """

    output: str
    cosine: float
    mean_abs_diff: float
    max_abs_diff: float
    top1_agree: int = 0
    top1_samples: int = 0
    shape_match: bool = True
    sums: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, int] = field(default_factory=dict)


# -- layout ---------------------------------------------------------------------------------------


def validate_layout(task: str, layout: Mapping[str, Any], outputs: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse an `outputs_layout` that names unknown keys or outputs, or holds bad values.

    `outputs` maps each model output name to its declared shape (-1 = dynamic).
    """
    spec = LAYOUT_SPEC.get(task, {})
    unknown = sorted(set(layout) - set(spec))
    if unknown:
        allowed = ", ".join(spec) or "none"
        raise BundleError(
            f"outputs_layout key(s) {', '.join(unknown)} do not apply to task {task!r} (allowed: {allowed})"
        )
    for key, value in layout.items():
        kind = spec[key][0]
        where = f"outputs_layout.{key}"
        if kind == "output":
            if not isinstance(value, str) or value not in outputs:
                raise BundleError(
                    f"{where} must name one of the model's outputs ({', '.join(outputs)}), got {value!r}"
                )
        elif kind.startswith("choice:"):
            choices = kind.split(":", 1)[1].split("|")
            if value not in choices:
                raise BundleError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise BundleError(f"{where} must be a whole number from 1 to 1000, got {value!r}")
        else:
            ok = _finite_number(value)
            if ok and kind == "unit":
                ok = 0.0 < value <= 1.0
            if not ok:
                want = "a number in (0, 1]" if kind == "unit" else "a finite number"
                raise BundleError(f"{where} must be {want}, got {value!r}")
    if task == "detection":
        boxes = layout.get("boxes")
        if boxes is not None:
            shape = outputs[boxes]
            if not shape or shape[-1] not in (-1, 4):
                raise BundleError(
                    f"outputs_layout.boxes names output {boxes!r} of shape {list(shape)}: boxes need a last "
                    "axis of 4"
                )


def _finite_number(value: Any) -> bool:
    """A JSON number a float can hold: not a bool, NaN, an infinity, or an int beyond float range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # json.loads gives arbitrarily large ints, e.g. 1e400 written as digits
        return False


def coerce_layout_value(task: str, key: str, text: str) -> Any:
    """A `key=value` string from the command line, typed as `LAYOUT_SPEC` says (no validation)."""
    kind = LAYOUT_SPEC.get(task, {}).get(key, ("output", None))[0]
    try:
        if kind == "int":
            return int(text)
        if kind in ("float", "unit"):
            return float(text)
    except ValueError:
        return text  # left as given: validation then names the key and the bad value
    return text


def parse_layout_text(task: str, text: str) -> dict[str, Any]:
    """The `--layout` option: a JSON object, or `key=value` pairs separated by commas.

    Values are typed by `LAYOUT_SPEC` (numbers for thresholds and `top_k`); validation against the
    model's outputs happens when the manifest is built. Raises `BundleError` on bad syntax.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"outputs layout is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise BundleError("outputs layout JSON must be an object")
        return raw
    layout: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise BundleError(f"outputs layout expects key=value pairs separated by commas, got {item!r}")
        layout[key.strip()] = coerce_layout_value(task, key.strip(), value.strip())
    return layout


def _setting(layout: Mapping[str, Any], task: str, key: str) -> Any:
    value = layout.get(key)
    return LAYOUT_SPEC[task][key][1] if value is None else value


# -- per-request comparisons ----------------------------------------------------------------------


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


def _pair(a: Any, b: Any) -> str:
    return f"{a}->{b}"


def _count_pairs(serving: np.ndarray, shadow: np.ndarray) -> dict[str, int]:
    pairs: dict[str, int] = {}
    for a, b in zip(serving.tolist(), shadow.tolist(), strict=True):
        key = _pair(a, b)
        pairs[key] = pairs.get(key, 0) + 1
    return _bound_confusion(pairs)


def compare_output(
    name: str, task: str, serving: np.ndarray | None, shadow: np.ndarray | None, *, ranked: bool | None = None,
    top_k: int = 5,
) -> OutputComparison:
    """Compare one output. `shadow` may be None (the shadow did not produce this output).

    `ranked`: whether top-1/top-k/confusion apply to this output; by default, to every output
    of a classification model (`compare` narrows it to the layout's scores output).
    """
    ranked = task == "classification" if ranked is None else ranked
    if serving is None or shadow is None or np.shape(serving) != np.shape(shadow):
        rows = 0
        sums: dict[str, float] = {}
        if ranked and serving is not None and _top1_applies(np.asarray(serving)):
            rows = max(1, _top1_rows(np.asarray(serving)))
            if np.shape(serving)[-1] > top_k:
                sums = {f"top{top_k}_agree": 0.0, f"top{top_k}_rows": float(rows)}
        return OutputComparison(name, 0.0, MISMATCH_DIFF, MISMATCH_DIFF, 0, rows, shape_match=False, sums=sums)

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
    sums = {}
    confusion: dict[str, int] = {}
    if ranked and _top1_applies(x):
        last = x.shape[-1]
        # NaN ranks last: a NaN score never wins, so a NaN-emitting candidate disagrees.
        rx = np.nan_to_num(x.reshape(-1, last), nan=-np.inf)
        ry = np.nan_to_num(y.reshape(-1, last), nan=-np.inf)
        top_x, top_y = np.argmax(rx, axis=-1), np.argmax(ry, axis=-1)
        agree, samples = int(np.count_nonzero(top_x == top_y)), int(top_x.size)
        if last > top_k:
            best_y = np.argpartition(-ry, top_k - 1, axis=-1)[:, :top_k]
            in_top = np.any(best_y == top_x[:, None], axis=-1)
            sums = {f"top{top_k}_agree": float(np.count_nonzero(in_top)), f"top{top_k}_rows": float(samples)}
        confusion = _count_pairs(top_x, top_y)
    return OutputComparison(name, cosine_similarity(x, y), mean_diff, max_diff, agree, samples,
                            sums=sums, confusion=confusion)


class _Unreadable(ValueError):
    """The outputs do not fit the layout (missing tensor, wrong shape)."""


def _with_batch(arr: np.ndarray, rank: int) -> np.ndarray:
    # Layouts name tensors with a batch axis; a model without one answers for a single image.
    return arr[None, ...] if arr.ndim == rank - 1 else arr


def _read_detections(
    outputs: Mapping[str, np.ndarray], names: tuple[str, str | None, str | None], box_format: str,
    score_threshold: float,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per image: (xyxy boxes kept by the score threshold, their classes or None)."""
    boxes_name, scores_name, classes_name = names
    if boxes_name not in outputs:
        raise _Unreadable(f"no output {boxes_name!r}")
    boxes = _with_batch(np.asarray(outputs[boxes_name]), 3)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise _Unreadable(f"boxes of shape {boxes.shape}, expected [N, K, 4]")
    n, k = boxes.shape[:2]
    scores: np.ndarray | None = None
    classes: np.ndarray | None = None
    if scores_name is not None and scores_name in outputs:
        raw = np.asarray(outputs[scores_name], dtype=np.float64)
        if raw.ndim == 3 and raw.shape[:2] == (n, k):
            # Per-class scores [N, K, C]: the box's score is its best class's.
            classes = np.argmax(np.nan_to_num(raw, nan=-np.inf), axis=-1)
            raw = np.max(raw, axis=-1)
        raw = _with_batch(raw, 2)
        if raw.shape != (n, k):
            raise _Unreadable(f"scores of shape {raw.shape}, expected {(n, k)}")
        scores = raw
    if classes_name is not None and classes_name in outputs:
        raw_classes = np.asarray(outputs[classes_name])
        if raw_classes.ndim == 3 and raw_classes.shape[-1] == 1:  # [N, K, 1]: one id per box
            raw_classes = raw_classes[..., 0]
        raw_classes = _with_batch(raw_classes, 2)
        if raw_classes.shape != (n, k):
            raise _Unreadable(f"classes of shape {raw_classes.shape}, expected {(n, k)}")
        # Float class ids (common in exported detectors) are compared as integers.
        classes = np.rint(np.nan_to_num(raw_classes.astype(np.float64), nan=-1.0)).astype(np.int64)
    xyxy = to_xyxy(boxes, box_format)
    images: list[tuple[np.ndarray, np.ndarray | None]] = []
    for i in range(n):
        keep = np.arange(k) if scores is None else np.flatnonzero(scores[i] >= score_threshold)
        if keep.size > MAX_BOXES_PER_IMAGE:
            assert scores is not None  # only a score filter can be over the cap's worth of boxes
            keep = keep[np.argsort(-scores[i][keep], kind="stable")[:MAX_BOXES_PER_IMAGE]]
        images.append((xyxy[i][keep], None if classes is None else classes[i][keep]))
    return images


def _detection_names(layout: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
    boxes = str(_setting(layout, "detection", "boxes"))
    scores = layout.get("scores", "scores")
    classes = layout.get("classes", "classes")
    return boxes, None if scores is None else str(scores), None if classes is None else str(classes)


def compare_detections(
    serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray], layout: Mapping[str, Any] | None = None,
    *, name: str = DETECTIONS,
) -> OutputComparison:
    """Match the candidate's boxes with the serving model's, image by image, into one entry.

    Sums: `images`, `serving_boxes`, `shadow_boxes`, `matched`, `class_agree` (matched pairs with
    the same class), `class_pairs` (matched pairs where both have a class), `iou_sum` (over matched
    pairs) and `malformed` (images the candidate's answer could not be read for; each weighs as
    one unmatched box in the match rate). Confusion: class pairs of matched boxes.
    """
    layout = layout or {}
    names = _detection_names(layout)
    box_format = str(_setting(layout, "detection", "box_format"))
    score_threshold = float(_setting(layout, "detection", "score_threshold"))
    iou_threshold = float(_setting(layout, "detection", "iou_threshold"))
    matching = str(_setting(layout, "detection", "matching"))
    try:
        theirs = _read_detections(serving, names, box_format, score_threshold)
    except (_Unreadable, ValueError, TypeError):
        # The serving model does not fit the candidate's layout: the candidate changed the
        # contract, and that is evidence against it, not a reason to skip the comparison.
        return OutputComparison(name, 0.0, 1.0, 1.0, shape_match=False, sums={"images": 1.0, "malformed": 1.0})
    try:
        ours = _read_detections(shadow, names, box_format, score_threshold)
        if len(ours) != len(theirs):
            raise _Unreadable("batch sizes differ")
    except (_Unreadable, ValueError, TypeError):
        serving_boxes = float(sum(len(b) for b, _ in theirs))
        sums = {"images": float(len(theirs)), "serving_boxes": serving_boxes, "shadow_boxes": 0.0,
                "matched": 0.0, "class_agree": 0.0, "class_pairs": 0.0, "iou_sum": 0.0,
                "malformed": float(len(theirs))}
        return OutputComparison(name, 0.0, 1.0, 1.0, shape_match=False, sums=sums)

    totals = dict.fromkeys(("serving_boxes", "shadow_boxes", "matched", "class_agree", "class_pairs"), 0)
    iou_sum = 0.0
    pairs: dict[str, int] = {}
    for (a_boxes, a_classes), (b_boxes, b_classes) in zip(theirs, ours, strict=True):
        m = match_boxes(a_boxes, b_boxes, serving_classes=a_classes, shadow_classes=b_classes,
                        iou_threshold=iou_threshold, matching=matching)
        totals["serving_boxes"] += m.serving_boxes
        totals["shadow_boxes"] += m.shadow_boxes
        totals["matched"] += m.matched
        totals["class_agree"] += m.class_agree
        iou_sum += m.iou_sum
        if a_classes is not None and b_classes is not None:
            totals["class_pairs"] += m.matched
            for (r, c) in m.pairs:
                key = _pair(int(a_classes[r]), int(b_classes[c]))
                pairs[key] = pairs.get(key, 0) + 1
    boxes = totals["serving_boxes"] + totals["shadow_boxes"]
    rate = 2.0 * totals["matched"] / boxes if boxes else 1.0
    sums = {key: float(value) for key, value in totals.items()}
    sums.update(images=float(len(theirs)), iou_sum=iou_sum, malformed=0.0)
    return OutputComparison(name, rate, 1.0 - rate, 1.0 - rate, sums=sums, confusion=_bound_confusion(pairs))


def mask_sums(serving: np.ndarray | None, shadow: np.ndarray | None, threshold: float) -> dict[str, float]:
    """Task sums of one mask output: `masks`, `mask_iou_sum`, `mask_iou_min`, `pixels`, `pixel_agree`.

    A mask is the last two axes; every leading index is one mask. A candidate mask of another
    shape counts as IoU 0 on every serving mask.
    """
    if serving is None:
        return {}
    x = np.asarray(serving)
    if x.ndim < 2:
        return {}
    masks = int(np.prod(x.shape[:-2], dtype=np.int64)) if x.ndim > 2 else 1
    pixels = float(x.size)
    if shadow is None or np.shape(shadow) != x.shape:
        return {"masks": float(masks), "mask_iou_sum": 0.0, "mask_iou_min": 0.0, "pixels": pixels,
                "pixel_agree": 0.0}
    if masks == 0 or x.size == 0:
        return {}
    with np.errstate(invalid="ignore"):
        a = (x.astype(np.float64) >= threshold).reshape(masks, -1)  # NaN >= t is False: background
        b = (np.asarray(shadow, dtype=np.float64) >= threshold).reshape(masks, -1)
    inter = np.count_nonzero(a & b, axis=1)
    union = np.count_nonzero(a | b, axis=1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # both empty: they agree
    return {"masks": float(masks), "mask_iou_sum": float(iou.sum()), "mask_iou_min": float(iou.min()),
            "pixels": pixels, "pixel_agree": float(np.count_nonzero(a == b))}


def _first_present(names: Iterable[str], outputs: Mapping[str, Any]) -> str | None:
    return next((n for n in names if n in outputs), None)


def compare(
    task: str, serving: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray],
    layout: Mapping[str, Any] | None = None,
) -> dict[str, OutputComparison]:
    """Compare every output the serving model produced with the shadow's output of that name.

    Outputs only the shadow has are ignored: the serving model's contract is the reference.
    `layout` is the candidate's `outputs_layout`; it adds the task's numbers (see the module
    docstring). Never raises.
    """
    layout = layout or {}
    if task == "classification":
        scores = layout.get("scores") or next(iter(serving), None)
        top_k = int(_setting(layout, task, "top_k"))
        return {name: compare_output(name, task, arr, shadow.get(name), ranked=name == scores, top_k=top_k)
                for name, arr in serving.items()}
    result = {name: compare_output(name, task, arr, shadow.get(name)) for name, arr in serving.items()}
    if task == "detection":
        boxes = str(_setting(layout, task, "boxes"))
        if "boxes" in layout or boxes in serving:
            entry = DETECTIONS if DETECTIONS not in serving else f"{DETECTIONS}:task"
            result[entry] = compare_detections(serving, shadow, layout, name=entry)
    elif task == "segmentation":
        mask = layout.get("mask") or _first_present(_MASK_NAMES, serving)
        if mask is not None and mask in result:
            threshold = float(_setting(layout, task, "mask_threshold"))
            sums = mask_sums(serving.get(mask), shadow.get(mask), threshold)
            if sums:
                result[mask] = replace(result[mask], sums=sums)
    return result


# -- running sums ---------------------------------------------------------------------------------


def _bound_confusion(pairs: dict[str, int]) -> dict[str, int]:
    if len(pairs) <= MAX_CONFUSION_PAIRS:
        return pairs
    other = pairs.get(OTHER_PAIR, 0)
    ranked = sorted(((k, v) for k, v in pairs.items() if k != OTHER_PAIR), key=lambda kv: (-kv[1], kv[0]))
    keep = dict(ranked[: MAX_CONFUSION_PAIRS - 1])
    keep[OTHER_PAIR] = other + sum(v for _, v in ranked[MAX_CONFUSION_PAIRS - 1:])
    return keep


def _merge_sums(into: dict[str, float], more: Mapping[str, Any]) -> None:
    for key, raw in more.items():
        try:
            value = float(raw)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value) or not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
            continue
        if key not in into:
            if len(into) >= MAX_SUM_KEYS:
                continue
            into[key] = value
        elif key.endswith("_max"):
            into[key] = max(into[key], value)
        elif key.endswith("_min"):
            into[key] = min(into[key], value)
        else:
            into[key] += value


def _merge_confusion(into: dict[str, int], more: Mapping[str, Any]) -> dict[str, int]:
    for key, raw in more.items():
        try:
            count = int(raw)
        except (TypeError, ValueError):
            continue
        if count > 0 and isinstance(key, str) and len(key) <= MAX_KEY_CHARS:
            into[key] = into.get(key, 0) + count
    return _bound_confusion(into)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


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
    sums: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, int] = field(default_factory=dict)

    def add_comparison(self, c: OutputComparison) -> None:
        self.samples += 1
        self.cosine_sum += c.cosine
        self.cosine_min = min(self.cosine_min, c.cosine)
        self.mean_abs_diff_sum += c.mean_abs_diff
        self.max_abs_diff = max(self.max_abs_diff, c.max_abs_diff)
        self.top1_agree += c.top1_agree
        self.top1_samples += c.top1_samples
        _merge_sums(self.sums, c.sums)
        if c.confusion:
            self.confusion = _merge_confusion(self.confusion, c.confusion)

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
        sums, confusion = raw.get("sums"), raw.get("confusion")
        if isinstance(sums, Mapping):
            _merge_sums(self.sums, sums)
        if isinstance(confusion, Mapping) and confusion:
            self.confusion = _merge_confusion(self.confusion, confusion)

    def merge(self, other: AgreementSums) -> None:
        self.samples += other.samples
        self.cosine_sum += other.cosine_sum
        self.cosine_min = min(self.cosine_min, other.cosine_min)
        self.mean_abs_diff_sum += other.mean_abs_diff_sum
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.top1_agree += other.top1_agree
        self.top1_samples += other.top1_samples
        _merge_sums(self.sums, other.sums)
        if other.confusion:
            self.confusion = _merge_confusion(self.confusion, other.confusion)

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
            "sums": dict(sorted(self.sums.items())),
            "confusion": dict(sorted(self.confusion.items())),
        }

    # -- reading --------------------------------------------------------------------------------

    def _sum(self, key: str) -> float:
        return float(self.sums.get(key, 0.0))

    def _detection_rate(self) -> float:
        boxes = self._sum("serving_boxes") + self._sum("shadow_boxes") + self._sum("malformed")
        # No box on either side in any image: both models agree that there is nothing to see.
        return 2.0 * self._sum("matched") / boxes if boxes else 1.0

    def score(self, task: str) -> tuple[float, int, str]:
        """(agreement in [0, 1], samples it rests on, what it is) for this task.

        Classification: top-1 agreement over rows; detection (the "detections" entry): the box
        match rate over images; segmentation (the mask output): mean mask IoU over masks; else,
        and for outputs with no task sums, the mean cosine similarity over requests.
        """
        if task == "classification" and self.top1_samples:
            return self.top1_agree / self.top1_samples, self.top1_samples, "top-1 agreement"
        if task == "detection" and self._sum("images"):
            return (self._detection_rate(), int(self._sum("images")),
                    "box match rate 2*matched/(serving+candidate boxes)")
        if task == "segmentation" and self._sum("masks"):
            return self._sum("mask_iou_sum") / self._sum("masks"), int(self._sum("masks")), "mean mask IoU"
        if self.samples:
            return self.cosine_sum / self.samples, self.samples, "mean cosine similarity"
        return math.nan, 0, "no comparisons"

    def metrics(self, task: str) -> list[tuple[str, float, int]]:
        """Every number worth showing for this task: (name, value, samples); the first is `score`'s.

        Values are NaN where nothing was measured (e.g. class agreement with no matched pair).
        """
        if task == "classification" and self.top1_samples:
            rows: list[tuple[str, float, int]] = [("top1", self.top1_agree / self.top1_samples, self.top1_samples)]
            ks = sorted(int(key[3:-6]) for key in self.sums
                        if key.startswith("top") and key.endswith("_agree") and key[3:-6].isdigit())
            for k in ks:
                n = self._sum(f"top{k}_rows")
                rows.append((f"top{k}", _ratio(self._sum(f"top{k}_agree"), n), int(n)))
            return rows
        if task == "detection" and self._sum("images"):
            images, matched = self._sum("images"), self._sum("matched")
            rows = [
                ("match_rate", self._detection_rate(), int(images)),
                ("class_agreement", _ratio(self._sum("class_agree"), self._sum("class_pairs")),
                 int(self._sum("class_pairs"))),
                ("mean_iou", _ratio(self._sum("iou_sum"), matched), int(matched)),
                ("only_serving", (self._sum("serving_boxes") - matched) / images, int(images)),
                ("only_shadow", (self._sum("shadow_boxes") - matched) / images, int(images)),
            ]
            if self._sum("malformed"):
                rows.append(("malformed", self._sum("malformed") / images, int(images)))
            return rows
        if task == "segmentation" and self._sum("masks"):
            masks = self._sum("masks")
            return [
                ("mean_mask_iou", self._sum("mask_iou_sum") / masks, int(masks)),
                ("min_mask_iou", self._sum("mask_iou_min"), int(masks)),
                ("pixel_agreement", _ratio(self._sum("pixel_agree"), self._sum("pixels")), int(masks)),
            ]
        if not self.samples:
            return []
        return [
            ("mean_cosine", self.cosine_sum / self.samples, self.samples),
            ("mean_abs_diff", self.mean_abs_diff_sum / self.samples, self.samples),
            ("max_abs_diff", self.max_abs_diff, self.samples),
        ]


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
