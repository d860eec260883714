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
CHUNK = 1024 * 1024
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

    graphs: dict[str, _GraphSignature] = {}
    variants: list[Variant] = []
    sources: dict[str, Path] = {}
    for hardware, raw_path in model_files.items():
        path = Path(raw_path)
        file_name = variant_file_name(hardware)
        graphs[hardware] = _check_onnx(path)
        sources[file_name] = path
        variants.append(
            Variant(hardware=hardware, file=file_name, sha256=sha256_file(path), size=path.stat().st_size)
        )

    first = next(iter(graphs.values()))
    in_specs = tuple(inputs) if inputs is not None else first.inputs
    out_specs = tuple(outputs) if outputs is not None else first.outputs
    for hardware, graph in graphs.items():
        _check_signature(in_specs, graph.inputs, "input", model_files[hardware])
        _check_signature(out_specs, graph.outputs, "output", model_files[hardware])

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


class _GraphSignature:
    def __init__(self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
        self.inputs = inputs
        self.outputs = outputs


def _check_onnx(path: Path) -> _GraphSignature:
    """Load and check one model file; return its input/output signature."""
    import onnx  # heavy import, only needed when building

    if not path.is_file():
        raise BundleError(f"model file {str(path)!r} does not exist or is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BundleError(f"{path} is not a loadable ONNX model: {exc}") from exc
    # Every tensor, not only the main graph's initializers: a Constant node's value or a subgraph's
    # weights can live in external files too, and the bundle would ship without them (or the
    # location could point outside the bundle on the device).
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise BundleError(
                f"{path} keeps tensor {tensor.name!r} in external data ({location!r}), which a bundle "
                "cannot carry: save the model with all tensors inside one .onnx file"
            )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BundleError(f"{path} fails the ONNX checker: {exc}") from exc
    initializers = {t.name for t in model.graph.initializer}
    # Older exporters list weights as graph inputs too; they are not inputs a request supplies.
    inputs = tuple(_spec(v, path) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, path) for v in model.graph.output)
    if not inputs or not outputs:
        raise BundleError(f"{path} has no graph inputs or no graph outputs")
    return _GraphSignature(inputs, outputs)


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


def _spec(value_info: Any, path: Path) -> TensorSpec:
    import onnx

    if not value_info.type.HasField("tensor_type"):
        raise BundleError(f"{path}: tensor {value_info.name!r} is not a plain tensor (sequence/map types)")
    tensor_type = value_info.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except Exception:
        dtype = f"onnx type {tensor_type.elem_type}"
    if dtype not in DTYPES:
        raise BundleError(
            f"{path}: tensor {value_info.name!r} has element type {dtype}, "
            f"which is not served (supported: {', '.join(DTYPES)})"
        )
    shape: tuple[int, ...] = ()
    if tensor_type.HasField("shape"):
        # Symbolic or unknown dimensions (and the odd 0) are chosen per request: -1.
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim
        )
    return TensorSpec(name=value_info.name, dtype=dtype, shape=shape)


def _check_signature(
    declared: Sequence[TensorSpec], actual: Sequence[TensorSpec], kind: str, path: Path
) -> None:
    by_name = {spec.name: spec for spec in actual}
    for spec in declared:
        found = by_name.get(spec.name)
        if found is None:
            raise BundleError(
                f"manifest {kind} {spec.name!r} is not a graph {kind} of {path} "
                f"(graph {kind}s: {', '.join(by_name) or 'none'})"
            )
        if found.dtype != spec.dtype:
            raise BundleError(f"{kind} {spec.name!r}: manifest says {spec.dtype}, {path} says {found.dtype}")
        if found.shape and len(found.shape) != len(spec.shape):
            raise BundleError(
                f"{kind} {spec.name!r}: manifest rank {len(spec.shape)} differs from the graph's "
                f"rank {len(found.shape)} in {path}"
            )
    if kind == "input":
        missing = set(by_name) - {spec.name for spec in declared}
        if missing:
            raise BundleError(
                f"{path} needs inputs the manifest does not declare: {', '.join(sorted(missing))}"
            )


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
    bundle_path: Path, *, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, max_files: int = DEFAULT_MAX_FILES
) -> Manifest:
    """All of `extract_bundle`'s checks, hashing model files in place without writing anything."""
    with _open(bundle_path, max_total_bytes, max_files) as tar:
        manifest, members = _check_members(tar, max_total_bytes, max_files)
        budget = _Budget(max_total_bytes)
        for member in members:
            if member.name == MANIFEST_NAME:
                continue
            digest = hashlib.sha256()
            size = 0
            for chunk in _member_chunks(tar, member, budget):
                digest.update(chunk)
                size += len(chunk)
            _check_variant_bytes(manifest, member.name, size, digest.hexdigest())
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
        raise BundleError(f"bundle {path} is {size} bytes, above the {max_total_bytes}-byte cap")
    try:
        # "r:" accepts only uncompressed tar: decompression bombs are not our problem to solve.
        return tarfile.open(path, mode="r:")
    except tarfile.TarError as exc:
        raise BundleError(f"{path} is not an uncompressed tar archive: {exc}") from exc


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
            raise BundleError(f"bundle has more than {max_files} files")
        _check_member_header(member)
        if member.name in seen:
            raise BundleError(f"bundle member {member.name!r} appears twice")
        seen.add(member.name)
        total += member.size
        if total > max_total_bytes:
            raise BundleError(f"bundle members add up to more than the {max_total_bytes}-byte cap")
        members.append(member)

    by_name = {m.name: m for m in members}
    manifest_member = by_name.get(MANIFEST_NAME)
    if manifest_member is None:
        raise BundleError(f"bundle has no {MANIFEST_NAME}")
    if manifest_member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST_NAME} is {manifest_member.size} bytes, above {MAX_MANIFEST_BYTES}")
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
    if member.issym():
        raise BundleError(f"bundle member {name!r} is a symbolic link; bundles hold regular files only")
    if member.islnk():
        raise BundleError(f"bundle member {name!r} is a hard link; bundles hold regular files only")
    if member.isdev():
        raise BundleError(f"bundle member {name!r} is a device or FIFO; bundles hold regular files only")
    if member.isdir():
        raise BundleError(f"bundle member {name!r} is a directory; bundles are flat")
    if not member.isreg() or member.issparse():
        raise BundleError(f"bundle member {name!r} is not a regular file")
    pure = PurePosixPath(name)
    if name.startswith(("/", "\\")) or pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"bundle member {name!r} has an absolute path")
    if ".." in pure.parts or ".." in name.split("\\"):
        raise BundleError(f"bundle member {name!r} tries path traversal ('..')")
    if "/" in name or "\\" in name:
        raise BundleError(f"bundle member {name!r} is nested in a directory; bundles are flat")
    if not FILE_RE.match(name):
        raise BundleError(f"bundle member name {name!r} is not a plain file name")


def _parse_manifest(data: bytes) -> Manifest:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST_NAME} is not valid UTF-8 JSON: {exc}") from exc
    return Manifest.from_dict(raw)


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
