"""Bundles: deterministic builds, and extraction that refuses every hostile archive shape."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from fleet.core.bundle import (
    build_bundle,
    extract_bundle,
    read_manifest,
    sha256_file,
    verify_bundle,
)
from fleet.core.errors import BundleError
from fleet.core.manifest import TensorSpec


def write_relu(path: Path, *, input_name: str = "x", dims: tuple[Any, ...] = ("N", 3)) -> Path:
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    graph = helper.make_graph([helper.make_node("Relu", [input_name], ["y"])], "relu", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_relu(tmp_path / "relu.onnx")


@pytest.fixture
def bundle(tmp_path: Path, model: Path) -> Path:
    out = tmp_path / "bundle.tar"
    build_bundle(out, name="detector", version="v1", task="generic", model_files={"any": model})
    return out


# -- building -------------------------------------------------------------------------------------


def test_round_trip_reads_signature_from_graph(tmp_path: Path, bundle: Path, model: Path) -> None:
    manifest = read_manifest(bundle)
    assert manifest.ref == "detector:v1"
    assert manifest.inputs == (TensorSpec("x", "float32", (-1, 3)),)
    assert manifest.outputs == (TensorSpec("y", "float32", (-1, 3)),)
    (variant,) = manifest.variants
    assert (variant.hardware, variant.file) == ("any", "model.onnx")
    assert variant.sha256 == sha256_file(model)
    assert variant.size == model.stat().st_size

    dest = tmp_path / "slot"
    assert extract_bundle(bundle, dest) == manifest
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "model.onnx"]
    assert (dest / "model.onnx").read_bytes() == model.read_bytes()
    assert verify_bundle(bundle) == manifest


def test_same_inputs_give_the_same_bytes(tmp_path: Path, model: Path) -> None:
    kwargs: dict[str, Any] = {
        "name": "detector",
        "version": "v1",
        "task": "classification",
        "class_names": ("cat", "dog"),
        "model_files": {"any": model, "jetson": model},
    }
    first = build_bundle(tmp_path / "a.tar", **kwargs)
    second = build_bundle(tmp_path / "b.tar", **kwargs)
    assert first == second
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["manifest.json", "model-jetson.onnx", "model.onnx"]
    assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o644, "")}


def test_variants_must_expose_the_declared_tensors(tmp_path: Path, model: Path) -> None:
    other = write_relu(tmp_path / "other.onnx", input_name="pixels")
    with pytest.raises(BundleError, match="inputs in the manifest but not in the model: x"):
        build_bundle(
            tmp_path / "b.tar",
            name="m",
            version="1",
            task="generic",
            model_files={"any": model, "coral": other},
        )
    with pytest.raises(BundleError, match="manifest says int8"):
        build_bundle(
            tmp_path / "b.tar",
            name="m",
            version="1",
            task="generic",
            model_files={"any": model},
            inputs=[TensorSpec("x", "int8", (-1, 3))],
        )


def test_not_onnx_is_refused_at_build(tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(BundleError, match=r"is not an ONNX model|fails the ONNX checker"):
        build_bundle(tmp_path / "b.tar", name="m", version="1", task="generic", model_files={"any": junk})
    assert not (tmp_path / "b.tar").exists()
    assert list(tmp_path.glob(".b.tar*")) == []  # no temporary left behind


def test_invalid_onnx_graph_is_refused_at_build(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    # "Relu" reads a tensor nobody produces: the checker must refuse the graph.
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "g", [x], [y])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(BundleError, match="fails the ONNX checker"):
        build_bundle(tmp_path / "b.tar", name="m", version="1", task="generic", model_files={"any": path})


def test_bad_names_are_refused_at_build(tmp_path: Path, model: Path) -> None:
    with pytest.raises(BundleError, match="invalid model name"):
        build_bundle(
            tmp_path / "b.tar", name="Bad Name", version="1", task="generic", model_files={"any": model}
        )
    with pytest.raises(BundleError, match="hardware class"):
        build_bundle(tmp_path / "b.tar", name="m", version="1", task="generic", model_files={"../x": model})
    with pytest.raises(BundleError, match="at least one model file"):
        build_bundle(tmp_path / "b.tar", name="m", version="1", task="generic", model_files={})


# -- hostile archives -----------------------------------------------------------------------------

MODEL_BYTES = b"\x08\x07" + b"fake-model-bytes" * 8


def manifest_for(files: dict[str, bytes], **overrides: Any) -> bytes:
    variants = [
        {
            "hardware": "any" if i == 0 else f"hw{i}",
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        for i, (name, data) in enumerate(files.items())
    ]
    raw = {
        "schema": "fleet.bundle/v1",
        "name": "m",
        "version": "1",
        "task": "generic",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}],
        "variants": variants,
    }
    raw.update(overrides)
    return json.dumps(raw).encode()


def member(
    name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def good_members(
    extra: list[tuple[tarfile.TarInfo, bytes]] | None = None,
) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        member("manifest.json", manifest_for({"model.onnx": MODEL_BYTES})),
        member("model.onnx", MODEL_BYTES),
        *(extra or []),
    ]


def test_hand_built_good_archive_extracts(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "ok.tar", good_members())
    manifest = extract_bundle(path, tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == MODEL_BYTES
    assert manifest.variants[0].size == len(MODEL_BYTES)


HOSTILE = {
    "traversal": (good_members([member("../evil", b"x")]), "path traversal"),
    "traversal-nested": (good_members([member("a/../../evil", b"x")]), "path traversal"),
    "absolute": (good_members([member("/tmp/evil", b"x")]), "absolute path"),
    "symlink": (good_members([member("evil", kind=tarfile.SYMTYPE, link="/etc/passwd")]), "symbolic link"),
    "hardlink": (good_members([member("evil", kind=tarfile.LNKTYPE, link="model.onnx")]), "hard link"),
    "device": (good_members([member("evil", kind=tarfile.CHRTYPE)]), "device"),
    "fifo": (good_members([member("evil", kind=tarfile.FIFOTYPE)]), "device or FIFO"),
    "directory": (good_members([member("sub", kind=tarfile.DIRTYPE)]), "directory"),
    "nested": (good_members([member("sub/model.onnx", b"x")]), "nested in a directory"),
    "duplicate": (good_members([member("model.onnx", MODEL_BYTES)]), "appears twice"),
    "unlisted": (good_members([member("extra.bin", b"x")]), "not listed by the manifest"),
    "no-manifest": ([member("model.onnx", MODEL_BYTES)], "no manifest.json"),
    "missing-file": (
        [member("manifest.json", manifest_for({"model.onnx": MODEL_BYTES}))],
        "missing from the bundle",
    ),
    "bad-json": (
        [member("manifest.json", b"{not json"), member("model.onnx", MODEL_BYTES)],
        "not valid UTF-8 JSON",
    ),
    "size-lie": (
        [
            member(
                "manifest.json",
                json.dumps(
                    {
                        **json.loads(manifest_for({"model.onnx": MODEL_BYTES})),
                        "variants": [
                            {
                                "hardware": "any",
                                "file": "model.onnx",
                                "size": len(MODEL_BYTES) - 1,
                                "sha256": hashlib.sha256(MODEL_BYTES).hexdigest(),
                            }
                        ],
                    }
                ).encode(),
            ),
            member("model.onnx", MODEL_BYTES),
        ],
        "manifest says 'model.onnx' is",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_nothing_is_left(tmp_path: Path, case: str) -> None:
    members, reason = HOSTILE[case]
    path = write_tar(tmp_path / "evil.tar", members)
    dest = tmp_path / "out"
    with pytest.raises(BundleError, match=reason):
        extract_bundle(path, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil").exists()
    with pytest.raises(BundleError, match=reason):
        read_manifest(path)


def test_hash_mismatch_is_refused_after_copy_and_cleaned_up(tmp_path: Path) -> None:
    tampered = MODEL_BYTES[:-1] + b"!"  # same size, other bytes
    path = write_tar(
        tmp_path / "evil.tar",
        [member("manifest.json", manifest_for({"model.onnx": MODEL_BYTES})), member("model.onnx", tampered)],
    )
    assert read_manifest(path).variants[0].size == len(tampered)  # headers alone look fine
    dest = tmp_path / "slot"
    dest.mkdir()  # a pre-existing empty directory is kept, but emptied again
    with pytest.raises(BundleError, match="SHA-256"):
        extract_bundle(path, dest)
    assert dest.is_dir() and list(dest.iterdir()) == []
    with pytest.raises(BundleError, match="SHA-256"):
        verify_bundle(path)


def test_too_many_files(tmp_path: Path) -> None:
    files = {f"m{i}.onnx": MODEL_BYTES + bytes([i]) for i in range(3)}
    members = [member("manifest.json", manifest_for(files))] + [member(n, d) for n, d in files.items()]
    path = write_tar(tmp_path / "many.tar", members)
    with pytest.raises(BundleError, match="more than 3 files"):
        extract_bundle(path, tmp_path / "out", max_files=3)
    assert extract_bundle(path, tmp_path / "ok", max_files=4).variants[2].file == "m2.onnx"


def test_total_size_cap(tmp_path: Path) -> None:
    big = b"\0" * 20_000
    path = write_tar(
        tmp_path / "big.tar",
        [member("manifest.json", manifest_for({"model.onnx": big})), member("model.onnx", big)],
    )
    with pytest.raises(BundleError, match="cap"):
        extract_bundle(path, tmp_path / "out", max_total_bytes=10_000)
    assert not (tmp_path / "out").exists()


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    big = bytes(range(256)) * 40
    path = write_tar(
        tmp_path / "t.tar",
        [member("manifest.json", manifest_for({"model.onnx": big})), member("model.onnx", big)],
    )
    data = path.read_bytes()
    cut = data.index(big[:512]) + 5000  # inside the model's bytes
    path.write_bytes(data[:cut])
    with pytest.raises(BundleError):
        extract_bundle(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compressed_archive_is_refused(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "ok.tar", good_members())
    gz = tmp_path / "ok.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(BundleError, match="gzip-compressed; bundles are uncompressed tar"):
        read_manifest(gz)


def test_destination_must_be_new_or_empty(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "ok.tar", good_members())
    dest = tmp_path / "slot"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        extract_bundle(path, dest)
    assert (dest / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        extract_bundle(path, tmp_path / "file")
