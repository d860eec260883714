"""ONNX Runtime sessions checked against their manifest, with real models and a real runtime."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from fleet.agent.runtime import LoadedModel, load_model
from fleet.core import synthetic_models as sm
from fleet.core.errors import InferenceInputError, ModelLoadError
from fleet.core.manifest import Manifest, TensorSpec

CPU = ["CPUExecutionProvider"]


def _write(tmp_path: Path, model: bytes, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model)
    return path


@pytest.fixture
def classifier(tmp_path: Path) -> tuple[Path, Manifest]:
    model = sm.classifier(1)
    return _write(tmp_path, model), sm.manifest_for(model, name="cls", version="1")


@pytest.fixture
def dynamic(tmp_path: Path) -> LoadedModel:
    model = sm.dynamic_two_output()
    manifest = sm.manifest_for(model, name="seg", version="1", task="segmentation")
    return load_model(_write(tmp_path, model, "dyn.onnx"), manifest, CPU)


def _with_inputs(manifest: Manifest, *specs: TensorSpec) -> Manifest:
    return dataclasses.replace(manifest, inputs=tuple(specs))


def test_load_warm_up_and_run(classifier: tuple[Path, Manifest]) -> None:
    path, manifest = classifier
    loaded = load_model(path, manifest, CPU)
    assert (loaded.name, loaded.version, loaded.providers) == ("cls", "1", CPU)
    latencies = loaded.warmup(runs=2)
    assert len(latencies) == 2 and all(t > 0 for t in latencies)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    out = loaded.run({"input": x})
    assert list(out) == ["probabilities"]
    assert out["probabilities"].shape == (4, 10)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_session_is_configured_not_to_starve_its_neighbours(classifier: tuple[Path, Manifest]) -> None:
    path, manifest = classifier
    opts = load_model(path, manifest, CPU, threads=1).session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_unavailable_provider_falls_back_to_cpu(classifier: tuple[Path, Manifest]) -> None:
    path, manifest = classifier
    loaded = load_model(path, manifest, ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    assert loaded.providers == CPU


def test_non_onnx_and_missing_files_are_load_errors(
    tmp_path: Path, classifier: tuple[Path, Manifest]
) -> None:
    _, manifest = classifier
    junk = _write(tmp_path, b"PK\x03\x04 this is a zip, not a model", "junk.onnx")
    with pytest.raises(ModelLoadError, match=r"cls:1: junk.onnx is not an ONNX model"):
        load_model(junk, manifest, CPU)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "absent.onnx", manifest, CPU)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TensorSpec("pixels", "float32", (-1, 3, 32, 32)), "in the manifest but not in the model: pixels"),
        (TensorSpec("input", "float16", (-1, 3, 32, 32)), "manifest says float16, model has float32"),
        (TensorSpec("input", "float32", (-1, 3, 64, 64)), "dim 2: manifest says 64, model has 32"),
        (TensorSpec("input", "float32", (-1, 3, -1, 32)), "dim 2: manifest says dynamic"),
        (TensorSpec("input", "float32", (-1, 3, 1024)), "manifest rank 3"),
    ],
)
def test_manifest_mismatch_is_a_load_error(
    classifier: tuple[Path, Manifest], spec: TensorSpec, message: str
) -> None:
    path, manifest = classifier
    with pytest.raises(ModelLoadError, match="does not match its manifest") as info:
        load_model(path, _with_inputs(manifest, spec), CPU)
    assert message in str(info.value)


def test_manifest_missing_an_output_is_a_load_error(dynamic: LoadedModel) -> None:
    manifest = dataclasses.replace(dynamic.manifest, outputs=dynamic.manifest.outputs[:1])
    with pytest.raises(ModelLoadError, match="outputs in the model but not in the manifest: mask"):
        load_model(dynamic.path, manifest, CPU)


def test_manifest_fixed_dim_over_a_symbolic_model_dim_is_accepted(dynamic: LoadedModel) -> None:
    # The model takes any size; a manifest may promise less (clients must send 3x16x16).
    manifest = _with_inputs(dynamic.manifest, TensorSpec("image", "float32", (-1, 3, 16, 16)))
    loaded = load_model(dynamic.path, manifest, CPU)
    with pytest.raises(InferenceInputError, match=r"does not fit \[-1, 3, 16, 16\]"):
        loaded.validate_inputs({"image": np.zeros((1, 3, 8, 8), np.float32)})


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input": np.zeros((1, 3, 16, 16), np.float32)}, "shape [1, 3, 16, 16] does not fit"),
        ({"input": np.zeros((3, 32, 32), np.float32)}, "expected rank 4"),
        ({"input": np.zeros((1, 3, 32, 32), np.float64)}, "expected dtype float32, got float64"),
        ({}, "missing input(s) 'input'"),
        ({"input": np.zeros((1, 3, 32, 32), np.float32), "extra": np.zeros(1)}, "unknown input(s) 'extra'"),
    ],
)
def test_bad_requests_are_input_errors(
    classifier: tuple[Path, Manifest], inputs: dict[str, np.ndarray], message: str
) -> None:
    path, manifest = classifier
    loaded = load_model(path, manifest, CPU)
    with pytest.raises(InferenceInputError) as info:
        loaded.run(inputs)
    assert message in str(info.value)


def test_dynamic_dims_take_two_sizes_and_both_outputs(dynamic: LoadedModel) -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 8, 8), (3, 3, 20, 14)]:
        x = rng.standard_normal(shape).astype(np.float32)
        out = dynamic.run({"image": x})
        assert out["channel_mean"].shape == (shape[0], 3)
        assert out["mask"].shape == (shape[0], 1, shape[2], shape[3])
        # channel_mean is the spatial mean times a gain close to 1.
        np.testing.assert_allclose(out["channel_mean"], x.mean(axis=(2, 3)), rtol=0.5, atol=0.05)
    only_mask = dynamic.run({"image": np.zeros((1, 3, 4, 4), np.float32)}, ["mask"])
    assert list(only_mask) == ["mask"]
    with pytest.raises(InferenceInputError, match="no output"):
        dynamic.run({"image": np.zeros((1, 3, 4, 4), np.float32)}, ["nope"])


def test_concurrent_runs_give_the_same_answers(classifier: tuple[Path, Manifest]) -> None:
    path, manifest = classifier
    loaded = load_model(path, manifest, CPU)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = loaded.run({"input": x})["probabilities"]
    failures: list[str] = []

    def worker() -> None:
        for _ in range(25):
            got = loaded.run({"input": x})["probabilities"]
            if not np.array_equal(got, expected):
                failures.append("different answer")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_warmup_failure_is_a_load_error(dynamic: LoadedModel) -> None:
    # A version that cannot answer its warm-up request must not be switched in.
    with pytest.raises(ModelLoadError, match="warm-up run failed"):
        dynamic.warmup(inputs={"image": np.zeros((1, 3, 2, 2), np.float64)})
