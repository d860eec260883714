"""Small, real ONNX models built in code, for tests, benchmarks and `fleet demo`.

Nothing is downloaded: every model is assembled with `onnx.helper` from weights drawn from a
seeded generator, so the same arguments always give the same bytes. The models are chosen to
exercise what a rollout must tell apart:

- `classifier(seed)` and `classifier(seed + 1)` share base weights and differ by tiny noise, so
  two "good" versions agree closely (top-1 agreement near 100 %);
- `classifier(..., divergent=True)` negates the class weights, so its argmax disagrees almost
  always;
- `classifier(..., slow_factor=k)` adds real compute (a chain of 256x256 matrix products on the
  feature map) whose result reaches the output, so a runtime cannot prune it and latency grows
  measurably with k while the answers stay the same;
- `dynamic_two_output()` has a `[-1, 3, -1, -1]` input and two outputs of different shapes;
- `detector(seed)` answers `boxes [N, K, 4]` (xyxy pixels), `scores [N, K]`, `classes [N, K]`
  computed from the image; two seeds match box for box, `divergent=True` picks other patches and
  `shifted_boxes=p` moves every box by p pixels (raw tensors still alike, IoU matching not);
- `segmenter(seed)` answers a `mask [N, 1, H, W]` of blobs; `divergent=True` inverts it;
- `external_weights_model(location)` keeps its weights in a file outside the model, the kind of
  model bundles refuse (for the tests of that rule).

`signature()` reads a model's input/output contract from its graph, `manifest_for()` wraps it in a
one-variant manifest, and `random_inputs()` makes request tensors that fit a signature (dynamic
dims get small sizes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fleet.core.errors import BundleError
from fleet.core.manifest import DTYPES, Manifest, TensorSpec, Variant

OPSET = 17
# IR 8 is the lowest that carries opset 17; older runtimes on edge devices still read it.
IR_VERSION = 8
# Weights every classifier version starts from; a version's seed only adds noise on top.
_BASE_SEED = 20240917
# Relative size of the per-version noise of a "good" classifier version.
_VERSION_NOISE = 0.001
_SLOW_WIDTH = 256
_SLOW_LAYERS_PER_FACTOR = 8

_ONNX_TO_DTYPE: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT8: "int8",
    TensorProto.INT16: "int16",
    TensorProto.INT32: "int32",
    TensorProto.INT64: "int64",
    TensorProto.UINT8: "uint8",
    TensorProto.UINT16: "uint16",
    TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64",
    TensorProto.BOOL: "bool",
}


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _finish(graph: onnx.GraphProto, doc: str) -> bytes:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="fleet.core.synthetic_models",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _shape_dims(shape: Sequence[int], symbols: Sequence[str]) -> list[int | str]:
    dims: list[int | str] = []
    for i, dim in enumerate(shape):
        dims.append(symbols[i] if dim == -1 else int(dim))
    return dims


def classifier(
    version_seed: int,
    num_classes: int = 10,
    input_shape: Sequence[int] = (-1, 3, 32, 32),
    slow_factor: int = 0,
    divergent: bool = False,
    *,
    input_name: str = "input",
    output_name: str = "probabilities",
    channels: int = 16,
) -> bytes:
    """A small image classifier: Conv 3x3 -> Relu -> 4x4 average pool -> Gemm -> Softmax.

    `input_shape` is `[N, C, H, W]`; N may be -1 (dynamic batch), C/H/W must be fixed and H, W
    multiples of 4. The class weights are centred per class so that the argmax depends on the
    input rather than on a constant bias (otherwise every image would get the same class).
    """
    if len(input_shape) != 4:
        raise ValueError("input_shape must be [N, C, H, W]")
    n, c, h, w = (int(d) for d in input_shape)
    if min(c, h, w) <= 0 or h % 4 or w % 4:
        raise ValueError("C, H and W must be fixed; H and W multiples of 4")
    if n == 0 or n < -1:
        raise ValueError("N must be positive or -1")
    if num_classes < 2 or slow_factor < 0 or channels < 1:
        raise ValueError("num_classes >= 2, slow_factor >= 0 and channels >= 1 are required")
    if slow_factor and (channels * h * w) % _SLOW_WIDTH:
        raise ValueError(f"slow_factor needs channels*H*W to be a multiple of {_SLOW_WIDTH}")

    base = np.random.default_rng(_BASE_SEED)
    conv_w = base.standard_normal((channels, c, 3, 3))
    # Unit-norm filters and no bias: on standard-normal pixels every feature has the same mean,
    # so centring the class weights below removes the constant part of every logit.
    conv_w /= np.linalg.norm(conv_w.reshape(channels, -1), axis=1).reshape(channels, 1, 1, 1)
    conv_b = np.zeros(channels)
    features = channels * 16  # 4x4 pooled cells per channel
    gemm_w = base.standard_normal((features, num_classes))
    gemm_w -= gemm_w.mean(axis=0, keepdims=True)  # centred: argmax follows the input
    gemm_w *= 4.0 / np.sqrt(features)
    gemm_b = np.zeros(num_classes)

    noise = np.random.default_rng([_BASE_SEED, version_seed])
    conv_w = conv_w + _VERSION_NOISE * np.abs(conv_w).mean() * noise.standard_normal(conv_w.shape)
    gemm_w = gemm_w + _VERSION_NOISE * np.abs(gemm_w).mean() * noise.standard_normal(gemm_w.shape)
    if divergent:
        # Negated class scores turn the best class into the worst: top-1 disagrees on ~every row.
        gemm_w, gemm_b = -gemm_w, -gemm_b

    inits = [
        _init("conv_w", conv_w.astype(np.float32)),
        _init("conv_b", conv_b.astype(np.float32)),
        _init("gemm_w", gemm_w.astype(np.float32)),
        _init("gemm_b", gemm_b.astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", [input_name, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("AveragePool", ["relu"], ["pooled"], kernel_shape=[h // 4, w // 4],
                         strides=[h // 4, w // 4]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "gemm_w", "gemm_b"], ["logits0"]),
    ]
    logits = "logits0"
    if slow_factor:
        # Extra compute that a runtime cannot prune: its result is added to the logits, scaled so
        # far down (1e-30 on values of order 1e3) that it vanishes in float32 rounding. The matrix
        # is orthogonal so the chain neither overflows nor underflows whatever its length.
        q, _ = np.linalg.qr(np.random.default_rng([_BASE_SEED, 7]).standard_normal((_SLOW_WIDTH,) * 2))
        inits += [
            _init("slow_q", q.astype(np.float32)),
            _init("slow_shape", np.array([0, -1, _SLOW_WIDTH], dtype=np.int64)),
            _init("slow_axis2", np.array([2], dtype=np.int64)),
            _init("slow_axis1", np.array([1], dtype=np.int64)),
            _init("slow_scale", np.array(1e-30, dtype=np.float32)),
        ]
        nodes.append(helper.make_node("Reshape", ["relu", "slow_shape"], ["slow_0"]))
        layers = slow_factor * _SLOW_LAYERS_PER_FACTOR
        for i in range(layers):
            nodes.append(helper.make_node("MatMul", [f"slow_{i}", "slow_q"], [f"slow_{i + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"slow_{layers}", "slow_axis2"], ["slow_r2"], keepdims=0),
            helper.make_node("ReduceSum", ["slow_r2", "slow_axis1"], ["slow_r1"], keepdims=1),
            helper.make_node("Mul", ["slow_r1", "slow_scale"], ["slow_tiny"]),
            helper.make_node("Add", ["logits0", "slow_tiny"], ["logits1"]),
        ]
        logits = "logits1"
    nodes.append(helper.make_node("Softmax", [logits], [output_name], axis=-1))

    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                       _shape_dims((n, c, h, w), ("N", "C", "H", "W")))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                       _shape_dims((n, num_classes), ("N", "K")))],
        initializer=inits,
    )
    doc = f"synthetic classifier seed={version_seed} slow_factor={slow_factor} divergent={divergent}"
    return _finish(graph, doc)


def dynamic_two_output(
    version_seed: int = 0,
    divergent: bool = False,
    *,
    input_name: str = "image",
) -> bytes:
    """Input `[-1, 3, -1, -1]` float32; outputs `channel_mean` `[N, 3]` and `mask` `[N, 1, H, W]`.

    `channel_mean` is the per-channel spatial mean times a per-channel gain; `mask` is a sigmoid
    of a 1x1 convolution, so every pixel depends on the input.
    """
    base = np.random.default_rng([_BASE_SEED, 2])
    gain = 1.0 + 0.1 * base.standard_normal(3)
    mask_w = base.standard_normal((1, 3, 1, 1))
    noise = np.random.default_rng([_BASE_SEED, 2, version_seed])
    gain = gain + _VERSION_NOISE * noise.standard_normal(3)
    mask_w = mask_w + _VERSION_NOISE * noise.standard_normal(mask_w.shape)
    if divergent:
        gain, mask_w = -gain, -mask_w
    inits = [
        _init("gain", gain.astype(np.float32)),
        _init("mask_w", mask_w.astype(np.float32)),
        _init("mask_b", np.zeros(1, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", [input_name], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["gap_flat"], axis=1),
        helper.make_node("Mul", ["gap_flat", "gain"], ["channel_mean"]),
        helper.make_node("Conv", [input_name, "mask_w", "mask_b"], ["mask_logit"]),
        helper.make_node("Sigmoid", ["mask_logit"], ["mask"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_two_output",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info("channel_mean", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, "H", "W"]),
        ],
        initializer=inits,
    )
    return _finish(graph, f"synthetic dynamic two-output model seed={version_seed} divergent={divergent}")


def _spec(value: onnx.ValueInfoProto, where: str) -> TensorSpec:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise BundleError(f"{where} {value.name!r} is not a tensor; only tensors are served")
    dtype = _ONNX_TO_DTYPE.get(tensor.elem_type)
    if dtype is None:
        type_name = TensorProto.DataType.Name(tensor.elem_type)
        raise BundleError(
            f"{where} {value.name!r} has element type {type_name}, which is not served "
            f"(supported: {', '.join(DTYPES)})"
        )
    if not tensor.HasField("shape"):
        raise BundleError(f"{where} {value.name!r} has no shape in the graph; give the shape explicitly")
    dims = tuple(
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim
    )
    return TensorSpec(name=value.name, dtype=dtype, shape=dims)


def signature(model_bytes: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The (inputs, outputs) a model's graph declares; symbolic or unknown dims become -1."""
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # onnx raises DecodeError or a bare message depending on version
        raise BundleError(f"not a valid ONNX model: {exc}") from exc
    graph = model.graph
    # Old exporters list initializers among the inputs; they are weights, not request tensors.
    weights = {init.name for init in graph.initializer}
    inputs = [_spec(v, "input") for v in graph.input if v.name not in weights]
    outputs = [_spec(v, "output") for v in graph.output]
    if not inputs or not outputs:
        raise BundleError("the ONNX graph declares no inputs or no outputs")
    return inputs, outputs


def manifest_for(
    model_bytes: bytes,
    *,
    name: str,
    version: str,
    task: str = "classification",
    file: str = "model.onnx",
    hardware: str = "any",
    description: str = "",
) -> Manifest:
    """A manifest whose signature, hash and size are read from `model_bytes` (one variant)."""
    inputs, outputs = signature(model_bytes)
    return Manifest(
        name=name,
        version=version,
        task=task,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        variants=(
            Variant(hardware=hardware, file=file, sha256=hashlib.sha256(model_bytes).hexdigest(),
                    size=len(model_bytes)),
        ),
        description=description,
    )


def concrete_shape(
    spec_shape: Sequence[int],
    rng: np.random.Generator | None = None,
    *,
    dynamic_size: int = 8,
    batch_size: int = 1,
    randomize_dynamic: bool = False,
    dynamic_range: tuple[int, int] = (4, 32),
) -> tuple[int, ...]:
    """A request shape fitting `spec_shape`: a dynamic leading dim is the batch, others get a size."""
    dims: list[int] = []
    for i, dim in enumerate(spec_shape):
        if dim != -1:
            dims.append(int(dim))
        elif i == 0:
            dims.append(batch_size)
        elif randomize_dynamic and rng is not None:
            dims.append(int(rng.integers(dynamic_range[0], dynamic_range[1] + 1)))
        else:
            dims.append(dynamic_size)
    return tuple(dims)


def random_array(dtype: str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random values of a served dtype: standard normal floats, small non-negative integers."""
    np_dtype = np.dtype(dtype)
    if np_dtype.kind == "f":
        return rng.standard_normal(tuple(shape)).astype(np_dtype)
    if np_dtype.kind == "b":
        return rng.integers(0, 2, size=tuple(shape)).astype(np.bool_)
    return rng.integers(0, 10, size=tuple(shape)).astype(np_dtype)


def random_inputs(
    specs: Sequence[TensorSpec],
    rng: np.random.Generator | None = None,
    **shape_options: Any,
) -> dict[str, np.ndarray]:
    """One request's tensors for `specs`. Dims shared by name are not linked: give fixed dims
    in the spec where two inputs must agree. `shape_options` go to `concrete_shape`."""
    rng = rng or np.random.default_rng(0)
    return {s.name: random_array(s.dtype, concrete_shape(s.shape, rng, **shape_options), rng) for s in specs}


def detector(
    version_seed: int,
    divergent: bool = False,
    max_boxes: int = 8,
    *,
    input_shape: Sequence[int] = (-1, 3, 64, 64),
    cell: int = 16,
    num_classes: int = 4,
    shifted_boxes: float = 0.0,
    class_dtype: str = "int64",
    input_name: str = "image",
) -> bytes:
    """A small anchor-grid detector: one candidate box per `cell` x `cell` patch, the best kept.

    A patchify convolution (kernel = stride = `cell`) gives each patch a score logit, four box
    offsets and class logits, all computed from the pixels. The box is the patch's anchor moved
    and resized by `tanh` of its offsets; the score is a sigmoid (about half the patches of a
    standard-normal image score over 0.5); the class is the argmax. `TopK` keeps the
    `max_boxes` best patches, so the outputs are `boxes [N, K, 4]` (xyxy, pixels), `scores
    [N, K]` and `classes [N, K]` (`class_dtype` int64 or float32), sorted by score.

    Two seeds share base weights and differ by tiny noise, so their detections match almost
    one to one. `divergent=True` negates the score weights, so the candidate prefers exactly the
    patches the serving model ranks low (few boxes in common); `shifted_boxes=p` moves every box
    right by p pixels (p = cell/2 drops a box's IoU with its twin to 1/3, under the usual 0.5).
    """
    if len(input_shape) != 4:
        raise ValueError("input_shape must be [N, C, H, W]")
    n, c, h, w = (int(d) for d in input_shape)
    if min(c, h, w) <= 0 or cell < 2 or h % cell or w % cell:
        raise ValueError("C, H and W must be fixed, and H and W multiples of `cell`")
    if n == 0 or n < -1:
        raise ValueError("N must be positive or -1")
    grid_h, grid_w = h // cell, w // cell
    patches = grid_h * grid_w
    if not 1 <= max_boxes <= patches:
        raise ValueError(f"max_boxes must be between 1 and the number of patches ({patches})")
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2")
    if class_dtype not in ("int64", "float32"):
        raise ValueError("class_dtype must be int64 or float32")

    heads = 5 + num_classes  # score, 4 box offsets, class logits
    base = np.random.default_rng([_BASE_SEED, 3])
    conv_w = base.standard_normal((heads, c, cell, cell))
    # Unit-norm filters: on standard-normal pixels every head output is standard normal, so the
    # score logit below spreads over the sigmoid's range instead of saturating.
    conv_w /= np.linalg.norm(conv_w.reshape(heads, -1), axis=1).reshape(heads, 1, 1, 1)
    noise = np.random.default_rng([_BASE_SEED, 3, version_seed])
    conv_w = conv_w + _VERSION_NOISE * noise.standard_normal(conv_w.shape) / np.sqrt(c * cell * cell)
    if divergent:
        conv_w[0] = -conv_w[0]

    # Anchor boxes in xyxy (one per patch, row-major like the flattened grid) and the linear map
    # from tanh(offsets) (dx, dy, dw, dh) to xyxy corrections: centre moves by up to cell/4,
    # width and height change by up to 40 %.
    ys, xs = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    x0, y0 = xs.ravel() * cell + shifted_boxes, ys.ravel() * cell
    anchors = np.stack([x0, y0, x0 + cell, y0 + cell], axis=1)
    q, r = 0.25 * cell, 0.2 * cell
    offsets = np.array([[q, 0, q, 0], [0, q, 0, q], [-r, 0, r, 0], [0, -r, 0, r]])

    inits = [
        _init("det_w", conv_w.astype(np.float32)),
        _init("det_b", np.zeros(heads, dtype=np.float32)),
        _init("det_shape", np.array([0, heads, patches], dtype=np.int64)),
        _init("score_gain", np.array(3.0, dtype=np.float32)),
        _init("anchors", anchors.astype(np.float32)),
        _init("offsets", offsets.astype(np.float32)),
        _init("s0", np.array([0], dtype=np.int64)),
        _init("s1", np.array([1], dtype=np.int64)),
        _init("s5", np.array([5], dtype=np.int64)),
        _init("s_end", np.array([heads], dtype=np.int64)),
        _init("axis1", np.array([1], dtype=np.int64)),
        _init("k", np.array([max_boxes], dtype=np.int64)),
        _init("expand4", np.array([1, 1, 4], dtype=np.int64)),
        _init("s_two", np.array([2], dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", [input_name, "det_w", "det_b"], ["heads4d"], kernel_shape=[cell, cell],
                         strides=[cell, cell]),
        helper.make_node("Reshape", ["heads4d", "det_shape"], ["heads"]),  # [N, heads, P]
        helper.make_node("Slice", ["heads", "s0", "s1", "axis1"], ["score_raw"]),  # [N, 1, P]
        helper.make_node("Squeeze", ["score_raw", "axis1"], ["score_flat"]),
        helper.make_node("Mul", ["score_flat", "score_gain"], ["score_logit"]),
        helper.make_node("Sigmoid", ["score_logit"], ["all_scores"]),  # [N, P]
        helper.make_node("Slice", ["heads", "s1", "s5", "axis1"], ["box_raw"]),  # [N, 4, P]
        helper.make_node("Tanh", ["box_raw"], ["box_t"]),
        helper.make_node("Transpose", ["box_t"], ["box_tp"], perm=[0, 2, 1]),  # [N, P, 4]
        helper.make_node("MatMul", ["box_tp", "offsets"], ["box_delta"]),
        helper.make_node("Add", ["box_delta", "anchors"], ["all_boxes"]),  # [N, P, 4]
        helper.make_node("Slice", ["heads", "s5", "s_end", "axis1"], ["class_logits"]),  # [N, C, P]
        helper.make_node("ArgMax", ["class_logits"], ["all_classes"], axis=1, keepdims=0),  # [N, P]
        helper.make_node("TopK", ["all_scores", "k"], ["scores", "keep"], axis=1),
        helper.make_node("Unsqueeze", ["keep", "s_two"], ["keep3"]),  # [N, K, 1]
        helper.make_node("Expand", ["keep3", "expand4"], ["keep4"]),
        helper.make_node("GatherElements", ["all_boxes", "keep4"], ["boxes"], axis=1),
        helper.make_node("GatherElements", ["all_classes", "keep"],
                         ["classes" if class_dtype == "int64" else "classes_i"], axis=1),
    ]
    class_type = TensorProto.INT64
    if class_dtype == "float32":
        nodes.append(helper.make_node("Cast", ["classes_i"], ["classes"], to=TensorProto.FLOAT))
        class_type = TensorProto.FLOAT
    batch: list[int | str] = ["N" if n == -1 else n]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                       _shape_dims((n, c, h, w), ("N", "C", "H", "W")))],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [*batch, max_boxes, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [*batch, max_boxes]),
            helper.make_tensor_value_info("classes", class_type, [*batch, max_boxes]),
        ],
        initializer=inits,
    )
    doc = (f"synthetic detector seed={version_seed} divergent={divergent} shifted_boxes={shifted_boxes} "
           f"max_boxes={max_boxes}")
    return _finish(graph, doc)


def segmenter(
    version_seed: int,
    divergent: bool = False,
    *,
    input_name: str = "image",
    smooth: int = 5,
) -> bytes:
    """A dense-map model: input `[-1, 3, -1, -1]` float32, output `mask [N, 1, H, W]` in (0, 1).

    The mask is a sigmoid of a 1x1 convolution of the image blurred by a `smooth` x `smooth`
    average (same size), so a standard-normal image gives blobs rather than salt and pepper and
    thresholded masks have a meaningful IoU. Two seeds differ by tiny noise (mask IoU near 1);
    `divergent=True` negates the weights, turning the mask inside out (IoU near 0).
    """
    if smooth < 1 or smooth % 2 == 0:
        raise ValueError("smooth must be a positive odd number")
    base = np.random.default_rng([_BASE_SEED, 4])
    mask_w = base.standard_normal((1, 3, 1, 1))
    mask_w *= 4.0 / np.linalg.norm(mask_w)
    noise = np.random.default_rng([_BASE_SEED, 4, version_seed])
    mask_w = mask_w + _VERSION_NOISE * noise.standard_normal(mask_w.shape)
    if divergent:
        mask_w = -mask_w
    pad = smooth // 2
    inits = [_init("seg_w", mask_w.astype(np.float32)), _init("seg_b", np.zeros(1, dtype=np.float32))]
    nodes = [
        helper.make_node("AveragePool", [input_name], ["blur"], kernel_shape=[smooth, smooth],
                         pads=[pad, pad, pad, pad], count_include_pad=0),
        helper.make_node("Conv", ["blur", "seg_w", "seg_b"], ["seg_logit"]),
        helper.make_node("Sigmoid", ["seg_logit"], ["mask"]),
    ]
    graph = helper.make_graph(
        nodes,
        "segmenter",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        initializer=inits,
    )
    return _finish(graph, f"synthetic segmenter seed={version_seed} divergent={divergent}")


# The weights `external_weights_model` points at: tests write them where the location resolves, so
# that only the rule, not a missing file, can refuse the model.
EXTERNAL_WEIGHTS = np.arange(4, dtype=np.float32)


def external_weights_model(location: str, where: str = "initializer") -> bytes:
    """`y = x + W` ([4] floats) with W kept in an external file at `location`, on an initializer,
    on a Constant node's attribute (`where="attribute"`) or on an initializer of an `If` subgraph
    (`where="subgraph"`). Not checked: ONNX's checker would look for the file."""
    tensor = numpy_helper.from_array(EXTERNAL_WEIGHTS, "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(EXTERNAL_WEIGHTS.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    add = helper.make_node("Add", ["x", "W"], ["y"])
    if where == "initializer":
        graph = helper.make_graph([add], "g", [x], [y], [tensor])
    elif where == "attribute":
        graph = helper.make_graph([helper.make_node("Constant", [], ["W"], value=tensor), add], "g", [x], [y])
    elif where == "subgraph":
        inner = TensorProto()
        inner.CopyFrom(tensor)
        inner.name = "Wb"
        w_out = helper.make_tensor_value_info("W", TensorProto.FLOAT, [4])
        branch = helper.make_graph([helper.make_node("Identity", ["Wb"], ["W"])], "b", [], [w_out], [inner])
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        nodes = [helper.make_node("If", ["c"], ["W"], then_branch=branch, else_branch=branch), add]
        graph = helper.make_graph(nodes, "g", [x], [y], [cond])
    else:
        raise ValueError(f"where must be 'initializer', 'attribute' or 'subgraph', got {where!r}")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()
