"""Agreement maths: cosine and differences against reference implementations, top-1, mismatches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cosine as scipy_cosine_distance

from fleet.core.agreement import (
    MISMATCH_DIFF,
    AgreementAccumulator,
    OutputComparison,
    compare,
    cosine_similarity,
)


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    a = rng.standard_normal((4, 3, 5)).astype(np.float32)
    b = (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
    return a, b


def test_cosine_and_diffs_match_scipy_and_numpy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    result = compare("generic", {"y": a}, {"y": b})["y"]
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    assert result.cosine == pytest.approx(1.0 - scipy_cosine_distance(x, y), abs=1e-12)
    assert result.mean_abs_diff == pytest.approx(float(np.mean(np.abs(x - y))), rel=1e-12)
    assert result.max_abs_diff == pytest.approx(float(np.max(np.abs(x - y))), rel=1e-12)
    assert result.shape_match
    # Not a classification task: no top-1 counted.
    assert (result.top1_agree, result.top1_samples) == (0, 0)


def test_identical_outputs_agree_perfectly(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, _ = pair
    result = compare("generic", {"y": a}, {"y": a.copy()})["y"]
    assert result.cosine == pytest.approx(1.0)
    assert result.mean_abs_diff == 0.0 and result.max_abs_diff == 0.0


def test_opposite_vectors_have_cosine_minus_one() -> None:
    v = np.array([1.0, -2.0, 3.0])
    assert cosine_similarity(v, -v) == pytest.approx(-1.0)


def test_zero_vectors() -> None:
    zero = np.zeros(5)
    assert cosine_similarity(zero, zero) == 1.0
    assert cosine_similarity(zero, np.ones(5)) == 0.0
    assert cosine_similarity(np.ones(5), zero) == 0.0


def test_classification_top1_per_row() -> None:
    serving = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    shadow = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]], dtype=np.float32)
    result = compare("classification", {"p": serving}, {"p": shadow})["p"]
    # Row 0 agrees (class 1), rows 1 and 2 flip.
    assert (result.top1_agree, result.top1_samples) == (1, 3)


def test_classification_top1_counts_every_leading_index() -> None:
    rng = np.random.default_rng(0)
    serving = rng.random((2, 3, 4))
    shadow = serving.copy()
    # One of the 2 x 3 rows moves its argmax to another class.
    shadow[1, 2, (np.argmax(serving[1, 2]) + 1) % 4] = 10.0
    result = compare("classification", {"p": serving}, {"p": shadow})["p"]
    assert (result.top1_agree, result.top1_samples) == (5, 6)


def test_shape_mismatch_never_raises_and_is_worst_case() -> None:
    serving = {"p": np.ones((2, 10), dtype=np.float32)}
    shadow = {"p": np.ones((2, 5), dtype=np.float32)}
    result = compare("classification", serving, shadow)["p"]
    assert not result.shape_match
    assert result.cosine == 0.0
    assert result.mean_abs_diff == result.max_abs_diff == MISMATCH_DIFF
    assert math.isfinite(result.max_abs_diff)
    assert (result.top1_agree, result.top1_samples) == (0, 2)


def test_output_missing_from_shadow_is_a_mismatch_and_extra_ones_are_ignored() -> None:
    serving = {"a": np.ones(3), "b": np.ones(3)}
    shadow = {"a": np.ones(3), "c": np.ones(3)}
    result = compare("generic", serving, shadow)
    assert set(result) == {"a", "b"}
    assert result["a"].cosine == pytest.approx(1.0)
    assert result["b"].cosine == 0.0 and not result["b"].shape_match


def test_nan_in_shadow_gives_finite_worst_values() -> None:
    serving = np.array([[0.2, 0.8]], dtype=np.float32)
    shadow = np.array([[np.nan, 0.5]], dtype=np.float32)
    result = compare("classification", {"p": serving}, {"p": shadow})["p"]
    assert result.cosine == 0.0
    assert result.max_abs_diff == MISMATCH_DIFF
    assert all(math.isfinite(v) for v in (result.cosine, result.mean_abs_diff, result.max_abs_diff))


def test_empty_outputs_agree() -> None:
    result = compare("classification", {"p": np.zeros((0, 4))}, {"p": np.zeros((0, 4))})["p"]
    assert result.cosine == 1.0 and result.max_abs_diff == 0.0 and result.top1_samples == 0


def test_accumulator_keeps_exact_running_sums() -> None:
    acc = AgreementAccumulator()
    acc.add({"p": OutputComparison("p", 0.9, 0.1, 0.5, 3, 4)})
    acc.add([OutputComparison("p", 0.7, 0.3, 0.2, 1, 4), OutputComparison("q", 1.0, 0.0, 0.0)])
    assert acc.samples == 2
    assert acc.to_list() == [
        {"output": "p", "samples": 2, "cosine_sum": pytest.approx(1.6), "cosine_min": 0.7,
         "mean_abs_diff_sum": pytest.approx(0.4), "max_abs_diff": 0.5, "top1_agree": 4, "top1_samples": 8},
        {"output": "q", "samples": 1, "cosine_sum": 1.0, "cosine_min": 1.0,
         "mean_abs_diff_sum": 0.0, "max_abs_diff": 0.0, "top1_agree": 0, "top1_samples": 0},
    ]
    acc.reset()
    assert acc.to_list() == [] and acc.samples == 0


def test_accumulated_mismatch_stays_json_safe() -> None:
    acc = AgreementAccumulator()
    for _ in range(3):
        acc.add(compare("classification", {"p": np.ones((1, 3))}, {"p": np.ones((1, 4))}))
    json.dumps(acc.to_list(), allow_nan=False)  # raises on inf/NaN


def test_merge_dicts_equals_accumulating_everything_at_once() -> None:
    rng = np.random.default_rng(7)
    comps = [
        compare("classification", {"p": rng.random((2, 5))}, {"p": rng.random((2, 5))})
        for _ in range(6)
    ]
    first, second, both = AgreementAccumulator(), AgreementAccumulator(), AgreementAccumulator()
    for i, c in enumerate(comps):
        (first if i < 2 else second).add(c)
        both.add(c)
    merged = AgreementAccumulator.merge_dicts(first.to_list(), second.to_list())
    expected = both.to_list()
    assert len(merged) == 1
    for key, value in expected[0].items():
        assert merged[0][key] == (pytest.approx(value) if isinstance(value, float) else value)


def test_merge_dicts_with_empty_and_disjoint_outputs() -> None:
    a = [{"output": "x", "samples": 2, "cosine_sum": 1.5, "cosine_min": 0.6, "mean_abs_diff_sum": 0.2,
          "max_abs_diff": 0.3, "top1_agree": 1, "top1_samples": 2}]
    b = [{"output": "y", "samples": 1, "cosine_sum": 1.0, "cosine_min": 1.0, "mean_abs_diff_sum": 0.0,
          "max_abs_diff": 0.0, "top1_agree": 0, "top1_samples": 0},
         {"output": "x", "samples": 0, "cosine_sum": 0.0, "cosine_min": -1.0, "mean_abs_diff_sum": 0.0,
          "max_abs_diff": 0.0, "top1_agree": 0, "top1_samples": 0}]
    merged = AgreementAccumulator.merge_dicts(a, b)
    assert [m["output"] for m in merged] == ["x", "y"]
    # An empty entry must not drag cosine_min down.
    assert merged[0]["cosine_min"] == 0.6 and merged[0]["samples"] == 2
    assert AgreementAccumulator.merge_dicts([], []) == []
