"""Box geometry and matching: IoU by hand, the Hungarian solver against scipy, greedy vs optimal."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from fleet.core.detection import (
    iou_matrix,
    linear_sum_assignment,
    match_boxes,
    match_greedy,
    match_hungarian,
    to_xyxy,
)


def test_iou_against_hand_computed_values() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], dtype=np.float64)
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=np.float64)
    iou = iou_matrix(a, b)
    # [0,0,10,10] vs [5,5,15,15]: intersection 5x5 = 25, union 100 + 100 - 25 = 175.
    assert iou[0, 0] == pytest.approx(25 / 175)
    assert iou[0, 1] == pytest.approx(1.0)
    assert iou[0, 2] == 0.0
    # Half the box: 50 / 100.
    assert iou[0, 3] == pytest.approx(0.5)
    # [0,0,2,2] inside [0,0,10,10]: 4 / 100; inside [0,0,10,5]: 4 / 50.
    assert iou[1, 1] == pytest.approx(0.04)
    assert iou[1, 3] == pytest.approx(0.08)
    assert iou.shape == (2, 4)


def test_touching_boxes_and_degenerate_or_nonfinite_boxes_overlap_nothing() -> None:
    good = np.array([[0, 0, 10, 10]], dtype=np.float64)
    others = np.array([[10, 0, 20, 10],            # shares an edge only
                       [0, 0, 0, 10],              # zero width
                       [10, 10, 0, 0],             # inverted corners
                       [np.nan, 0, 10, 10],        # NaN
                       [-np.inf, -np.inf, np.inf, np.inf]])
    assert np.all(iou_matrix(good, others) == 0.0)
    assert iou_matrix(others[1:], others[1:]).max() == 0.0  # bad boxes: not even with themselves
    assert iou_matrix(np.zeros((0, 4)), good).shape == (0, 1)


def test_box_formats_convert_to_xyxy() -> None:
    xyxy = np.array([[2.0, 4.0, 12.0, 10.0]])
    np.testing.assert_allclose(to_xyxy(np.array([[2.0, 4.0, 10.0, 6.0]]), "xywh"), xyxy)
    np.testing.assert_allclose(to_xyxy(np.array([[7.0, 7.0, 10.0, 6.0]]), "cxcywh"), xyxy)
    np.testing.assert_allclose(to_xyxy(xyxy, "xyxy"), xyxy)
    with pytest.raises(ValueError, match="box format"):
        to_xyxy(xyxy, "yxyx")


@pytest.mark.parametrize("seed", range(40))
def test_linear_sum_assignment_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = (int(v) for v in rng.integers(1, 12, size=2))
    # Integer costs make ties (several optimal assignments): only the total must agree.
    cost = rng.random((n, m)) if seed % 2 else rng.integers(0, 5, size=(n, m)).astype(float)
    rows, cols = linear_sum_assignment(cost)
    ref_rows, ref_cols = scipy_lsa(cost)
    assert len(rows) == len(ref_rows) == min(n, m)
    assert cost[rows, cols].sum() == pytest.approx(cost[ref_rows, ref_cols].sum(), abs=1e-9)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert rows.tolist() == sorted(rows.tolist())


def test_linear_sum_assignment_edge_cases() -> None:
    rows, cols = linear_sum_assignment(np.zeros((0, 3)))
    assert rows.size == cols.size == 0
    rows, cols = linear_sum_assignment(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]))
    assert (rows.tolist(), cols.tolist()) == ([0, 1, 2], [1, 0, 2])  # the textbook example: cost 5
    with pytest.raises(ValueError, match="finite"):
        linear_sum_assignment(np.array([[np.inf]]))


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 50, size=(n, 2))
    wh = rng.uniform(5, 25, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("seed", range(30))
def test_hungarian_maximises_iou_like_scipy_and_greedy_is_valid(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    a = _random_boxes(rng, int(rng.integers(0, 10)))
    b = np.concatenate([a[: len(a) // 2] + rng.normal(0, 3, size=(len(a) // 2, 4)),
                        _random_boxes(rng, int(rng.integers(0, 6)))])
    iou = iou_matrix(a, b)
    threshold = 0.3
    hungarian = match_hungarian(iou, threshold)
    greedy = match_greedy(iou, threshold)
    weight = np.where(iou >= threshold, iou, 0.0)
    if weight.size:
        r, c = scipy_lsa(weight, maximize=True)
        assert sum(iou[i, j] for i, j in hungarian) == pytest.approx(weight[r, c].sum(), abs=1e-9)
    for pairs in (hungarian, greedy):
        assert all(iou[i, j] >= threshold for i, j in pairs)
        assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})
    # Greedy is never better than the optimum in summed IoU.
    assert sum(iou[i, j] for i, j in greedy) <= sum(iou[i, j] for i, j in hungarian) + 1e-9


def test_greedy_and_hungarian_differ_where_greedy_is_short_sighted() -> None:
    # Greedy takes the single best pair (0, 0) = 0.9 and then nothing is left above threshold for
    # row 1; Hungarian pairs (0, 1) and (1, 0) for a larger total.
    iou = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert match_greedy(iou, 0.5) == [(0, 0)]
    assert match_hungarian(iou, 0.5) == [(0, 1), (1, 0)]


def test_match_boxes_counts_matched_unmatched_and_classes() -> None:
    serving = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=np.float64)
    shadow = np.array([[1, 1, 11, 11], [20, 20, 30, 30], [70, 70, 80, 80], [90, 90, 95, 95]], dtype=np.float64)
    m = match_boxes(serving, shadow, serving_classes=np.array([1, 2, 3]), shadow_classes=np.array([1, 5, 3, 3]),
                    iou_threshold=0.5)
    assert (m.serving_boxes, m.shadow_boxes, m.matched) == (3, 4, 2)
    assert (m.only_serving, m.only_shadow) == (1, 2)
    assert m.class_agree == 1  # (0, 0) same class 1; (1, 1) class 2 vs 5
    assert m.iou_sum == pytest.approx(81 / 119 + 1.0)
    assert m.pairs == ((0, 0), (1, 1))
    empty = match_boxes(np.zeros((0, 4)), shadow)
    assert (empty.matched, empty.only_shadow, empty.class_agree) == (0, 4, 0)
    with pytest.raises(ValueError, match="matching"):
        match_boxes(serving, shadow, matching="best")
