"""Each limit of the bundle reader and the ONNX inspection, one hostile input per test.

Rules under test: every refusal is a `BundleError` whose message names the limit or the problem
(so an operator knows what to fix), readers never write outside their destination, and a model
file is refused before anything would load it when it is junk, truncated, keeps weights in
external data, or disagrees with its manifest.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from fleet.core import synthetic_models
from fleet.core.bundle import (
    MAX_JSON_DEPTH,
    GraphSignature,
    GraphTensor,
    build_bundle,
    check_model_matches,
    extract_bundle,
    inspect_model,
    json_depth,
    read_manifest,
    signature_problems,
    verify_bundle,
)
from fleet.core.errors import BundleError
from fleet.core.manifest import MANIFEST_NAME, TensorSpec


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    """A valid manifest (as a dict) and its model bytes."""
    root = tmp_path_factory.mktemp("real")
    model = root / "m.onnx"
    model.write_bytes(synthetic_models.classifier(0, input_shape=(-1, 3, 8, 8), channels=4))
    manifest = build_bundle(root / "b.tar", name="cls", version="v1", task="classification",
                            model_files={"any": model})
    return manifest.to_dict(), model.read_bytes()


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, size: int | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if size is None else size
    return info


def raw_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """Header by header, so a header can claim what its data does not hold."""
    out = io.BytesIO()
    for info, data in members:
        out.write(info.tobuf(format=fmt, encoding="utf-8", errors="surrogateescape"))
        out.write(data)
        out.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return out.getvalue()


def bundle_with(manifest: dict[str, Any], model: bytes) -> bytes:
    """A bundle whose manifest states `model`'s true size and hash, whatever else it claims."""
    manifest = json.loads(json.dumps(manifest))
    manifest["variants"][0].update(size=len(model), sha256=hashlib.sha256(model).hexdigest())
    body = json.dumps(manifest).encode()
    return raw_tar([(member(MANIFEST_NAME, body), body), (member("model.onnx", model), model)])


def refused(tmp_path: Path, data: bytes, match: str, **caps: int) -> None:
    """All three readers refuse `data` with `match`, and extraction leaves nothing."""
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(data)
    with pytest.raises(BundleError, match=match):
        read_manifest(bundle, **caps)
    with pytest.raises(BundleError, match=match):
        verify_bundle(bundle, check_models=True, **caps)
    with pytest.raises(BundleError, match=match):
        extract_bundle(bundle, tmp_path / "dest", **caps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar"]


# -- archives ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compress", "kind"),
    [(gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz")],
)
def test_compressed_bomb_is_refused_by_format_before_any_decompression(
    tmp_path: Path, compress: Any, kind: str
) -> None:
    # 64 MiB of zeros squeezes into a few KiB: the ratio a decompression bomb relies on.
    bomb = compress(b"\0" * (64 * 1024 * 1024))
    assert len(bomb) < 1024 * 1024
    refused(tmp_path, bomb, f"{kind}-compressed; bundles are uncompressed tar")


def test_huge_pax_header_is_refused_before_tarfile_buffers_it(tmp_path: Path, real: tuple[dict[str, Any], bytes]
                                                              ) -> None:
    manifest, model = real
    good = bundle_with(manifest, model)
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 512 * 1024 * 1024  # claims half a GiB of extended header
    refused(tmp_path, pax.tobuf(format=tarfile.USTAR_FORMAT) + good, "tar extension header")


def test_non_utf8_member_name_is_refused(tmp_path: Path, real: tuple[dict[str, Any], bytes]) -> None:
    manifest, _ = real
    body = json.dumps(manifest).encode()
    bad = member("model\udcff.onnx", b"x")  # tarfile's form of the raw byte 0xff
    data = raw_tar([(member(MANIFEST_NAME, body), body), (bad, b"x")], fmt=tarfile.GNU_FORMAT)
    assert b"model\xff.onnx" in data
    refused(tmp_path, data, "not valid UTF-8")


def test_over_long_member_name_is_refused_and_cut_short_in_the_message(
    tmp_path: Path, real: tuple[dict[str, Any], bytes]
) -> None:
    manifest, _ = real
    body = json.dumps(manifest).encode()
    name = "m" * 5000
    data = raw_tar([(member(MANIFEST_NAME, body), body), (member(name, b"x"), b"x")])
    refused(tmp_path, data, r"longer than 128 characters")
    with pytest.raises(BundleError) as info:
        read_manifest(tmp_path / "bundle.tar")
    assert len(str(info.value)) < 400 and "5000 characters" in str(info.value)


def test_duplicate_member_is_refused(tmp_path: Path, real: tuple[dict[str, Any], bytes]) -> None:
    manifest, model = real
    good = bundle_with(manifest, model)
    body = json.dumps(manifest).encode()
    twice = good[: -2 * tarfile.BLOCKSIZE] + raw_tar([(member(MANIFEST_NAME, body), body)])
    refused(tmp_path, twice, "appears twice; member names must be unique")


def test_too_many_members_is_refused(tmp_path: Path, real: tuple[dict[str, Any], bytes]) -> None:
    manifest, _ = real
    body = json.dumps(manifest).encode()
    many = [(member(MANIFEST_NAME, body), body)] + [(member(f"f{i}", b"x"), b"x") for i in range(8)]
    refused(tmp_path, raw_tar(many), "more than 4 files", max_files=4)


def test_member_above_the_protobuf_limit_is_refused_from_its_header(
    tmp_path: Path, real: tuple[dict[str, Any], bytes]
) -> None:
    manifest, _ = real
    body = json.dumps(manifest).encode()
    huge = member("model.onnx", b"", size=3 * 1024**3)
    refused(tmp_path, raw_tar([(member(MANIFEST_NAME, body), body), (huge, b"")]), "single-file ONNX model")


def test_total_above_the_cap_is_refused(tmp_path: Path, real: tuple[dict[str, Any], bytes]) -> None:
    manifest, model = real
    refused(tmp_path, bundle_with(manifest, model), "FLEET_MAX_BUNDLE_BYTES", max_total_bytes=len(model) // 2)


def test_oversized_manifest_is_refused_from_its_header(tmp_path: Path) -> None:
    big = member(MANIFEST_NAME, b"", size=17 * 1024**2)
    refused(tmp_path, raw_tar([(big, b"{" + b" " * (17 * 1024**2 - 1))]), "manifest.json is .* above the")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b'{"schema": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests JSON too deeply"),
        (b'{"profile": ' + b'{"a": ' * (MAX_JSON_DEPTH + 5) + b"1" + b"}" * (MAX_JSON_DEPTH + 6), "levels deep"),
        (b'{"release": NaN}', "holds NaN"),
        (b'{"release": -Infinity}', "holds -Infinity"),
        (b'{"release": ' + b"9" * 10_000 + b"}", "not valid UTF-8 JSON"),
        (b'{"name": "\xff"}', "not valid UTF-8 JSON"),
    ],
)
def test_hostile_manifest_json_is_a_bundle_error(tmp_path: Path, body: bytes, match: str) -> None:
    refused(tmp_path, raw_tar([(member(MANIFEST_NAME, body), body)]), match)


def test_json_depth_counts_nesting_without_recursion() -> None:
    assert json_depth(1) == 0
    assert json_depth({"a": [1, {"b": []}]}) == 4
    deep: Any = 0
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == 100_000


# -- ONNX files -------------------------------------------------------------------------------------



@pytest.mark.parametrize(
    ("location", "match"),
    [
        ("/etc/shadow", "absolute path '/etc/shadow', outside the bundle"),
        ("../../secrets/weights.bin", r"climbs out of the bundle \('..'\)"),
        ("C:\\weights.bin", "absolute path"),
        ("weights.bin", "a file the manifest does not list or hash"),
        ("", "with no location"),
    ],
)
def test_external_data_is_refused_without_reading_it(location: str, match: str) -> None:
    with pytest.raises(BundleError, match=f"in external data .*{match}"):
        inspect_model(synthetic_models.external_weights_model(location), "m.onnx")


def test_external_data_model_in_a_bundle_is_refused_by_the_push_check(
    tmp_path: Path, real: tuple[dict[str, Any], bytes]
) -> None:
    manifest, _ = real
    model = synthetic_models.external_weights_model("../../../etc/passwd")
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(bundle_with(manifest, model))
    with pytest.raises(BundleError, match=r"cls:v1: model.onnx keeps tensor 'W' in external data"):
        verify_bundle(bundle, check_models=True)
    # The archive checks alone pass: it is the model inspection that refuses it.
    assert verify_bundle(bundle).ref == "cls:v1"


@pytest.mark.parametrize("cut", [0, 1, 7, 100, -1])
def test_junk_and_truncated_models_are_refused(real: tuple[dict[str, Any], bytes], cut: int) -> None:
    _, model = real
    with pytest.raises(BundleError, match=r"is not an ONNX model|fails the ONNX checker"):
        inspect_model(model[:cut], "m.onnx")


def test_random_bytes_are_not_a_model() -> None:
    junk = np.random.default_rng(0).bytes(4096)
    with pytest.raises(BundleError, match=r"is not an ONNX model|fails the ONNX checker"):
        inspect_model(junk, "m.onnx")


def test_symlinked_model_file_is_refused(tmp_path: Path, real: tuple[dict[str, Any], bytes]) -> None:
    _, model = real
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(model)
    (tmp_path / "model.onnx").symlink_to(target)
    with pytest.raises(BundleError, match="symbolic link"):
        inspect_model(tmp_path / "model.onnx", "model.onnx")
    assert inspect_model(target, "elsewhere.onnx").inputs[0].name == "input"


def _graph() -> GraphSignature:
    return GraphSignature(
        inputs=(GraphTensor("input", "float32", (None, 3, 8, 8)),),
        outputs=(GraphTensor("probabilities", "float32", (None, 4)),),
    )


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected"),
    [
        ([TensorSpec("input", "float16", (-1, 3, 8, 8))], None,
         "input 'input': manifest says float16, model has float32"),
        ([TensorSpec("input", "float32", (-1, 3, 8))], None,
         "input 'input': manifest rank 3 [-1, 3, 8], model rank 4 [?, 3, 8, 8]"),
        ([TensorSpec("input", "float32", (-1, 3, 16, 16))], None, "input 'input' dim 2: manifest says 16, model has 8"),
        ([TensorSpec("input", "float32", (-1, -1, 8, 8))], None,
         "input 'input' dim 1: manifest says dynamic (-1), model fixes it to 3"),
        ([TensorSpec("pixels", "float32", (-1, 3, 8, 8))], None, "inputs in the manifest but not in the model: pixels"),
        (None, [TensorSpec("scores", "float32", (-1, 4))],
         "outputs in the model but not in the manifest: probabilities"),
    ],
)
def test_signature_disagreements_name_both_values(
    inputs: list[TensorSpec] | None, outputs: list[TensorSpec] | None, expected: str
) -> None:
    graph = _graph()
    declared_in = inputs or [TensorSpec("input", "float32", (-1, 3, 8, 8))]
    declared_out = outputs or [TensorSpec("probabilities", "float32", (-1, 4))]
    assert expected in signature_problems(declared_in, declared_out, graph)
    with pytest.raises(BundleError, match="does not match its manifest"):
        check_model_matches(declared_in, declared_out, graph, "m.onnx")


def test_truthful_signature_has_no_problems_and_looser_outputs_are_fine() -> None:
    graph = _graph()
    inputs = [TensorSpec("input", "float32", (-1, 3, 8, 8))]
    assert signature_problems(inputs, [TensorSpec("probabilities", "float32", (-1, 4))], graph) == []
    assert signature_problems(inputs, [TensorSpec("probabilities", "float32", (-1, -1))], graph) == []


def test_lying_manifest_bundle_is_refused_by_the_push_check_with_both_values(
    tmp_path: Path, real: tuple[dict[str, Any], bytes]
) -> None:
    manifest, model = real
    lying = json.loads(json.dumps(manifest))
    lying["inputs"][0]["shape"] = [-1, 3, 32, 32]
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(bundle_with(lying, model))
    with pytest.raises(BundleError, match=r"input 'input' dim 2: manifest says 32, model has 8"):
        verify_bundle(bundle, check_models=True)


def test_build_applies_the_same_signature_rule(tmp_path: Path, real: tuple[dict[str, Any], bytes]) -> None:
    _, model = real
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    with pytest.raises(BundleError, match="manifest says dynamic"):
        build_bundle(tmp_path / "b.tar", name="cls", version="v2", task="generic", model_files={"any": path},
                     inputs=[TensorSpec("input", "float32", (-1, -1, 8, 8))])
    assert not (tmp_path / "b.tar").exists()


def test_the_truthful_bundle_passes_every_check(tmp_path: Path, real: tuple[dict[str, Any], bytes]) -> None:
    manifest, model = real
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(bundle_with(manifest, model))
    assert verify_bundle(bundle, check_models=True).ref == "cls:v1"
    extracted = extract_bundle(bundle, tmp_path / "dest")
    assert (tmp_path / "dest" / "model.onnx").read_bytes() == model
    assert isinstance(onnx.load_model_from_string(model), onnx.ModelProto) and extracted.ref == "cls:v1"
