"""Pictures as reference data: each becomes the tensor the model's input declares.

Images are written with Pillow and read back through `fleet.cli.images` and the reference-folder
reader of `fleet models push --reference`; the profile built from pictures equals the one built
from the same pixels saved as `.npy` by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fleet.cli.client import CliError
from fleet.cli.drift import _reference_requests, reference_profile
from fleet.cli.images import image_tensor
from fleet.core import synthetic_models as sm
from fleet.core.manifest import TensorSpec


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def _pixels(seed: int, height: int = 32, width: int = 32, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels == 3 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_float_nchw_input_gets_unit_scaled_channels_first(tmp_path: Path) -> None:
    pixels = _pixels(1)
    tensor = image_tensor(_png(tmp_path / "a.png", pixels), TensorSpec("input", "float32", (-1, 3, 32, 32)))
    assert tensor.shape == (1, 3, 32, 32) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0], pixels.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)


def test_mean_and_std_normalise_per_channel(tmp_path: Path) -> None:
    pixels = _pixels(2)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tensor = image_tensor(_png(tmp_path / "a.png", pixels), TensorSpec("input", "float32", (1, 3, 32, 32)),
                          mean=mean, std=std)
    expected = ((pixels / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    np.testing.assert_allclose(tensor[0], expected, rtol=1e-5, atol=1e-5)


def test_uint8_nhwc_greyscale_keeps_raw_values_and_is_resized(tmp_path: Path) -> None:
    pixels = _pixels(3, height=48, width=64, channels=1)
    path = _png(tmp_path / "g.png", pixels)
    tensor = image_tensor(path, TensorSpec("frame", "uint8", (-1, 24, 32, 1)))
    assert tensor.shape == (1, 24, 32, 1) and tensor.dtype == np.uint8
    with Image.open(path) as img:
        expected = np.asarray(img.resize((32, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(tensor[0, :, :, 0], expected)


def test_dynamic_height_and_width_keep_the_picture_size(tmp_path: Path) -> None:
    tensor = image_tensor(_png(tmp_path / "a.png", _pixels(4, height=20, width=28)),
                          TensorSpec("input", "float32", (-1, 3, -1, -1)))
    assert tensor.shape == (1, 3, 20, 28)


@pytest.mark.parametrize(("spec", "options", "message"), [
    (TensorSpec("x", "float32", (-1, 16)), {}, "needs a 4-D input with 1 or 3 channels"),
    (TensorSpec("x", "float32", (-1, 3, 8, 8)), {"mean": [0.1, 0.2]}, "takes 1 or 3 numbers"),
    (TensorSpec("x", "float32", (-1, 3, 8, 8)), {"std": [0.0]}, "must be positive"),
    (TensorSpec("x", "uint8", (-1, 3, 8, 8)), {"mean": [0.5]}, "apply to float inputs only"),
    (TensorSpec("x", "bool", (-1, 3, 8, 8)), {}, "needs a float or integer input"),
])
def test_unusable_inputs_and_options_are_refused(tmp_path: Path, spec: TensorSpec, options: dict[str, list[float]],
                                                 message: str) -> None:
    with pytest.raises(CliError, match=message):
        image_tensor(_png(tmp_path / "a.png", _pixels(5, 8, 8)), spec, **options)


def test_a_file_that_is_not_an_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(CliError, match=r"cannot read reference image .*broken\.jpg"):
        image_tensor(bad, TensorSpec("input", "float32", (-1, 3, 32, 32)))


def test_profile_from_pictures_equals_profile_from_the_same_pixels_as_npy(tmp_path: Path) -> None:
    model = tmp_path / "cls.onnx"
    model.write_bytes(sm.classifier(1))
    manifest = sm.manifest_for(model.read_bytes(), name="cls", version="v1")
    images, arrays = tmp_path / "images", tmp_path / "arrays"
    images.mkdir()
    arrays.mkdir()
    for i in range(40):
        pixels = _pixels(100 + i)
        _png(images / f"{i:03d}.png", pixels)
        np.save(arrays / f"{i:03d}.npy", (pixels.transpose(2, 0, 1)[np.newaxis] / 255.0).astype(np.float32))
    assert len(_reference_requests(images, manifest)) == 40
    from_images = reference_profile(model, images, manifest)
    from_arrays = reference_profile(model, arrays, manifest)
    assert from_images["source"] == "reference" and from_images["samples"] == 40
    assert from_images == from_arrays


def test_sub_folders_may_mix_pictures_and_arrays(tmp_path: Path) -> None:
    manifest = sm.manifest_for(sm.classifier(1), name="cls", version="v1")
    for i in range(3):
        sub = tmp_path / f"req{i}"
        sub.mkdir()
        if i % 2:
            _png(sub / "input.png", _pixels(i))
        else:
            np.save(sub / "input.npy", np.zeros((1, 3, 32, 32), np.float32))
    requests = _reference_requests(tmp_path, manifest)
    assert [r["input"].shape for r in requests] == [(1, 3, 32, 32)] * 3
    assert float(requests[1]["input"].max()) > 0.5 and float(requests[0]["input"].max()) == 0.0
