"""Synthetic ONNX models: valid, deterministic, and with the behaviour rollouts must tell apart."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fleet.core import synthetic_models as sm
from fleet.core.errors import BundleError
from fleet.core.manifest import Manifest, TensorSpec


def _session(model: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((128, 3, 32, 32)).astype(np.float32)


def test_models_are_valid_and_deterministic() -> None:
    for build in (lambda: sm.classifier(1), lambda: sm.classifier(1, slow_factor=1), sm.dynamic_two_output):
        model_bytes = build()
        assert model_bytes == build()
        model = onnx.load_from_string(model_bytes)
        onnx.checker.check_model(model)
        assert model.ir_version == sm.IR_VERSION
        assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}
    assert sm.classifier(1) != sm.classifier(2)


def test_classifier_signature() -> None:
    inputs, outputs = sm.signature(sm.classifier(1, num_classes=5))
    assert inputs == [TensorSpec("input", "float32", (-1, 3, 32, 32))]
    assert outputs == [TensorSpec("probabilities", "float32", (-1, 5))]


def test_dynamic_two_output_signature_and_shapes() -> None:
    model = sm.dynamic_two_output()
    inputs, outputs = sm.signature(model)
    assert inputs == [TensorSpec("image", "float32", (-1, 3, -1, -1))]
    assert outputs == [TensorSpec("channel_mean", "float32", (-1, 3)),
                       TensorSpec("mask", "float32", (-1, 1, -1, -1))]
    session = _session(model)
    for shape in [(1, 3, 5, 7), (2, 3, 16, 12)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        mean, mask = session.run(None, {"image": x})
        assert mean.shape == (shape[0], 3)
        assert mask.shape == (shape[0], 1, shape[2], shape[3])
        assert np.all((mask > 0) & (mask < 1))


def test_good_versions_agree_and_divergent_does_not(images: np.ndarray) -> None:
    top1 = {
        key: _session(model).run(None, {"input": images})[0].argmax(-1)
        for key, model in {
            "v1": sm.classifier(1), "v2": sm.classifier(2), "bad": sm.classifier(2, divergent=True)
        }.items()
    }
    assert np.mean(top1["v1"] == top1["v2"]) >= 0.95
    assert np.mean(top1["v1"] == top1["bad"]) <= 0.1
    # The classifier's answer depends on the input: no single class takes most images.
    assert np.bincount(top1["v1"], minlength=10).max() < 0.5 * len(images)


def test_slow_factor_keeps_answers_and_costs_time(images: np.ndarray) -> None:
    fast, slow = _session(sm.classifier(1)), _session(sm.classifier(1, slow_factor=2))
    x = images[:1]
    np.testing.assert_allclose(fast.run(None, {"input": x})[0], slow.run(None, {"input": x})[0], atol=1e-6)

    def best_ms(session: ort.InferenceSession) -> float:
        times = []
        for _ in range(15):
            start = time.perf_counter()
            session.run(None, {"input": x})
            times.append(time.perf_counter() - start)
        return min(times) * 1000

    best_ms(fast), best_ms(slow)  # warm both first
    assert best_ms(slow) > 3 * best_ms(fast)


def test_signature_rejects_garbage_and_unsupported_types() -> None:
    with pytest.raises(BundleError, match="not a valid ONNX model"):
        sm.signature(b"definitely not onnx")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "g",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BundleError, match="STRING"):
        sm.signature(model.SerializeToString())


def test_manifest_for_round_trips() -> None:
    model = sm.dynamic_two_output()
    manifest = sm.manifest_for(model, name="seg", version="1", task="segmentation")
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.variants[0].size == len(model)


def test_random_inputs_fit_their_specs() -> None:
    specs = [TensorSpec("image", "float32", (-1, 3, -1, -1)), TensorSpec("k", "int64", (2,)),
             TensorSpec("m", "bool", (-1,))]
    fixed = sm.random_inputs(specs, np.random.default_rng(0), dynamic_size=6, batch_size=2)
    assert fixed["image"].shape == (2, 3, 6, 6) and fixed["image"].dtype == np.float32
    assert fixed["k"].dtype == np.int64 and fixed["m"].dtype == np.bool_
    rng = np.random.default_rng(1)
    shapes = {sm.random_inputs(specs[:1], rng, randomize_dynamic=True)["image"].shape for _ in range(20)}
    assert len(shapes) > 1
    assert all(s[0] == 1 and s[1] == 3 and 4 <= s[2] <= 32 for s in shapes)


def test_classifier_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sm.classifier(1, input_shape=(-1, 3, 30, 30))
    with pytest.raises(ValueError):
        sm.classifier(1, num_classes=1)
