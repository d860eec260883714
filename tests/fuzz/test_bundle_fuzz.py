"""Fuzz the bundle and manifest parsers with hostile input (hypothesis).

Rules under test:

- `Manifest.from_dict`, `validate_layout` and `validate_profile` take any JSON-like value and either
  accept it or raise the domain error (`BundleError`, `InvalidInputError`) with a message: never a
  `TypeError`, `KeyError`, `OverflowError` or the like, which the transports would turn into a 500
  or a crashed agent;
- `read_manifest`, `verify_bundle` and `extract_bundle` on damaged real bundles (flipped bytes,
  truncation, appended junk) and on hand-built tar archives (hostile names, every member type,
  headers that lie about sizes, too many members) either succeed or raise `BundleError`, and
  extraction never writes outside `dest` and leaves nothing behind when it fails;
- an ONNX model whose tensors live in external data files (inside or outside the bundle, on an
  initializer, a node attribute or a subgraph) is refused when the bundle is built, and the
  device refuses to load one that points outside its slot;
- a manifest that lies about tensor shapes or types never loads silently wrong: the device either
  loads a model whose signature matches or raises `ModelLoadError`;
- damaged model bytes, hostile manifest text (deep nesting, NaN/Infinity, huge integers) and hostile
  REST bodies are refused with the domain error or a reason, never an unexpected exception.

Every `@settings` is derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import math
import os
import tarfile
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleet.agent.runtime import load_model
from fleet.controller.app import MAX_JSON_DEPTH, JsonBodyGuardMiddleware
from fleet.core import synthetic_models
from fleet.core.agreement import LAYOUT_SPEC, validate_layout
from fleet.core.bundle import build_bundle, extract_bundle, inspect_model, read_manifest, verify_bundle
from fleet.core.errors import BundleError, InvalidInputError, ModelLoadError
from fleet.core.manifest import DTYPES, MANIFEST_NAME, TASKS, Manifest, TensorSpec
from fleet.core.profile import CATEGORICAL, MEAN, NUMERIC, OTHER, TOP1_CLASS, ProfileMonitor, validate_profile

FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
# Bundle cases touch the disk; fewer of them keep the directory well under its time budget.
FUZZ_IO = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# JSON-like values, including what Python's json module really produces from hostile text:
# huge integers, NaN and infinities.
EDGE_VALUES = [10**400, -(10**400), float("inf"), float("-inf"), float("nan"), True, False, 0, -1, "", "x", None]
# Half of the scalars are the edge values parsers most often forget (one_of picks a branch evenly).
scalars = st.one_of(
    st.sampled_from(EDGE_VALUES),
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
)
# Keys the parsers know, so mutations add fields that mean something, not only random names.
KNOWN_KEYS = sorted(
    {"schema", "name", "version", "task", "release", "inputs", "outputs", "variants", "class_names", "created_at",
     "description", "profile", "outputs_layout", "dtype", "shape", "hardware", "file", "sha256", "size",
     "providers", "features", "source", "kind", "type", "tensor", "stat", "index", "axis", "threshold", "scores",
     "num_classes", "edges", "proportions", "categories"}
    | {k for spec in LAYOUT_SPEC.values() for k in spec}
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# --------------------------------------------------------------------------------------------------
# A real bundle to start from


@cache
def _real() -> tuple[bytes, dict[str, Any], bytes]:
    """(bundle bytes, manifest dict, model bytes) of a real classifier bundle, built once."""
    work = Path(tempfile.mkdtemp(prefix="fleet-fuzz-real-"))
    model = work / "model.onnx"
    model_bytes = synthetic_models.classifier(0, input_shape=(-1, 3, 8, 8), channels=4)
    model.write_bytes(model_bytes)
    bundle = work / "bundle.tar"
    manifest = build_bundle(
        bundle, name="detector", version="v1", task="classification", model_files={"any": model},
        class_names=("cat", "dog", "fox", "owl"), outputs_layout={"top_k": 2},
        profile=_valid_profile(),
    )
    return bundle.read_bytes(), manifest.to_dict(), model_bytes


def _valid_profile() -> dict[str, Any]:
    return {
        "source": "reference",
        "features": [
            {"name": "input.mean", "kind": "input", "type": NUMERIC, "tensor": "input", "stat": MEAN,
             "edges": [0.0, 1.0], "proportions": [0.25, 0.5, 0.25]},
            {"name": "top1", "kind": "output", "type": CATEGORICAL, "tensor": "probabilities", "stat": TOP1_CLASS,
             "categories": ["0", "1", OTHER], "proportions": [0.5, 0.25, 0.25]},
        ],
    }


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """`base` with one value somewhere inside replaced by arbitrary JSON, or removed."""
    value = copy.deepcopy(base)
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    parent: Any = value
    while True:
        keys: list[Any] = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        child = parent[key]
        if isinstance(child, dict | list) and child and draw(st.booleans()):
            parent = child
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8))] = draw(json_values)
        elif action == "add":
            parent.append(draw(json_values))
        else:
            parent[key] = draw(json_values)
        break
    return value


# --------------------------------------------------------------------------------------------------
# Manifest, layout and profile parsers


def _manifest_or_bundle_error(raw: Any) -> Manifest | None:
    try:
        manifest = Manifest.from_dict(raw)
    except BundleError as exc:
        assert str(exc), "a refusal must say why"
        return None
    # What the parser accepts, it must write back in a form it accepts again unchanged.
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(manifest.to_dict(), sort_keys=True)
    return manifest


@FUZZ
@given(raw=json_values)
def test_manifest_from_arbitrary_json_is_a_manifest_or_a_bundle_error(raw: Any) -> None:
    _manifest_or_bundle_error(raw)


@FUZZ
@given(data=st.data())
def test_manifest_near_a_valid_one_is_a_manifest_or_a_bundle_error(data: st.DataObject) -> None:
    _manifest_or_bundle_error(data.draw(mutated(_real()[1])))


# Cases the fuzzer found (kept so they are always run).
@pytest.mark.parametrize(
    ("where", "key", "value"),
    [("inputs", "dtype", []), ("outputs", "dtype", {"a": 1}), ("inputs", "shape", [10**400])],
)
def test_manifest_field_edge_values_are_bundle_errors(where: str, key: str, value: Any) -> None:
    raw = copy.deepcopy(_real()[1])
    raw[where][0][key] = value
    assert _manifest_or_bundle_error(raw) is None


def test_the_unmutated_manifest_parses() -> None:
    """Guards the two tests above: their starting point must be valid, or they only fuzz refusals."""
    assert _manifest_or_bundle_error(_real()[1]) is not None


@st.composite
def layouts(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    task = draw(st.sampled_from(TASKS) | st.text(max_size=8))
    values = scalars | scalars | st.sampled_from(["boxes", "scores", "classes", "mask", "xyxy", "greedy"]) | json_values
    # Each of the task's own keys, each present or not; a foreign key only now and then, because
    # one is refused first and hides every value check.
    spec_keys = sorted(LAYOUT_SPEC.get(task, {})) or ["scores"]
    layout = draw(st.fixed_dictionaries({}, optional=dict.fromkeys(spec_keys, values)))
    if draw(st.integers(0, 4)) == 0:
        layout[draw(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8))] = draw(values)
    # Checks stop at the first bad value, so every key needs its turn at being first.
    order = draw(st.permutations(list(layout)))
    return task, {key: layout[key] for key in order}


@FUZZ
@given(
    task_layout=layouts(),
    outputs=st.dictionaries(
        st.sampled_from(["boxes", "scores", "classes", "mask"]) | st.text(max_size=6),
        st.lists(st.integers(-1, 8).filter(lambda d: d != 0), max_size=4).map(tuple),
        max_size=4,
    ),
)
# Cases the fuzzer found (kept so they are always run): numbers too large for a float.
@example(task_layout=("detection", {"score_threshold": 10**400}), outputs={})
@example(task_layout=("segmentation", {"mask_threshold": -(10**400)}), outputs={})
def test_layout_is_accepted_or_a_bundle_error(task_layout: tuple[str, dict[str, Any]], outputs: dict[str, Any]) -> None:
    with contextlib.suppress(BundleError):
        validate_layout(*task_layout, outputs)


def _profile_or_invalid_input(raw: Any) -> bool:
    try:
        assert validate_profile(raw) is raw
    except InvalidInputError as exc:
        assert str(exc)
        return False
    # What validation accepts, the device's live monitor must be able to count with.
    ProfileMonitor(raw)
    return True


def _feature(**changes: Any) -> dict[str, Any]:
    return {"features": [{**_valid_profile()["features"][0], **changes}]}


def _category(**changes: Any) -> dict[str, Any]:
    return {"features": [{**_valid_profile()["features"][1], **changes}]}


@FUZZ
@given(data=st.data())
def test_profile_is_accepted_or_an_invalid_input_error(data: st.DataObject) -> None:
    _profile_or_invalid_input(data.draw(mutated(_valid_profile())))


# Cases the fuzzer found (kept so they are always run): numbers too large for a float, an
# infinite class id, and fields that are not numbers at all.
@pytest.mark.parametrize(
    "raw",
    [
        _feature(proportions=[10**400, 0, 0]),
        _feature(edges=[0, 10**400]),
        _feature(index="x"),
        _feature(axis=None),
        _feature(threshold=[1]),
        _category(categories=[float("inf"), "1", OTHER]),
        _category(categories=[10**400, "1", OTHER]),
    ],
)
def test_profile_edge_values_are_invalid_input(raw: dict[str, Any]) -> None:
    assert not _profile_or_invalid_input(raw)


@FUZZ
@given(raw=json_values)
def test_profile_from_arbitrary_json_is_accepted_or_an_invalid_input_error(raw: Any) -> None:
    _profile_or_invalid_input(raw)


def test_the_unmutated_profile_is_valid() -> None:
    assert _profile_or_invalid_input(_valid_profile())


# --------------------------------------------------------------------------------------------------
# Damaged real bundles


@contextlib.contextmanager
def _sandbox() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fleet-fuzz-") as tmp:
        yield Path(tmp)


def _check_all_readers(bundle: Path, sandbox: Path, **caps: int) -> Manifest | None:
    """Run the three readers; assert they agree and extraction stays inside `dest`."""
    outcomes: list[Manifest | None] = []
    for reader in (read_manifest, verify_bundle):
        try:
            outcomes.append(reader(bundle, **caps))
        except BundleError as exc:
            assert str(exc)
            outcomes.append(None)
    dest = sandbox / "dest"
    try:
        extracted: Manifest | None = extract_bundle(bundle, dest, **caps)
    except BundleError as exc:
        assert str(exc)
        extracted = None
    # Nothing anywhere in the sandbox but the archive and `dest`; nothing in `dest` after a failure.
    outside = sorted(p.name for p in sandbox.iterdir() if p not in (bundle, dest))
    assert outside == [], f"extraction wrote outside dest: {outside}"
    assert not (sandbox.parent / "pwned").exists()
    if extracted is None:
        assert not dest.exists(), "a failed extraction must remove what it wrote"
        # Whatever verify_bundle accepts, extract_bundle accepts too (same checks, same bytes).
        assert outcomes[1] is None
    else:
        assert outcomes[1] == extracted, "verify_bundle and extract_bundle disagree"
        names = {p.name for p in dest.iterdir()}
        assert names == {MANIFEST_NAME} | {v.file for v in extracted.variants}
        assert all(p.is_file() and not p.is_symlink() for p in dest.iterdir())
    if outcomes[0] is None:
        assert extracted is None, "a bundle whose manifest cannot be read must not extract"
    return extracted


@FUZZ_IO
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(min_value=0),
    junk=st.binary(max_size=1100),
)
@example(flips=[], cut=None, junk=b"")
def test_damaged_real_bundle_extracts_exactly_or_is_a_bundle_error(
    flips: list[tuple[int, int]], cut: int | None, junk: bytes
) -> None:
    original = _real()[0]
    data = bytearray(original)
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % (len(data) + 1):]
    data += junk
    with _sandbox() as sandbox:
        bundle = sandbox / "bundle.tar"
        bundle.write_bytes(bytes(data))
        manifest = _check_all_readers(bundle, sandbox)
    if bytes(data) == original:
        assert manifest is not None, "the untouched bundle must extract"


def test_compressed_bundle_is_refused() -> None:
    """Only uncompressed tar is read, so a decompression bomb has nothing to expand."""
    with _sandbox() as sandbox:
        bundle = sandbox / "bundle.tar.gz"
        bundle.write_bytes(gzip.compress(_real()[0]))
        assert _check_all_readers(bundle, sandbox) is None


# --------------------------------------------------------------------------------------------------
# Hand-built hostile archives

MEMBER_TYPES = [
    tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE,
    tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE,
]
HOSTILE_NAMES = [
    MANIFEST_NAME, "model.onnx", "model-gpu.onnx", "../pwned", "../../pwned", "/tmp/pwned", "./model.onnx",
    "dir/model.onnx", "dir/../../pwned", "..\\pwned", "C:\\pwned", "c:pwned", "", ".", "..", "model.onnx/",
    "x" * 300, "mödel.onnx", "model.onnx\x00.txt", " model.onnx",
]


@st.composite
def hostile_member(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes]:
    _, manifest, model = _real()
    info = tarfile.TarInfo(draw(st.sampled_from(HOSTILE_NAMES) | st.text(max_size=20)))
    info.type = draw(st.sampled_from(MEMBER_TYPES))
    info.linkname = draw(st.sampled_from(["/etc/passwd", "../pwned", "model.onnx", MANIFEST_NAME, ""]))
    info.mode = draw(st.sampled_from([0o644, 0o4755, 0o777]))
    content = draw(
        st.sampled_from([json.dumps(manifest).encode(), model, b"", b"{}"]) | st.binary(max_size=2048)
    )
    # The header may lie about the size in either direction: that is half the attack.
    info.size = draw(st.sampled_from([len(content)]) | st.integers(0, 4096) | st.integers(2**33, 2**40))
    return info, content


def _raw_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: Literal[0, 1, 2]) -> bytes:
    """A tar stream written header by header, so headers can claim sizes the data does not have."""
    out = io.BytesIO()
    for info, content in members:
        try:
            out.write(info.tobuf(format=fmt, encoding="utf-8", errors="surrogateescape"))
        except (ValueError, UnicodeError):
            continue  # a header this format cannot express; tarfile refuses to write it at all
        out.write(content)
        out.write(b"\0" * (-len(content) % tarfile.BLOCKSIZE))
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return out.getvalue()


@FUZZ_IO
@given(
    members=st.lists(hostile_member(), max_size=10),
    fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]),
)
def test_hostile_archive_is_a_bundle_error_and_writes_nothing_outside(
    members: list[tuple[tarfile.TarInfo, bytes]], fmt: Literal[0, 1, 2]
) -> None:
    with _sandbox() as sandbox:
        bundle = sandbox / "bundle.tar"
        bundle.write_bytes(_raw_tar(members, fmt))
        # Small caps, so "too many files" and "too many bytes" are reached by small archives.
        _check_all_readers(bundle, sandbox, max_files=6, max_total_bytes=64 * 1024)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../pwned", tarfile.REGTYPE, "path traversal"),
        ("/tmp/pwned", tarfile.REGTYPE, "absolute path"),
        ("pwned", tarfile.SYMTYPE, "symbolic link"),
        ("pwned", tarfile.LNKTYPE, "hard link"),
        ("pwned", tarfile.CHRTYPE, "device"),
        ("pwned", tarfile.DIRTYPE, "directory"),
        ("dir/model.onnx", tarfile.REGTYPE, "nested"),
    ],
)
def test_each_hostile_member_kind_is_named_in_the_refusal(name: str, kind: bytes, message: str) -> None:
    _, manifest, _model = _real()
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/passwd"
    members = [(_info(MANIFEST_NAME, json.dumps(manifest).encode()), json.dumps(manifest).encode()),
               (info, b"" if kind != tarfile.REGTYPE else b"x")]
    if kind == tarfile.REGTYPE:
        info.size = 1
    with _sandbox() as sandbox:
        bundle = sandbox / "bundle.tar"
        bundle.write_bytes(_raw_tar(members, tarfile.PAX_FORMAT))
        with pytest.raises(BundleError, match=message):
            extract_bundle(bundle, sandbox / "dest")
        assert sorted(p.name for p in sandbox.iterdir()) == ["bundle.tar"]


def test_too_many_members_and_size_bomb_headers_are_refused() -> None:
    _, manifest, _model = _real()
    body = json.dumps(manifest).encode()
    many = [(_info(MANIFEST_NAME, body), body)] + [(_info(f"f{i}", b"x"), b"x") for i in range(70)]
    bomb_info = _info("model.onnx", b"")
    bomb_info.size = 2**40  # a header claiming a terabyte, with no data behind it
    bomb = [(_info(MANIFEST_NAME, body), body), (bomb_info, b"")]
    with _sandbox() as sandbox:
        bundle = sandbox / "bundle.tar"
        bundle.write_bytes(_raw_tar(many, tarfile.PAX_FORMAT))
        with pytest.raises(BundleError, match="more than 64 files"):
            read_manifest(bundle)
        bundle.write_bytes(_raw_tar(bomb, tarfile.PAX_FORMAT))
        with pytest.raises(BundleError, match=r"cap|single-file ONNX"):
            extract_bundle(bundle, sandbox / "dest")
        assert not (sandbox / "dest").exists()


def _info(name: str, content: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info


# --------------------------------------------------------------------------------------------------
# External data in ONNX files

EXTERNAL_CASES = [
    (location, where)
    for location in ("weights.bin", "../outside/weights.bin", "/tmp/fleet-fuzz-absolute-weights.bin")
    for where in ("initializer", "attribute", "subgraph")
]


@pytest.mark.parametrize(("location", "where"), EXTERNAL_CASES)
def test_build_refuses_external_data_wherever_it_points(
    location: str, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    (tmp_path / "outside").mkdir()
    models.mkdir()
    # The weights exist where the location points, so only the rule can refuse, not a missing file.
    for target in (models / "weights.bin", tmp_path / "outside" / "weights.bin"):
        synthetic_models.EXTERNAL_WEIGHTS.tofile(target)
    model = models / "model.onnx"
    model.write_bytes(synthetic_models.external_weights_model(location, where))
    # From the model's own folder, where a relative location resolves, as an operator would run it.
    monkeypatch.chdir(models)
    with pytest.raises(BundleError, match="external data"):
        build_bundle(tmp_path / "b.tar", name="m", version="v1", task="generic", model_files={"any": model})
    assert not (tmp_path / "b.tar").exists()


@pytest.mark.parametrize("where", ["initializer", "attribute"])
@pytest.mark.parametrize("location", ["../outside/weights.bin", "/tmp/fleet-fuzz-absolute-weights.bin"])
def test_device_refuses_a_model_whose_weights_point_outside_its_slot(
    location: str, where: str, tmp_path: Path
) -> None:
    slot = tmp_path / "slot"
    slot.mkdir()
    (tmp_path / "outside").mkdir()
    synthetic_models.EXTERNAL_WEIGHTS.tofile(tmp_path / "outside" / "weights.bin")
    if location.startswith("/"):
        synthetic_models.EXTERNAL_WEIGHTS.tofile(location)
    try:
        (slot / "model.onnx").write_bytes(synthetic_models.external_weights_model(location, where))
        manifest = Manifest.from_dict({**_real()[1], "name": "m", "inputs": [
            {"name": "x", "dtype": "float32", "shape": [4]}], "outputs": [
            {"name": "y", "dtype": "float32", "shape": [4]}], "task": "generic", "outputs_layout": {}})
        with pytest.raises(ModelLoadError, match=r"[Ee]xternal data"):
            load_model(slot / "model.onnx", manifest, ["CPUExecutionProvider"])
    finally:
        if location.startswith("/"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(location)


# --------------------------------------------------------------------------------------------------
# Manifests that lie about the model


tensor_lies = st.builds(
    lambda name, dtype, shape: {"name": name, "dtype": dtype, "shape": shape},
    st.sampled_from(["input", "probabilities", "x"]),
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.sampled_from([-1, 1, 3, 4, 8, 16]), max_size=5),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(inputs=st.lists(tensor_lies, min_size=1, max_size=2), outputs=st.lists(tensor_lies, min_size=1, max_size=2))
@example(inputs=None, outputs=None)  # the truthful manifest must load
def test_lying_manifest_loads_only_when_it_matches(
    inputs: list[dict[str, Any]] | None, outputs: list[dict[str, Any]] | None
) -> None:
    _, raw, model_bytes = _real()
    raw = {**raw, "outputs_layout": {}}
    if inputs is not None:
        raw["inputs"] = inputs
    if outputs is not None:
        raw["outputs"] = outputs
    try:
        manifest = Manifest.from_dict(raw)
    except BundleError:
        return
    with _sandbox() as sandbox:
        path = sandbox / "model.onnx"
        path.write_bytes(model_bytes)
        try:
            loaded = load_model(path, manifest, ["CPUExecutionProvider"])
        except ModelLoadError as exc:
            assert "does not match its manifest" in str(exc) or "cannot open" in str(exc)
            assert inputs is not None, "the truthful manifest must load"
            return
    # It loaded: then every declared input agrees with the graph in name, type and rank.
    truth = {s.name: s for s in Manifest.from_dict(_real()[1]).inputs}
    for spec in manifest.inputs:
        real: TensorSpec = truth[spec.name]
        assert (spec.dtype, len(spec.shape)) == (real.dtype, len(real.shape))
        assert all(d in (-1, r) or r == -1 for d, r in zip(spec.shape, real.shape, strict=True))
    assert math.isfinite(len(loaded.inputs))


# --------------------------------------------------------------------------------------------------
# Model bytes, manifest text and REST bodies from a hostile sender


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(min_value=0),
)
@example(flips=[], cut=None)
def test_damaged_model_bytes_are_a_signature_or_a_bundle_error(flips: list[tuple[int, int]], cut: int | None) -> None:
    """The push-time inspection of a model file never raises anything but `BundleError`."""
    data = bytearray(_real()[2])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % (len(data) + 1):]
    try:
        graph = inspect_model(bytes(data), "model.onnx")
    except BundleError as exc:
        assert str(exc).startswith("model.onnx")
        return
    if not flips and cut is None:
        assert [t.name for t in graph.inputs] == ["input"]


nested_text = st.recursive(
    st.sampled_from(["1", "NaN", "-Infinity", "Infinity", '"x"', "null", "1" * 5000, "1e999", '"\\ud800"']),
    lambda inner: st.builds(lambda xs: "[" + ",".join(xs) + "]", st.lists(inner, max_size=3))
    | st.builds(lambda xs: "{" + ",".join(f'"k{i}":{x}' for i, x in enumerate(xs)) + "}", st.lists(inner, max_size=3)),
    max_leaves=30,
)


@FUZZ_IO
@given(
    value=nested_text,
    depth=st.integers(0, 3000),
    key=st.sampled_from(["profile", "release", "inputs", "outputs_layout", "description"]),
)
def test_hostile_manifest_text_is_a_manifest_or_a_bundle_error(value: str, depth: int, key: str) -> None:
    """Deep nesting, non-JSON constants and huge numbers in manifest.json are `BundleError`s, never a
    RecursionError or ValueError."""
    raw = json.dumps(_real()[1])
    body = (raw[:-1] + f', "{key}": ' + "[" * depth + value + "]" * depth + "}").encode()
    with _sandbox() as sandbox:
        bundle = sandbox / "bundle.tar"
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(body)
        bundle.write_bytes(_raw_tar([(info, body)], tarfile.PAX_FORMAT))
        with pytest.raises(BundleError):
            read_manifest(bundle)


@FUZZ
@given(body=st.binary(max_size=64) | nested_text.map(str.encode), depth=st.integers(0, 5000))
def test_rest_json_guard_never_raises(body: bytes, depth: int) -> None:
    """The REST body guard answers None (let FastAPI parse) or a reason; it never raises."""
    wrapped = b"[" * depth + body + b"]" * depth
    problem = JsonBodyGuardMiddleware(app=None).problem(wrapped)  # type: ignore[arg-type]
    assert problem is None or (isinstance(problem, str) and problem)
    if depth > MAX_JSON_DEPTH:
        try:
            json.loads(wrapped)
        except (ValueError, RecursionError):
            return
        assert problem is not None
