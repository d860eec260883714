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
    AgreementSums,
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
         "mean_abs_diff_sum": pytest.approx(0.4), "max_abs_diff": 0.5, "top1_agree": 4, "top1_samples": 8,
         "sums": {}, "confusion": {}},
        {"output": "q", "samples": 1, "cosine_sum": 1.0, "cosine_min": 1.0,
         "mean_abs_diff_sum": 0.0, "max_abs_diff": 0.0, "top1_agree": 0, "top1_samples": 0,
         "sums": {}, "confusion": {}},
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


# -- task-aware agreement ---------------------------------------------------------------------------


def _sums(task: str, comparisons: list[dict[str, OutputComparison]], output: str) -> AgreementSums:
    acc = AgreementAccumulator()
    for c in comparisons:
        acc.add(c)
    sums = AgreementSums()
    sums.add(next(e for e in acc.to_list() if e["output"] == output))
    return sums


def test_topk_and_confusion_against_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    serving = rng.random((50, 8))
    shadow = serving + 0.3 * rng.random((50, 8))
    c = compare("classification", {"p": serving}, {"p": shadow}, {"top_k": 3})["p"]
    top_s = [int(np.argmax(r)) for r in serving]
    top_c = [int(np.argmax(r)) for r in shadow]
    in_top3 = sum(top_s[i] in sorted(range(8), key=lambda j: -shadow[i, j])[:3] for i in range(50))
    assert (c.top1_agree, c.top1_samples) == (sum(a == b for a, b in zip(top_s, top_c, strict=True)), 50)
    assert c.sums == {"top3_agree": float(in_top3), "top3_rows": 50.0}
    expected: dict[str, int] = {}
    for a, b in zip(top_s, top_c, strict=True):
        expected[f"{a}->{b}"] = expected.get(f"{a}->{b}", 0) + 1
    assert c.confusion == expected
    sums = _sums("classification", [{"p": c}], "p")
    assert sums.metrics("classification") == [("top1", c.top1_agree / 50, 50), ("top3", in_top3 / 50, 50)]
    assert sums.score("classification")[:2] == (c.top1_agree / 50, 50)


def test_topk_is_skipped_when_k_covers_every_class_and_layout_picks_the_scores_output() -> None:
    serving = {"embedding": np.array([[0.1, 0.9, 0.3]]), "probs": np.array([[0.2, 0.5, 0.3]])}
    shadow = {"embedding": np.array([[0.9, 0.1, 0.3]]), "probs": np.array([[0.2, 0.3, 0.5]])}
    default = compare("classification", serving, shadow)
    # Without a layout the first output is the scores output; 3 classes <= top_k 5: no top-5.
    assert (default["embedding"].top1_samples, default["probs"].top1_samples) == (1, 0)
    assert default["embedding"].sums == {} and default["embedding"].confusion == {"1->0": 1}
    chosen = compare("classification", serving, shadow, {"scores": "probs", "top_k": 2})
    assert (chosen["embedding"].top1_samples, chosen["probs"].top1_samples) == (0, 1)
    assert chosen["probs"].confusion == {"1->2": 1}
    assert chosen["probs"].sums == {"top2_agree": 1.0, "top2_rows": 1.0}


def test_confusion_is_bounded_and_keeps_the_frequent_pairs() -> None:
    from fleet.core.agreement import MAX_CONFUSION_PAIRS, OTHER_PAIR

    sums = AgreementSums()
    frequent = {f"{i}->{i}": 100 for i in range(10)}
    rare = {f"{i}->{i + 1}": 1 for i in range(200)}
    sums.add({"output": "p", "samples": 1, "confusion": {**frequent, **rare}})
    sums.add({"output": "p", "samples": 1, "confusion": {"0->0": 5, "7->8": 1}})
    assert len(sums.confusion) == MAX_CONFUSION_PAIRS
    assert all(sums.confusion[k] >= 100 for k in frequent)
    assert sums.confusion["0->0"] == 105
    assert sum(sums.confusion.values()) == 10 * 100 + 200 + 6  # nothing is lost, only folded
    assert sums.confusion[OTHER_PAIR] > 0


def test_sums_merge_by_name_rule_and_ignore_junk() -> None:
    a = AgreementSums()
    a.add({"output": "x", "samples": 2, "sums": {"n": 1.0, "iou_min": 0.4, "gap_max": 3.0}})
    b = AgreementSums()
    b.add({"output": "x", "samples": 1, "sums": {"n": 2.0, "iou_min": 0.2, "gap_max": 1.0, "bad": float("nan"),
                                                 "x" * 100: 1.0, "s": "text"}})
    a.merge(b)
    assert a.sums == {"n": 3.0, "iou_min": 0.2, "gap_max": 3.0}
    json.dumps(a.to_dict("x"), allow_nan=False)


def _det(boxes: list[list[float]], scores: list[float], classes: list[int]) -> dict[str, np.ndarray]:
    return {"boxes": np.array([boxes], dtype=np.float32).reshape(1, -1, 4),
            "scores": np.array([scores], dtype=np.float32), "classes": np.array([classes], dtype=np.int64)}


def test_detection_entry_counts_matches_by_hand() -> None:
    serving = _det([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]],
                   [0.9, 0.8, 0.7, 0.2], [1, 2, 3, 4])
    # Box 0 moved by 1 px (IoU 81/119), box 1 same but another class, box 2 missing, a new box;
    # the low-score box 3 is under the threshold on both sides.
    shadow = _det([[1, 1, 11, 11], [20, 20, 30, 30], [80, 80, 90, 90], [60, 60, 70, 70]],
                  [0.9, 0.8, 0.6, 0.3], [1, 5, 3, 4])
    result = compare("detection", serving, shadow, {"boxes": "boxes", "scores": "scores", "classes": "classes"})
    assert set(result) == {"boxes", "scores", "classes", "detections"}
    det = result["detections"]
    assert det.sums == {"images": 1.0, "serving_boxes": 3.0, "shadow_boxes": 3.0, "matched": 2.0,
                        "class_agree": 1.0, "class_pairs": 2.0, "iou_sum": pytest.approx(81 / 119 + 1.0),
                        "malformed": 0.0}
    assert det.confusion == {"1->1": 1, "2->5": 1}
    assert det.cosine == pytest.approx(4 / 6)
    sums = _sums("detection", [result, result], "detections")
    metrics = {name: (value, n) for name, value, n in sums.metrics("detection")}
    assert metrics["match_rate"] == (pytest.approx(2 * 4 / 12), 2)
    assert metrics["class_agreement"] == (0.5, 4)
    assert metrics["mean_iou"] == (pytest.approx((81 / 119 + 1) / 2), 4)
    assert metrics["only_serving"] == (1.0, 2) and metrics["only_shadow"] == (1.0, 2)
    assert sums.metrics("detection")[0][0] == "match_rate"
    assert sums.score("detection") == (pytest.approx(8 / 12), 2, sums.score("detection")[2])


def test_detection_layout_thresholds_formats_and_hungarian() -> None:
    # xywh boxes, a lower score threshold lets the 0.3 box in, and per-class scores [N, K, C].
    serving = {"b": np.array([[[0, 0, 10, 10], [60, 60, 10, 10]]], dtype=np.float32),
               "s": np.array([[[0.1, 0.9], [0.7, 0.3]]], dtype=np.float32)}
    shadow = {"b": np.array([[[0, 0, 10, 10], [60, 60, 10, 10]]], dtype=np.float32),
              "s": np.array([[[0.8, 0.2], [0.6, 0.3]]], dtype=np.float32)}
    layout = {"boxes": "b", "scores": "s", "box_format": "xywh", "score_threshold": 0.3, "matching": "hungarian"}
    det = compare("detection", serving, shadow, layout)["detections"]
    assert det.sums["matched"] == 2 and det.sums["class_agree"] == 1  # classes from the argmax
    assert det.confusion == {"1->0": 1, "0->0": 1}


def test_detection_with_unreadable_candidate_is_worst_case_and_never_raises() -> None:
    serving = _det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 2])
    for shadow in ({}, {"boxes": np.zeros((1, 2, 3)), "scores": np.ones((1, 2))},
                   {"boxes": np.full((1, 2, 4), np.nan), "scores": np.ones((1, 2)), "classes": np.zeros((1, 2))},
                   {"boxes": np.zeros((2, 2, 4)), "scores": np.ones((2, 2))}):
        det = compare("detection", serving, shadow)["detections"]
        assert det.sums["matched"] == 0 and det.cosine == 0.0
    det = compare("detection", serving, {})["detections"]
    assert det.sums["malformed"] == 1 and not det.shape_match
    sums = _sums("detection", [{"detections": det}], "detections")
    assert sums.score("detection")[0] == 0.0
    # Neither model sees anything: full agreement on an empty scene.
    empty = _det([[0, 0, 10, 10]], [0.1], [0])
    assert compare("detection", empty, empty)["detections"].cosine == 1.0
    # No boxes output at all: no detection entry, just the raw comparisons.
    assert "detections" not in compare("detection", {"y": np.ones(3)}, {"y": np.ones(3)})


def test_mask_iou_against_scipy_jaccard() -> None:
    from scipy.spatial.distance import jaccard

    rng = np.random.default_rng(11)
    serving = rng.random((3, 1, 8, 8)).astype(np.float32)
    shadow = np.clip(serving + rng.normal(0, 0.2, serving.shape), 0, 1).astype(np.float32)
    shadow[2] = 0.0
    serving[2] = 0.1  # both masks of image 2 are empty: they agree
    mask = compare("segmentation", {"mask": serving}, {"mask": shadow}, {"mask_threshold": 0.6})["mask"]
    ious = [1.0 - jaccard(serving[i].ravel() >= 0.6, shadow[i].ravel() >= 0.6) for i in range(2)] + [1.0]
    assert mask.sums["masks"] == 3
    assert mask.sums["mask_iou_sum"] == pytest.approx(sum(ious))
    assert mask.sums["mask_iou_min"] == pytest.approx(min(ious))
    assert mask.sums["pixel_agree"] == np.count_nonzero((serving >= 0.6) == (shadow >= 0.6))
    sums = _sums("segmentation", [{"mask": mask}], "mask")
    assert sums.score("segmentation")[:2] == (pytest.approx(sum(ious) / 3), 3)
    assert sums.metrics("segmentation")[0] == ("mean_mask_iou", pytest.approx(sum(ious) / 3), 3)
    wrong = compare("segmentation", {"mask": serving}, {"mask": serving[:, :, :4]})["mask"]
    assert wrong.sums["mask_iou_sum"] == 0.0 and wrong.sums["masks"] == 3


def test_generic_metrics_and_cosine_fallback() -> None:
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])
    sums = _sums("generic", [compare("generic", {"y": a}, {"y": b})], "y")
    assert [m[0] for m in sums.metrics("generic")] == ["mean_cosine", "mean_abs_diff", "max_abs_diff"]
    assert sums.metrics("generic")[1][1] == pytest.approx(1 / 3)
    # An output with no task sums falls back to cosine whatever the task.
    assert sums.score("detection")[2] == "mean cosine similarity"
    assert AgreementSums().score("detection")[1] == 0 and AgreementSums().metrics("detection") == []


def test_task_sums_survive_the_wire_and_merge() -> None:
    from fleet.proto import convert
    from fleet.proto.fleet.v1 import fleet_pb2 as pb

    serving = _det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 2])
    shadow = _det([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], [1, 2])
    acc = AgreementAccumulator()
    acc.add(compare("detection", serving, shadow))
    window = {"model": "m", "version": "v2", "role": "shadow", "agreement": acc.to_list()}
    msg = pb.ModelWindow()
    convert.window_to_pb(window, msg)
    back = convert.window_from_pb(pb.ModelWindow.FromString(msg.SerializeToString()))
    merged = AgreementAccumulator.merge_dicts(back["agreement"], acc.to_list())
    det = next(e for e in merged if e["output"] == "detections")
    assert det["sums"]["matched"] == 2 and det["sums"]["serving_boxes"] == 4
    assert det["confusion"] == {"1->1": 2}


def test_layout_validation_through_the_manifest() -> None:
    from fleet.core.agreement import parse_layout_text
    from fleet.core.errors import BundleError
    from fleet.core.manifest import Manifest
    from fleet.core.synthetic_models import detector, manifest_for

    base = manifest_for(detector(1), name="det", version="v1", task="detection").to_dict()
    good = {"boxes": "boxes", "scores": "scores", "classes": "classes", "score_threshold": 0.4,
            "matching": "hungarian", "box_format": "xyxy", "iou_threshold": 0.5}
    assert Manifest.from_dict({**base, "outputs_layout": good}).outputs_layout == good
    for bad, message in (({"boxes": "nope"}, "must name one of the model's outputs"),
                         ({"boxes": "scores"}, "last axis of 4"),
                         ({"mask": "boxes"}, "do not apply to task 'detection'"),
                         ({"matching": "best"}, "greedy, hungarian"),
                         ({"iou_threshold": 0}, r"\(0, 1\]"),
                         ({"score_threshold": "high"}, "finite number")):
        with pytest.raises(BundleError, match=message):
            Manifest.from_dict({**base, "outputs_layout": bad})
    with pytest.raises(BundleError, match="top_k"):
        Manifest.from_dict({**base, "task": "classification", "outputs_layout": {"top_k": 0}})
    assert parse_layout_text("detection", "boxes=boxes, score_threshold=0.25,matching=greedy") == {
        "boxes": "boxes", "score_threshold": 0.25, "matching": "greedy"}
    assert parse_layout_text("classification", '{"top_k": 3}') == {"top_k": 3}
    assert parse_layout_text("generic", "") == {}
    with pytest.raises(BundleError, match="key=value"):
        parse_layout_text("detection", "boxes")


def _session(blob: bytes) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])


def _agreement_of(task: str, serving: bytes, candidate: bytes, output: str, *, layout: dict[str, object],
                  shape: tuple[int, ...]) -> AgreementSums:
    a, b = _session(serving), _session(candidate)
    rng = np.random.default_rng(5)
    acc = AgreementAccumulator()
    for _ in range(40):
        x = {"image": rng.standard_normal(shape).astype(np.float32)}
        names = [o.name for o in a.get_outputs()]  # type: ignore[attr-defined]
        out_a = dict(zip(names, a.run(None, x), strict=True))  # type: ignore[attr-defined]
        out_b = dict(zip(names, b.run(None, x), strict=True))  # type: ignore[attr-defined]
        acc.add(compare(task, out_a, out_b, layout))
    sums = AgreementSums()
    sums.add(next(e for e in acc.to_list() if e["output"] == output))
    return sums


def test_synthetic_detector_versions_agree_and_bad_variants_do_not() -> None:
    from fleet.core import synthetic_models as sm

    layout = {"boxes": "boxes", "scores": "scores", "classes": "classes"}
    v1 = sm.detector(1)
    close = _agreement_of("detection", v1, sm.detector(2), "detections", layout=layout, shape=(2, 3, 64, 64))
    one = (1, 3, 64, 64)
    shifted = _agreement_of("detection", v1, sm.detector(2, shifted_boxes=8), "detections", layout=layout, shape=one)
    divergent = _agreement_of("detection", v1, sm.detector(3, divergent=True), "detections", layout=layout, shape=one)
    assert close.score("detection")[0] > 0.97 and close.score("detection")[1] == 80
    assert shifted.score("detection")[0] < 0.2 and divergent.score("detection")[0] < 0.2
    # The shifted candidate's raw tensors still look alike by cosine: only box matching tells.
    raw = _agreement_of("detection", v1, sm.detector(2, shifted_boxes=8), "boxes", layout=layout, shape=(1, 3, 64, 64))
    assert raw.score("detection")[0] > 0.95
    floats = _agreement_of("detection", v1, sm.detector(2, class_dtype="float32"), "detections",
                           layout=layout, shape=(1, 3, 64, 64))
    assert {m[0]: m[1] for m in floats.metrics("detection")}["class_agreement"] > 0.95


def test_synthetic_segmenter_versions_agree_and_divergent_does_not() -> None:
    from fleet.core import synthetic_models as sm

    close = _agreement_of("segmentation", sm.segmenter(1), sm.segmenter(2), "mask", layout={}, shape=(1, 3, 24, 40))
    inverted = _agreement_of("segmentation", sm.segmenter(1), sm.segmenter(3, divergent=True), "mask",
                             layout={}, shape=(1, 3, 24, 40))
    assert close.score("segmentation")[0] > 0.97
    assert inverted.score("segmentation")[0] < 0.1
