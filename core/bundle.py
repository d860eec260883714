"""The bundle format: one uncompressed tar holding `manifest.json` and the model files it lists.

Rules this module enforces:

- **Building** is deterministic (manifest first, then the model files sorted by name; mtime 0,
  uid/gid 0, mode 0644, no user names), so the same inputs always give the same bytes and the
  same SHA-256: the release key signs that hash. Every model file must be a loadable, checked
  ONNX model with all its weights inside the file.
- **Reading** trusts nothing in the archive. A bundle is flat: only regular files with plain
  names, no links, devices, directories, duplicates or members the manifest does not list; the
  file count and the total size are capped from the headers *and* while copying bytes; every
  model file must match the size and SHA-256 the manifest states. Extraction writes into a new or
  empty directory and removes everything it wrote when any check fails.

Bundles are read from and written to local paths only; this module does no network IO.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from fleet.core.atomic import atomic_writer, fsync_dir
from fleet.core.errors import BundleError
from fleet.core.manifest import (
    DTYPES,
    FILE_RE,
    MANIFEST_NAME,
    Manifest,
    TensorSpec,
    Variant,
    check_name,
    check_version,
)

DEFAULT_MAX_TOTAL_BYTES = 4 * 1024**3
DEFAULT_MAX_FILES = 64
# The manifest holds a drift profile, so it can be sizeable, but never model-sized.
MAX_MANIFEST_BYTES = 16 * 1024**2
# A single-file ONNX model is one protobuf message, and protobuf cannot hold 2 GiB or more.
MAX_MODEL_FILE_BYTES = 2**31 - 1
# manifest.json nests a drift profile a few levels deep; hundreds of levels is an attack on the parser.
MAX_JSON_DEPTH = 32
# PAX and GNU long-name headers are read into memory whole by tarfile; real ones are a few hundred bytes.
MAX_META_HEADER_BYTES = 64 * 1024
CHUNK = 1024 * 1024
# Leading bytes of the compressed formats a bundle might arrive in by mistake (or as a bomb).
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
# Tar headers and padding: a bundle file may exceed the sum of its members by this much per member.
_TAR_OVERHEAD_PER_MEMBER = 3 * 512
_TAR_OVERHEAD_FIXED = 20 * 512


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large models do not sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def variant_file_name(hardware: str) -> str:
    """The name a variant's model file gets inside the bundle."""
    name = "model.onnx" if hardware == "any" else f"model-{hardware}.onnx"
    if not FILE_RE.match(name):
        raise BundleError(
            f"hardware class {hardware!r} cannot name a bundle file: use letters, digits, '.', '_' or '-'"
        )
    return name


# --------------------------------------------------------------------------------------------------
# Building


def build_bundle(
    out_path: Path,
    *,
    name: str,
    version: str,
    task: str,
    model_files: Mapping[str, Path],
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
    release: int = 0,
    class_names: Sequence[str] = (),
    description: str = "",
    profile: Mapping[str, Any] | None = None,
    outputs_layout: Mapping[str, Any] | None = None,
    created_at: str = "",
) -> Manifest:
    """Write a bundle to `out_path` and return its manifest.

    `model_files` maps a hardware class to an ONNX file ("any" for the portable one). When
    `inputs`/`outputs` are None they are read from the graph of the first file (symbolic
    dimensions become -1). Every variant must expose the same tensor names and types as the
    manifest, so the agent can swap one variant for another. `created_at` is empty by default
    because a timestamp would make two builds of the same inputs differ.
    """
    check_name(name)
    check_version(version)
    if not model_files:
        raise BundleError("a bundle needs at least one model file (hardware class -> .onnx path)")

    graphs: dict[str, GraphSignature] = {}
    variants: list[Variant] = []
    sources: dict[str, Path] = {}
    for hardware, raw_path in model_files.items():
        path = Path(raw_path)
        file_name = variant_file_name(hardware)
        graphs[hardware] = inspect_model(path, str(path))
        if not graphs[hardware].inputs or not graphs[hardware].outputs:
            raise BundleError(f"{path} has no graph inputs or no graph outputs")
        sources[file_name] = path
        variants.append(
            Variant(hardware=hardware, file=file_name, sha256=sha256_file(path), size=path.stat().st_size)
        )

    first_hardware, first = next(iter(graphs.items()))
    first_path = Path(model_files[first_hardware])
    in_specs = tuple(inputs) if inputs is not None else _specs_from_graph(first.inputs, first_path)
    out_specs = tuple(outputs) if outputs is not None else _specs_from_graph(first.outputs, first_path)
    # The same rule the controller applies at push and the device at load, so a bundle that builds
    # is never refused later for its signature.
    for hardware, graph in graphs.items():
        check_model_matches(in_specs, out_specs, graph, str(model_files[hardware]))

    # Round-trip through the dict form so the manifest we write is exactly what readers accept.
    manifest = Manifest.from_dict(
        Manifest(
            name=name,
            version=version,
            task=task,
            inputs=in_specs,
            outputs=out_specs,
            variants=tuple(variants),
            release=release,
            class_names=tuple(class_names),
            created_at=created_at,
            description=description,
            profile=dict(profile or {}),
            outputs_layout=dict(outputs_layout or {}),
        ).to_dict()
    )
    manifest_bytes = manifest_json(manifest)

    # Written beside the target and renamed, so a crash never leaves a half bundle under the real name.
    with (
        atomic_writer(Path(out_path), mode=0o644) as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(_tar_info(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
        for file_name in sorted(sources):
            variant = next(v for v in manifest.variants if v.file == file_name)
            with open(sources[file_name], "rb") as src:
                tar.addfile(_tar_info(file_name, variant.size), src)
    return manifest


def manifest_json(manifest: Manifest) -> bytes:
    """Canonical bytes of a manifest: sorted keys, so equal manifests serialize equally."""
    return (json.dumps(manifest.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


@dataclass(frozen=True)
class GraphTensor:
    """A graph input or output as a model declares it.

    `dtype` is a manifest dtype name where the type is one the system serves, else a description
    of the real type; `dims` holds None for a symbolic or unknown dimension, and is None itself
    when the model declares no shape at all (then only name and type can be compared).
    """

    name: str
    dtype: str
    dims: tuple[int | None, ...] | None

    def shown(self) -> str:
        if self.dims is None:
            return "unknown shape"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


@dataclass(frozen=True)
class GraphSignature:
    """The inputs (initializers excluded) and outputs of a model's main graph."""

    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]


def signature_problems(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], graph: GraphSignature
) -> list[str]:
    """Every way a model's signature differs from the manifest's (empty when they agree).

    The one rule for the build, the controller's push check and the device's load check: same
    input and output names both ways, same dtypes, same ranks, equal fixed dimensions. An input the
    manifest calls dynamic (-1) must be dynamic in the model too, because clients rely on sending
    any size there; an output may be declared looser than the model (that harms nobody).
    """
    problems: list[str] = []
    for kind, specs, actual, strict_dynamic in (
        ("input", inputs, graph.inputs, True),
        ("output", outputs, graph.outputs, False),
    ):
        by_name = {t.name: t for t in actual}
        wanted = {s.name for s in specs}
        missing = [s.name for s in specs if s.name not in by_name]
        extra = [t.name for t in actual if t.name not in wanted]
        if missing:
            problems.append(f"{kind}s in the manifest but not in the model: {', '.join(missing)}")
        if extra:
            problems.append(f"{kind}s in the model but not in the manifest: {', '.join(extra)}")
        for spec in specs:
            found = by_name.get(spec.name)
            if found is not None:
                problems.extend(_tensor_problems(spec, found, kind, strict_dynamic))
    return problems


def _tensor_problems(spec: TensorSpec, found: GraphTensor, kind: str, strict_dynamic: bool) -> list[str]:
    problems: list[str] = []
    if found.dtype != spec.dtype:
        problems.append(f"{kind} {spec.name!r}: manifest says {spec.dtype}, model has {found.dtype}")
    if found.dims is None:
        return problems
    if len(found.dims) != len(spec.shape):
        problems.append(
            f"{kind} {spec.name!r}: manifest rank {len(spec.shape)} {list(spec.shape)}, "
            f"model rank {len(found.dims)} {found.shown()}"
        )
        return problems
    for axis, (want, have) in enumerate(zip(spec.shape, found.dims, strict=True)):
        if want == -1 and have is not None and strict_dynamic:
            problems.append(
                f"{kind} {spec.name!r} dim {axis}: manifest says dynamic (-1), model fixes it to {have}"
            )
        elif want != -1 and have is not None and want != have:
            problems.append(f"{kind} {spec.name!r} dim {axis}: manifest says {want}, model has {have}")
    return problems


def check_model_matches(manifest_inputs: Sequence[TensorSpec], manifest_outputs: Sequence[TensorSpec],
                        graph: GraphSignature, where: str) -> None:
    """Raise `BundleError` listing every difference between the manifest and the model's graph."""
    problems = signature_problems(manifest_inputs, manifest_outputs, graph)
    if problems:
        raise BundleError(
            f"{where} does not match its manifest: {'; '.join(problems)}. Build the bundle from the model "
            "(`fleet models push` reads the signature from the graph) or correct the declared inputs/outputs",
            problems=problems,
        )


def inspect_model(source: Path | bytes, where: str, *, run_checker: bool = True) -> GraphSignature:
    """Parse an ONNX file without touching external data, refuse what a bundle cannot be, and
    return its signature.

    Refused, each with its own message: a file that is not a protobuf ModelProto (junk, truncated),
    a file above the 2 GiB protobuf limit, a symbolic link, and any tensor kept in external data
    (an absolute or `..` location points outside the bundle; any other location names a file the
    manifest does not list or hash, since a bundle carries all weights inside its model files).
    With `run_checker`, the ONNX checker must pass too (the device leaves that to ONNX Runtime).
    """
    import onnx  # heavy import, only needed where models are inspected

    if isinstance(source, Path):
        if source.is_symlink():
            raise BundleError(f"{where} is a symbolic link; a model file must be a regular file in its slot")
        if not source.is_file():
            raise BundleError(f"model file {where} does not exist or is not a file")
        size = source.stat().st_size
        if size > MAX_MODEL_FILE_BYTES:
            raise BundleError(_too_big_for_protobuf(where, size))
        data = source.read_bytes()
    else:
        data = source
        if len(data) > MAX_MODEL_FILE_BYTES:
            raise BundleError(_too_big_for_protobuf(where, len(data)))
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise BundleError(
            f"{where} is not an ONNX model (not a valid protobuf ModelProto, or truncated): {exc}"
        ) from exc
    if not model.HasField("graph") or not model.opset_import:
        raise BundleError(
            f"{where} is not an ONNX model (no graph or no opset: not a ModelProto, or truncated)"
        )
    del data
    # Every tensor, not only the main graph's initializers: a Constant node's value or a subgraph's
    # weights can live in external files too, and ONNX Runtime would read them from wherever the
    # location points, relative to the model's folder.
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            raise BundleError(_external_data_reason(where, tensor.name, location))
    if run_checker:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise BundleError(f"{where} fails the ONNX checker: {exc}") from exc
    initializers = {t.name for t in model.graph.initializer}
    # Older exporters list weights as graph inputs too; they are not inputs a request supplies.
    inputs = tuple(_graph_tensor(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_graph_tensor(v) for v in model.graph.output)
    return GraphSignature(inputs, outputs)


def _too_big_for_protobuf(where: str, size: int) -> str:
    return (
        f"{where} is {size} bytes, above the {MAX_MODEL_FILE_BYTES}-byte limit of a single-file ONNX model "
        "(protobuf's 2 GiB); bundles do not carry external weight files: quantize or split the model"
    )


def _external_data_reason(where: str, tensor: str, location: str) -> str:
    shown = _shown(location)
    pure = PurePosixPath(location.replace("\\", "/"))
    if not location:
        why = "with no location"
    elif pure.is_absolute() or (len(location) > 1 and location[1] == ":"):
        why = f"at the absolute path {shown}, outside the bundle"
    elif ".." in pure.parts:
        why = f"at {shown}, which climbs out of the bundle ('..')"
    else:
        why = f"in {shown}, a file the manifest does not list or hash"
    return (
        f"{where} keeps tensor {_shown(tensor)} in external data {why}; a bundle carries every weight "
        "inside its .onnx files: save the model with all tensors inside one file "
        "(onnx.save_model(model, path, save_as_external_data=False))"
    )


def _all_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, node attributes, subgraphs and local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for subgraph in attr.graphs:
            yield from _graph_tensors(subgraph)


def _graph_tensor(value_info: Any) -> GraphTensor:
    import onnx

    if not value_info.type.HasField("tensor_type"):
        return GraphTensor(value_info.name, "a non-tensor type (sequence, map or optional)", None)
    tensor_type = value_info.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except Exception:
        dtype = f"onnx element type {tensor_type.elem_type}"
    dims: tuple[int | None, ...] | None = None
    if tensor_type.HasField("shape"):
        # Symbolic or unknown dimensions (and the odd 0) are chosen per request.
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim
        )
    return GraphTensor(value_info.name, dtype, dims)


def _specs_from_graph(tensors: Sequence[GraphTensor], path: Path) -> tuple[TensorSpec, ...]:
    """Manifest specs for a graph's tensors (build time): -1 for dynamic dims, types we serve only."""
    specs: list[TensorSpec] = []
    for tensor in tensors:
        if tensor.dtype not in DTYPES:
            raise BundleError(
                f"{path}: tensor {tensor.name!r} has {tensor.dtype}, which is not served "
                f"(supported: {', '.join(DTYPES)})"
            )
        dims = () if tensor.dims is None else tuple(-1 if d is None else d for d in tensor.dims)
        specs.append(TensorSpec(name=tensor.name, dtype=tensor.dtype, shape=dims))
    return tuple(specs)


def _shown(text: str, limit: int = 80) -> str:
    """A name for an error message: repr'd, and cut short, since hostile names can be megabytes."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


# --------------------------------------------------------------------------------------------------
# Reading


def read_manifest(
    bundle_path: Path, *, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, max_files: int = DEFAULT_MAX_FILES
) -> Manifest:
    """Read and validate the manifest, checking every member header; model bytes are not hashed.

    Use `verify_bundle` (hashes, no extraction) or `extract_bundle` for the full checks.
    """
    with _open(bundle_path, max_total_bytes, max_files) as tar:
        manifest, _ = _check_members(tar, max_total_bytes, max_files)
    return manifest


def verify_bundle(
    bundle_path: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    check_models: bool = False,
) -> Manifest:
    """All of `extract_bundle`'s checks, hashing model files in place without writing anything.

    With `check_models` (the registry's push check), every model file must also be a valid ONNX
    model with no external data whose inputs and outputs agree with the manifest
    (`inspect_model`, `check_model_matches`); each file is held in memory while it is checked.
    """
    with _open(bundle_path, max_total_bytes, max_files) as tar:
        manifest, members = _check_members(tar, max_total_bytes, max_files)
        budget = _Budget(max_total_bytes)
        for member in members:
            if member.name == MANIFEST_NAME:
                continue
            digest = hashlib.sha256()
            size = 0
            chunks: list[bytes] = []
            for chunk in _member_chunks(tar, member, budget):
                digest.update(chunk)
                size += len(chunk)
                if check_models:
                    chunks.append(chunk)
            _check_variant_bytes(manifest, member.name, size, digest.hexdigest())
            if check_models:
                data = b"".join(chunks)
                chunks.clear()
                graph = inspect_model(data, f"{manifest.ref}: {member.name}")
                del data
                check_model_matches(manifest.inputs, manifest.outputs, graph, f"{manifest.ref}: {member.name}")
    return manifest


def extract_bundle(
    bundle_path: Path,
    dest: Path,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
) -> Manifest:
    """Safely extract a bundle into `dest` (new or empty) and return its verified manifest.

    On any failure everything written is removed (and `dest` itself, if this call created it).
    """
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise BundleError(f"cannot extract into {dest}: it exists and is not a directory")
    created = not dest.exists()
    if not created and any(dest.iterdir()):
        raise BundleError(f"cannot extract into {dest}: the directory is not empty")
    with _open(bundle_path, max_total_bytes, max_files) as tar:
        manifest, members = _check_members(tar, max_total_bytes, max_files)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            budget = _Budget(max_total_bytes)
            for member in members:
                _extract_member(tar, member, dest, budget, manifest)
            fsync_dir(dest)
        except BaseException:
            _remove_written(dest, created)
            raise
    return manifest


def _open(bundle_path: Path, max_total_bytes: int, max_files: int) -> tarfile.TarFile:
    path = Path(bundle_path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BundleError(f"bundle {str(path)!r} does not exist") from None
    # Cheap first cap: a hostile archive cannot make tarfile read more than the file holds.
    cap = max_total_bytes + MAX_MANIFEST_BYTES + _TAR_OVERHEAD_FIXED + max_files * _TAR_OVERHEAD_PER_MEMBER
    if size > cap:
        raise BundleError(
            f"bundle {path} is {size} bytes, above the {max_total_bytes}-byte cap: "
            "raise the cap (FLEET_MAX_BUNDLE_BYTES on the controller) or ship a smaller model"
        )
    with path.open("rb") as handle:
        head = handle.read(8)
        for magic, kind in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                # A compressed bundle could expand far beyond what its size suggests; its hash is
                # signed over the tar bytes anyway, so there is nothing to gain from compression.
                raise BundleError(
                    f"{path} is {kind}-compressed; bundles are uncompressed tar archives (compressed "
                    "ones are refused so a small upload cannot expand into a huge one): build it with "
                    "`fleet models push` or `tar -cf`"
                )
        _prescan_headers(handle, path, max_files)
    try:
        # "r:" accepts only uncompressed tar: nothing here ever decompresses.
        return tarfile.open(path, mode="r:")
    except tarfile.TarError as exc:
        raise BundleError(f"{path} is not an uncompressed tar archive: {exc}") from exc


def _prescan_headers(handle: IO[bytes], path: Path, max_files: int) -> None:
    """Walk the raw tar headers before tarfile does, refusing what tarfile would buffer whole.

    tarfile reads a PAX extended header or a GNU long name/link into memory at whatever size its
    header claims, so a hostile archive could make the reader allocate gigabytes before any of
    our per-member checks run. Real ones are a few hundred bytes. The walk is bounded by the
    member cap (each member may carry a few such headers).
    """
    handle.seek(0)
    limit = 4 * max_files + 8
    for _ in range(limit + 1):
        header = handle.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE or header == tarfile.NUL * tarfile.BLOCKSIZE:
            return  # end of archive (or a short one, which tarfile reports)
        size = _tar_number(header[124:136])
        if size is None:
            return  # tarfile refuses the header with its own message
        kind = header[156:157]
        if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and (
            size > MAX_META_HEADER_BYTES
        ):
            raise BundleError(
                f"{path} has a {size}-byte tar extension header (PAX or GNU long name), above the "
                f"{MAX_META_HEADER_BYTES}-byte limit: rebuild the bundle with plain file names"
            )
        if size < 0:
            raise BundleError(f"{path} has a tar header with a negative size")
        handle.seek(-(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, os.SEEK_CUR)
    raise BundleError(
        f"{path} has more than {limit} tar headers; a bundle holds at most {max_files} files"
    )


def _tar_number(field: bytes) -> int | None:
    """A tar header number: octal text, or GNU base-256 when the high bit is set; None if garbled."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _check_members(
    tar: tarfile.TarFile, max_total_bytes: int, max_files: int
) -> tuple[Manifest, list[tarfile.TarInfo]]:
    """Header-level checks of every member, then the manifest against the member list."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as exc:
            raise BundleError(f"corrupt tar archive: {exc}") from exc
        if member is None:
            break
        if len(members) >= max_files:
            raise BundleError(
                f"bundle has more than {max_files} files; a bundle holds manifest.json and one model "
                "file per hardware variant"
            )
        _check_member_header(member)
        if member.name in seen:
            # tarfile would let the later copy win; which one a reader sees must never be ambiguous.
            raise BundleError(f"bundle member {member.name!r} appears twice; member names must be unique")
        seen.add(member.name)
        if member.name != MANIFEST_NAME and member.size > MAX_MODEL_FILE_BYTES:
            raise BundleError(_too_big_for_protobuf(f"bundle member {member.name!r}", member.size))
        total += member.size
        if total > max_total_bytes:
            raise BundleError(
                f"bundle members add up to more than the {max_total_bytes}-byte cap "
                "(raise FLEET_MAX_BUNDLE_BYTES on the controller if the model really is that large)"
            )
        members.append(member)

    by_name = {m.name: m for m in members}
    manifest_member = by_name.get(MANIFEST_NAME)
    if manifest_member is None:
        raise BundleError(f"bundle has no {MANIFEST_NAME}")
    if manifest_member.size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{MANIFEST_NAME} is {manifest_member.size} bytes, above the {MAX_MANIFEST_BYTES}-byte limit: "
            "build the drift profile from fewer features or bins"
        )
    manifest = _parse_manifest(_read_member(tar, manifest_member))

    listed = {v.file: v for v in manifest.variants}
    for member in members:
        if member.name == MANIFEST_NAME:
            continue
        variant = listed.get(member.name)
        if variant is None:
            raise BundleError(f"bundle member {member.name!r} is not listed by the manifest")
        if member.size != variant.size:
            raise BundleError(
                f"manifest says {member.name!r} is {variant.size} bytes but the archive holds {member.size}"
            )
    missing = sorted(set(listed) - set(by_name))
    if missing:
        raise BundleError(f"manifest lists files missing from the bundle: {', '.join(missing)}")
    return manifest, members


def _check_member_header(member: tarfile.TarInfo) -> None:
    name = member.name
    shown = _shown(name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # tarfile keeps undecodable bytes as surrogates; such a name can mean anything on disk.
        raise BundleError(f"bundle member name {shown} is not valid UTF-8") from None
    if len(name) > 128:
        raise BundleError(
            f"bundle member name {shown} is longer than 128 characters; bundle files have short plain names"
        )
    if member.issym():
        raise BundleError(f"bundle member {shown} is a symbolic link; bundles hold regular files only")
    if member.islnk():
        raise BundleError(f"bundle member {shown} is a hard link; bundles hold regular files only")
    if member.isdev():
        raise BundleError(f"bundle member {shown} is a device or FIFO; bundles hold regular files only")
    if member.isdir():
        raise BundleError(f"bundle member {shown} is a directory; bundles are flat")
    if not member.isreg() or member.issparse():
        raise BundleError(f"bundle member {shown} is not a regular file")
    pure = PurePosixPath(name)
    if name.startswith(("/", "\\")) or pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"bundle member {shown} has an absolute path")
    if ".." in pure.parts or ".." in name.split("\\"):
        raise BundleError(f"bundle member {shown} tries path traversal ('..')")
    if "/" in name or "\\" in name:
        raise BundleError(f"bundle member {shown} is nested in a directory; bundles are flat")
    if not FILE_RE.match(name):
        raise BundleError(f"bundle member name {shown} is not a plain file name: use letters, digits, '.', '_' or '-'")


def _parse_manifest(data: bytes) -> Manifest:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{MANIFEST_NAME} is not valid UTF-8 JSON: {exc}") from exc
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise BundleError(
            f"{MANIFEST_NAME} nests JSON too deeply to parse (the limit is {MAX_JSON_DEPTH} levels)"
        ) from None
    except BundleError:
        raise
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise BundleError(f"{MANIFEST_NAME} is not valid UTF-8 JSON: {exc}") from exc
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise BundleError(
            f"{MANIFEST_NAME} nests JSON {depth} levels deep, above the limit of {MAX_JSON_DEPTH}"
        )
    return Manifest.from_dict(raw)


def _refuse_constant(name: str) -> Any:
    raise BundleError(f"{MANIFEST_NAME} holds {name}, which is not JSON: use a finite number or null")


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is depth 0); iterative,
    so a hostile value cannot exhaust the stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise BundleError(f"bundle member {member.name!r} cannot be read")
    with handle:
        data = handle.read(member.size + 1)
    if len(data) != member.size:
        raise BundleError(f"bundle member {member.name!r} is truncated")
    return data


class _Budget:
    """Counts bytes actually copied, independent of what the headers claim."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise BundleError(f"bundle content exceeds the {self.limit}-byte cap")


def _member_chunks(tar: tarfile.TarFile, member: tarfile.TarInfo, budget: _Budget) -> Iterator[bytes]:
    handle: IO[bytes] | None = tar.extractfile(member)
    if handle is None:
        raise BundleError(f"bundle member {member.name!r} cannot be read")
    copied = 0
    with handle:
        while True:
            try:
                chunk = handle.read(CHUNK)
            except (tarfile.TarError, OSError) as exc:
                raise BundleError(f"bundle member {member.name!r} cannot be read: {exc}") from exc
            if not chunk:
                break
            copied += len(chunk)
            if copied > member.size:
                raise BundleError(f"bundle member {member.name!r} holds more bytes than its header says")
            budget.take(len(chunk))
            yield chunk
    if copied != member.size:
        raise BundleError(f"bundle member {member.name!r} is truncated ({copied} of {member.size} bytes)")


def _extract_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, budget: _Budget, manifest: Manifest
) -> None:
    target = dest / member.name
    # O_EXCL|O_NOFOLLOW: never write through something that appeared at that name meanwhile.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o644)
    except FileExistsError:
        raise BundleError(f"{target} already exists; refusing to overwrite") from None
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out:
        for chunk in _member_chunks(tar, member, budget):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    if member.name != MANIFEST_NAME:
        _check_variant_bytes(manifest, member.name, size, digest.hexdigest())


def _check_variant_bytes(manifest: Manifest, file_name: str, size: int, sha256: str) -> None:
    variant = next(v for v in manifest.variants if v.file == file_name)
    if size != variant.size:
        raise BundleError(f"{file_name!r} is {size} bytes but the manifest says {variant.size}")
    if sha256 != variant.sha256:
        raise BundleError(
            f"{file_name!r} has SHA-256 {sha256} but the manifest says {variant.sha256}: "
            "the model file was altered or corrupted"
        )


def _remove_written(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    # dest was empty when we started, so everything in it now is ours.
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
