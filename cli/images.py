"""Image files as model input tensors, for reference data given as pictures (`--reference DIR`).

Rules this module enforces:

- the tensor follows the model's declared input: a 4-D input whose channel dim is 1 or 3 at
  position 1 (`[N, C, H, W]`) or 3 (`[N, H, W, C]`); anything else is refused with the shape in
  the message, since a picture has no obvious meaning for it;
- each image is decoded with Pillow, converted to RGB (C = 3) or greyscale (C = 1), resized to
  the input's fixed H and W (bilinear; a dynamic H or W keeps the picture's own size) and given a
  batch dim of 1;
- pixel values: integer inputs get the raw 0-255 values; float inputs get value / 255, then
  `(x - mean) / std` per channel when the model expects normalised inputs (`mean`, `std` given
  as 1 or C numbers). The profile then describes inputs as the application sends them, provided
  it prepares its tensors the same way;
- a file that is not a readable image gets an error naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.cli.client import CliError

if TYPE_CHECKING:
    import numpy as np

    from fleet.core.manifest import TensorSpec

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _layout(spec: TensorSpec) -> tuple[str, int, int, int]:
    """("nchw" | "nhwc", C, H, W) of an image-like input; H/W are -1 when dynamic."""
    shape = tuple(spec.shape)
    if len(shape) == 4 and shape[1] in (1, 3):
        return "nchw", shape[1], shape[2], shape[3]
    if len(shape) == 4 and shape[3] in (1, 3):
        return "nhwc", shape[3], shape[1], shape[2]
    raise CliError(f"input {spec.name!r} has shape {list(shape)}: image reference data needs a 4-D input with 1 or 3 "
                   "channels ([N, C, H, W] or [N, H, W, C]); give .npy files instead", code=2)


def _per_channel(values: Sequence[float] | None, channels: int, what: str) -> np.ndarray | None:
    import numpy as np

    if not values:
        return None
    if len(values) not in (1, channels):
        raise CliError(f"--reference-{what} takes 1 or {channels} numbers (one per channel), got {len(values)}", code=2)
    array = np.asarray(values, dtype=np.float32)
    if what == "std" and not np.all(array > 0):
        raise CliError("--reference-std values must be positive", code=2)
    return np.broadcast_to(array, (channels,)).copy()


def image_tensor(path: Path, spec: TensorSpec, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> np.ndarray:
    """The picture at `path` as one request's tensor for `spec` (see the module rules)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    layout, channels, height, width = _layout(spec)
    try:
        with Image.open(path) as opened:
            picture: Image.Image = opened.convert("RGB" if channels == 3 else "L")
        size = (width if width > 0 else picture.width, height if height > 0 else picture.height)
        if size != picture.size:
            picture = picture.resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(picture, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CliError(f"cannot read reference image {path}: {exc}", code=2) from exc
    hwc = pixels.reshape(pixels.shape[0], pixels.shape[1], channels)
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        values = hwc.astype(np.float32) / 255.0
        shift, scale = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
        if shift is not None:
            values = values - shift
        if scale is not None:
            values = values / scale
        tensor = values.astype(dtype)
    elif dtype.kind in "iu":
        if mean or std:
            raise CliError(f"input {spec.name!r} is {spec.dtype}: --reference-mean/--reference-std apply to float "
                           "inputs only", code=2)
        tensor = hwc.astype(dtype)
    else:
        raise CliError(f"input {spec.name!r} is {spec.dtype}: image reference data needs a float or integer input",
                       code=2)
    if layout == "nchw":
        tensor = tensor.transpose(2, 0, 1)
    return tensor[np.newaxis, ...]
