"""The bundle manifest: what a model bundle claims about itself.

A bundle is a tar archive holding `manifest.json` and the model file(s) it names. The manifest
is covered by the release signature over the whole archive, so once the archive's hash checks
out, every claim here (file hashes, tensor signatures, task) is the release author's claim.
This module only parses and validates; it does no IO.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.core.agreement import validate_layout
from fleet.core.errors import BundleError

SCHEMA = "fleet.bundle/v1"
MANIFEST_NAME = "manifest.json"
TASKS = ("classification", "detection", "segmentation", "generic")
# ONNX element types the system serves, with their Open Inference Protocol names.
DTYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "bool": "BOOL",
}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,62}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_TENSORS = 64
MAX_RANK = 8
MAX_DIM = 2**63 - 1


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise BundleError(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise BundleError(f"invalid version {version!r}: use 1-63 letters, digits, '.', '_', '+' or '-'")
    return version


def parse_ref(ref: str) -> tuple[str, str]:
    """Split `NAME:VERSION` and validate both halves."""
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise BundleError(f"expected NAME:VERSION, got {ref!r}")
    return check_name(name), check_version(version)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. A dimension of -1 is chosen per request (dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> TensorSpec:
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: expected an object")
        name, dtype, shape = raw.get("name"), raw.get("dtype"), raw.get("shape")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise BundleError(f"{where}: 'name' must be a non-empty string")
        # The isinstance check first: a list or an object is unhashable and would crash the lookup.
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise BundleError(f"{where} ({name}): dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK:
            raise BundleError(f"{where} ({name}): 'shape' must be a list of at most {MAX_RANK} dims")
        dims: list[int] = []
        for dim in shape:
            # ONNX dims are int64: a larger one is no model's and would break the protobuf metadata.
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < -1 or dim == 0 or dim > MAX_DIM:
                raise BundleError(f"{where} ({name}): dimension {dim!r} must be a positive int64 or -1")
            dims.append(dim)
        return cls(name=name, dtype=dtype, shape=tuple(dims))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete request shape fits this spec."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class Variant:
    """One model file of the bundle and the hardware it is meant for ("any" fits all)."""

    hardware: str
    file: str
    sha256: str
    size: int
    providers: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Variant:
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: expected an object")
        hardware, file, sha, size = raw.get("hardware", "any"), raw.get("file"), raw.get("sha256"), raw.get("size")
        providers = raw.get("providers", [])
        if not isinstance(hardware, str) or not hardware:
            raise BundleError(f"{where}: 'hardware' must be a string")
        if not isinstance(file, str) or not FILE_RE.match(file):
            raise BundleError(f"{where}: 'file' must be a plain file name inside the bundle, got {file!r}")
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            raise BundleError(f"{where}: 'sha256' must be 64 lowercase hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise BundleError(f"{where}: 'size' must be a positive integer")
        if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
            raise BundleError(f"{where}: 'providers' must be a list of strings")
        return cls(hardware=hardware, file=file, sha256=sha, size=size, providers=tuple(providers))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["providers"] = list(self.providers)
        return out


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: tuple[Variant, ...]
    release: int = 0
    class_names: tuple[str, ...] = ()
    created_at: str = ""
    description: str = ""
    # Reference profile of inputs and outputs for drift; empty until reference data is given.
    profile: dict[str, Any] = field(default_factory=dict)
    # How to read task outputs (which tensor holds boxes, scores, classes); keys per task in
    # fleet.core.agreement.LAYOUT_SPEC, checked against the outputs by from_dict.
    outputs_layout: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def variant_for(self, hardware_class: str) -> Variant:
        """The variant built for this hardware class, else the portable one."""
        for variant in self.variants:
            if variant.hardware == hardware_class:
                return variant
        for variant in self.variants:
            if variant.hardware == "any":
                return variant
        raise BundleError(
            f"{self.ref} has no variant for hardware {hardware_class!r} and no portable ('any') variant"
        )

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict):
            raise BundleError("manifest must be a JSON object")
        if raw.get("schema") != SCHEMA:
            raise BundleError(f"manifest schema must be {SCHEMA!r}, got {raw.get('schema')!r}")
        name = check_name(str(raw.get("name", "")))
        version = check_version(str(raw.get("version", "")))
        task = raw.get("task", "generic")
        if task not in TASKS:
            raise BundleError(f"task {task!r} is not one of {', '.join(TASKS)}")
        inputs = _tensors(raw.get("inputs"), "inputs")
        outputs = _tensors(raw.get("outputs"), "outputs")
        variants_raw = raw.get("variants")
        if not isinstance(variants_raw, list) or not variants_raw or len(variants_raw) > 16:
            raise BundleError("'variants' must list 1 to 16 model files")
        variants = tuple(Variant.from_dict(v, f"variants[{i}]") for i, v in enumerate(variants_raw))
        if len({v.hardware for v in variants}) != len(variants):
            raise BundleError("two variants name the same hardware class")
        release = raw.get("release", 0)
        if isinstance(release, bool) or not isinstance(release, int) or release < 0:
            raise BundleError("'release' must be a non-negative integer")
        class_names = raw.get("class_names", [])
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
            raise BundleError("'class_names' must be a list of strings")
        profile = raw.get("profile", {})
        layout = raw.get("outputs_layout", {})
        if not isinstance(profile, dict) or not isinstance(layout, dict):
            raise BundleError("'profile' and 'outputs_layout' must be objects")
        # A layout naming an output the model lacks would silently switch off the task's
        # agreement on every device; refuse it at push time instead.
        validate_layout(task, layout, {o.name: o.shape for o in outputs})
        return cls(
            name=name,
            version=version,
            task=task,
            inputs=inputs,
            outputs=outputs,
            variants=variants,
            release=release,
            class_names=tuple(class_names),
            created_at=str(raw.get("created_at", "")),
            description=str(raw.get("description", ""))[:2000],
            profile=profile,
            outputs_layout=layout,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "release": self.release,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "variants": [v.to_dict() for v in self.variants],
            "class_names": list(self.class_names),
            "created_at": self.created_at,
            "description": self.description,
            "profile": self.profile,
            "outputs_layout": self.outputs_layout,
        }


def _tensors(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_TENSORS:
        raise BundleError(f"'{where}' must list 1 to {MAX_TENSORS} tensors")
    specs = tuple(TensorSpec.from_dict(t, f"{where}[{i}]") for i, t in enumerate(raw))
    if len({s.name for s in specs}) != len(specs):
        raise BundleError(f"'{where}' has two tensors with the same name")
    return specs
