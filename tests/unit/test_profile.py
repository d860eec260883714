"""Reference profiles: the feature plan per task, profiles built from real model runs, validation,
monitoring against a profile, and learning one from traffic with bounded memory.

Given a model's manifest (and for real outputs, the model run with ONNX Runtime),
when a profile is built from reference requests and live requests are monitored against it,
then unshifted traffic scores low, shifted traffic scores high, and memory stays fixed.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from fleet.agent.drift import ProfileLearner
from fleet.core import profile as prof
from fleet.core import synthetic_models as sm
from fleet.core.errors import InvalidInputError
from fleet.core.manifest import Manifest, TensorSpec


@pytest.fixture(scope="module")
def classifier() -> tuple[Manifest, ort.InferenceSession]:
    blob = sm.classifier(1)
    manifest = sm.manifest_for(blob, name="cls", version="v1", task="classification")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return manifest, ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])


def _requests(session: ort.InferenceSession, n: int, shift: float = 0.0, seed: int = 0
              ) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = (rng.standard_normal((2, 3, 32, 32)) + shift).astype(np.float32)
        (probs,) = session.run(["probabilities"], {"input": x})
        out.append(({"input": x}, {"probabilities": probs}))
    return out


def _manifest(task: str, inputs: list[TensorSpec], outputs: list[TensorSpec], layout: dict[str, object]
              ) -> Manifest:
    base = sm.manifest_for(sm.classifier(1), name="m", version="v1")
    return Manifest(name="m", version="v1", task=task, inputs=tuple(inputs), outputs=tuple(outputs),
                    variants=base.variants, outputs_layout=layout)


def test_classifier_plan_has_channel_means_max_score_and_class(classifier: tuple[Manifest, object]) -> None:
    names = [f.name for f in prof.plan_features(classifier[0])]
    assert names == ["input:input:c0", "input:input:c1", "input:input:c2",
                     "output:probabilities:max_score", "output:probabilities:class"]


def test_detection_plan_reads_the_layout_and_thresholds_boxes() -> None:
    manifest = _manifest(
        "detection", [TensorSpec("image", "float32", (-1, 3, 64, 64))],
        [TensorSpec("boxes", "float32", (-1, 8, 4)), TensorSpec("scores", "float32", (-1, 8)),
         TensorSpec("classes", "int64", (-1, 8))],
        {"boxes": "boxes", "scores": "scores", "classes": "classes", "score_threshold": 0.5})
    specs = prof.plan_features(manifest)
    assert [f.name for f in specs][3:] == ["output:boxes:count", "output:scores:score", "output:classes:class"]
    outputs = {"boxes": np.zeros((2, 8, 4), np.float32),
               "scores": np.array([[0.9, 0.6, 0.4, 0, 0, 0, 0, 0], [0.55, 0, 0, 0, 0, 0, 0, 0]], np.float32),
               "classes": np.array([[1, 2, 3, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0]], np.int64)}
    values = prof.extract(specs, {"image": np.zeros((2, 3, 64, 64), np.float32)}, outputs)
    assert values["output:boxes:count"].tolist() == [2.0, 1.0]
    assert values["output:scores:score"].tolist() == pytest.approx([0.9, 0.6, 0.55])
    assert values["output:classes:class"].tolist() == [1, 2, 7]


def test_tabular_inputs_are_capped_and_generic_outputs_give_means() -> None:
    manifest = _manifest("generic", [TensorSpec("x", "float32", (-1, 100))],
                         [TensorSpec("y", "float32", (-1, 5))], {})
    specs = prof.plan_features(manifest)
    assert len([s for s in specs if s.kind == "input"]) == prof.MAX_INPUT_FEATURES
    assert specs[-1].name == "output:y:mean"
    values = prof.extract(specs, {"x": np.arange(200, dtype=np.float32).reshape(2, 100)},
                          {"y": np.ones((2, 5), np.float32)})
    assert values["input:x:f3"].tolist() == [3.0, 103.0] and values["output:y:mean"].tolist() == [1.0, 1.0]


def test_extraction_skips_what_does_not_fit_instead_of_raising(classifier: tuple[Manifest, object]) -> None:
    specs = prof.plan_features(classifier[0])
    assert prof.extract(specs, {"input": np.zeros((3,), np.float32)}, {}) == {}


def test_reference_profile_from_real_runs_is_valid_and_bounded(
        classifier: tuple[Manifest, ort.InferenceSession]) -> None:
    manifest, session = classifier
    profile = prof.profile_from_requests(manifest, _requests(session, 200))
    assert prof.validate_profile(profile) is profile
    assert profile["source"] == "reference" and profile["samples"] == 200
    by_name = {f["name"]: f for f in profile["features"]}
    c0 = by_name["input:input:c0"]
    assert len(c0["edges"]) + 1 == len(c0["proportions"]) <= prof.DEFAULT_BINS
    assert abs(c0["mean"]) < 0.05 and c0["min"] < c0["mean"] < c0["max"]
    cls = by_name["output:probabilities:class"]
    assert cls["categories"] == [str(i) for i in range(10)] + ["other"]
    assert sum(cls["proportions"]) == pytest.approx(1.0)


def test_monitor_scores_low_on_the_same_data_and_high_when_inputs_shift(
        classifier: tuple[Manifest, ort.InferenceSession]) -> None:
    manifest, session = classifier
    profile = prof.profile_from_requests(manifest, _requests(session, 300, seed=1))
    monitor = prof.ProfileMonitor(profile)
    for inputs, outputs in _requests(session, 300, seed=2):
        monitor.add(inputs, outputs)
    same = {d["feature"]: d for d in monitor.emit()}
    assert max(d["psi"] for d in same.values()) < 0.1
    assert same["input:input:c0"]["samples"] == 600  # two rows per request
    for inputs, outputs in _requests(session, 300, shift=2.0, seed=3):
        monitor.add(inputs, outputs)
    shifted = {d["feature"]: d for d in monitor.emit()}
    assert shifted["input:input:c1"]["psi"] > 1.0 and shifted["input:input:c1"]["ks"] > 0.9


def test_profile_validation_names_the_problem() -> None:
    good = {"source": "reference", "samples": 1, "features": [
        {"name": "a", "kind": "input", "type": "numeric", "tensor": "x", "stat": "mean", "edges": [0.0],
         "proportions": [0.5, 0.5]}]}
    prof.validate_profile(good)
    bad_edges = {**good, "features": [{**good["features"][0], "edges": [0.0, 1.0]}]}
    with pytest.raises(InvalidInputError, match="edges"):
        prof.validate_profile(bad_edges)
    bad_sum = {**good, "features": [{**good["features"][0], "proportions": [0.5, 0.6]}]}
    with pytest.raises(InvalidInputError, match="sum to 1"):
        prof.validate_profile(bad_sum)
    with pytest.raises(InvalidInputError, match="stat"):
        prof.validate_profile({**good, "features": [{**good["features"][0], "stat": "median"}]})


def test_constant_feature_gets_one_edge_and_still_detects_a_move() -> None:
    spec = prof.FeatureSpec("f", "input", "numeric", "x", "mean")
    feature = prof.build_feature(spec, np.full(100, 3.0))
    assert feature is not None and feature["edges"] == [3.0] and feature["proportions"] == [0.0, 1.0]
    monitor = prof.ProfileMonitor({"features": [feature]})
    monitor.add_values({"f": np.full(100, 1.0)})
    assert monitor.emit()[0]["psi"] > 5


def test_learner_memory_is_a_fixed_reservoir_and_the_profile_matches_the_data(
        classifier: tuple[Manifest, ort.InferenceSession]) -> None:
    manifest, session = classifier
    learner = ProfileLearner(prof.plan_features(manifest), learn_samples=500)
    expected = 500 * 8 * 5  # 5 features x 500 float64 values
    assert learner.memory_bytes() == expected
    specs = learner.specs
    for inputs, outputs in _requests(session, 600, seed=5):
        learner.add_values(prof.extract(specs, inputs, outputs))  # 1,200 rows: the reservoir overflows
    assert learner.memory_bytes() == expected and learner.done
    learned = learner.profile()
    assert learned["source"] == "learned" and learned["samples"] == 600
    monitor = prof.ProfileMonitor(learned)
    for inputs, outputs in _requests(session, 200, seed=6):
        monitor.add(inputs, outputs)
    # Same distribution: PSI is sampling noise only, about (bins - 1) * (1/n_ref + 1/n_live) ~ 0.05.
    assert max(d["psi"] for d in monitor.emit()) < 0.2
