"""Box geometry and one-to-one box matching for detection agreement.

The rule this module enforces: two detectors' boxes are paired one to one, each pair overlapping
by at least the IoU threshold, and nothing here ever raises on bad numbers. Degenerate boxes
(zero or negative area, NaN or inf coordinates) overlap nothing, so a candidate that emits garbage
gets no matches instead of crashing the shadow worker.

Two matchers:

- `greedy`: take pairs in order of decreasing IoU while both boxes are still free (the usual
  detection-evaluation rule, O(n*m log(n*m))), the default;
- `hungarian`: the assignment that maximises the summed IoU of pairs above the threshold,
  solved with `linear_sum_assignment`, a small shortest-augmenting-path Hungarian implementation
  (numpy only: scipy is not a runtime dependency of the agent; tests check it against
  `scipy.optimize.linear_sum_assignment`).

Boxes are converted to `xyxy` (x1, y1, x2, y2) first; `xywh` is top-left corner plus size,
`cxcywh` is centre plus size. Pure numpy; no IO.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
MATCHERS = ("greedy", "hungarian")


def to_xyxy(boxes: np.ndarray, box_format: str = "xyxy") -> np.ndarray:
    """`[..., 4]` boxes in `box_format` as float64 xyxy."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes must have a last axis of 4, got shape {b.shape}")
    if box_format == "xyxy":
        return b.copy()
    if box_format == "xywh":
        return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)
    if box_format == "cxcywh":
        half = b[..., 2:] / 2.0
        return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)
    raise ValueError(f"box format {box_format!r} is not one of {', '.join(BOX_FORMATS)}")


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box of `a` ([n, 4]) with every box of `b` ([m, 4]): an [n, m] float64 array.

    A box with non-positive width or height, or any non-finite coordinate, has IoU 0 with
    everything (itself included), so it can never be matched.
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    y = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if x.shape[0] == 0 or y.shape[0] == 0:
        return np.zeros((x.shape[0], y.shape[0]))
    with np.errstate(invalid="ignore", over="ignore"):
        area_x = _area(x)
        area_y = _area(y)
        lt = np.maximum(x[:, None, :2], y[None, :, :2])
        rb = np.minimum(x[:, None, 2:], y[None, :, 2:])
        wh = np.clip(rb - lt, 0.0, None)
        inter = wh[..., 0] * wh[..., 1]
        union = area_x[:, None] + area_y[None, :] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    valid = (area_x > 0)[:, None] & (area_y > 0)[None, :]
    iou = np.where(valid & np.isfinite(iou), iou, 0.0)
    return np.asarray(np.clip(iou, 0.0, 1.0))


def _area(boxes: np.ndarray) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    finite = np.all(np.isfinite(boxes), axis=1)
    # Degenerate and non-finite boxes get area 0: the caller treats them as matching nothing.
    return np.where(finite & (w > 0) & (h > 0), w * h, 0.0)


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of rows to columns, like scipy's function of that name.

    Returns `(row_ind, col_ind)`, sorted by row, with `min(n, m)` pairs. Every cost must be
    finite. The Hungarian method with potentials and shortest augmenting paths (Kuhn-Munkres as
    in Jonker-Volgenant), O(n^2 m) with the inner loop over columns vectorised in numpy.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("cost matrix must be finite")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    # 1-based rows and columns; column 0 is the virtual start of each augmenting path.
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: the row assigned to column j (0: none)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            used_cols = np.flatnonzero(used)
            u[owner[used_cols]] += delta
            v[used_cols] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.flatnonzero(owner[1:])
    rows = owner[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def match_greedy(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) taken by decreasing IoU while both are free; only IoU >= threshold."""
    if iou.size == 0:
        return []
    rows, cols = np.nonzero(iou >= threshold)
    if rows.size == 0:
        return []
    # Stable sort on -IoU: ties resolve by (row, col) so the result is deterministic.
    order = np.argsort(-iou[rows, cols], kind="stable")
    taken_r: set[int] = set()
    taken_c: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r in taken_r or c in taken_c:
            continue
        taken_r.add(r)
        taken_c.add(c)
        pairs.append((r, c))
    return sorted(pairs)


def match_hungarian(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs maximising the summed IoU of pairs at or above threshold (others weigh nothing)."""
    if iou.size == 0:
        return []
    weight = np.where(iou >= threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(-weight)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= threshold]


@dataclass(frozen=True)
class BoxMatch:
    """How one image's serving boxes pair with the candidate's boxes."""

    serving_boxes: int
    shadow_boxes: int
    matched: int
    class_agree: int
    iou_sum: float
    pairs: tuple[tuple[int, int], ...] = ()

    @property
    def only_serving(self) -> int:
        return self.serving_boxes - self.matched

    @property
    def only_shadow(self) -> int:
        return self.shadow_boxes - self.matched


def match_boxes(
    serving_boxes: np.ndarray,
    shadow_boxes: np.ndarray,
    *,
    serving_classes: np.ndarray | None = None,
    shadow_classes: np.ndarray | None = None,
    iou_threshold: float = 0.5,
    matching: str = "greedy",
) -> BoxMatch:
    """Match two sets of xyxy boxes of one image, class-agnostically, and count what agrees.

    Matching ignores classes on purpose: a box both models see but label differently is a
    class disagreement, not two missed boxes. `class_agree` counts matched pairs with equal
    classes (0 when either side has no classes).
    """
    if matching not in MATCHERS:
        raise ValueError(f"matching {matching!r} is not one of {', '.join(MATCHERS)}")
    a = np.asarray(serving_boxes, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(shadow_boxes, dtype=np.float64).reshape(-1, 4)
    iou = iou_matrix(a, b)
    pairs = (match_greedy if matching == "greedy" else match_hungarian)(iou, iou_threshold)
    agree = 0
    if serving_classes is not None and shadow_classes is not None and pairs:
        ca = np.asarray(serving_classes).reshape(-1)
        cb = np.asarray(shadow_classes).reshape(-1)
        agree = sum(1 for r, c in pairs if r < ca.size and c < cb.size and ca[r] == cb[c])
    return BoxMatch(
        serving_boxes=int(a.shape[0]),
        shadow_boxes=int(b.shape[0]),
        matched=len(pairs),
        class_agree=int(agree),
        iou_sum=float(sum(iou[r, c] for r, c in pairs)),
        pairs=tuple(pairs),
    )
