"""Model slots on disk: where verified bundles live, and the per-model update record.

Layout under the agent's data directory (`root`):

    models/<model>/state.json               the UpdateRecord, written atomically before each state
    models/<model>/versions/<version>/      extracted, verified bundles: the slots
    models/<model>/staging/<version>/       where a bundle is extracted before it becomes a slot
    downloads/<model>-<version>.part        a download in progress (resumable)
    downloads/<model>-<version>.tar         a completed download, kept until it is staged

Rules this module enforces:

- A version directory under `versions/` only ever appears whole: a bundle is extracted and checked
  in `staging/`, then moved in with one `os.replace` (same filesystem, so atomic). A crash during
  extraction leaves only staging debris, which the next staging of that version clears.
- A slot is re-hashed against its manifest (`verify_version`) before it is loaded after a restart,
  so a file corrupted on disk is never served.
- Model and version names are validated before they become path components.
- Pruning keeps what a rollback needs: serving, shadow and previous versions stay on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from fleet.agent.atomic import CorruptStateError, read_json, write_json_atomic
from fleet.core.atomic import fsync_dir
from fleet.core.bundle import sha256_file
from fleet.core.errors import BundleError, NotFoundError
from fleet.core.manifest import MANIFEST_NAME, Manifest, check_name, check_version
from fleet.core.update import UpdateRecord

# Written beside the bundle files when a slot is staged: the BundleRef it came from (the bundle's
# signed sha256 is reported in the actual state). Not part of the bundle, so verification skips it.
SLOT_INFO = ".slot.json"


class ModelStore:
    """The agent's model files and update records under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.downloads_dir = self.root / "downloads"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)

    # -- paths --------------------------------------------------------------------------------

    def model_dir(self, model: str) -> Path:
        return self.models_dir / check_name(model)

    def version_dir(self, model: str, version: str) -> Path:
        return self.model_dir(model) / "versions" / check_version(version)

    def staging_dir(self, model: str, version: str) -> Path:
        return self.model_dir(model) / "staging" / check_version(version)

    def part_path(self, model: str, version: str) -> Path:
        return self.downloads_dir / f"{check_name(model)}-{check_version(version)}.part"

    def download_path(self, model: str, version: str) -> Path:
        """Where a completed, hash-checked download waits to be staged."""
        return self.part_path(model, version).with_suffix(".tar")

    def _record_path(self, model: str) -> Path:
        return self.model_dir(model) / "state.json"

    # -- update record ------------------------------------------------------------------------

    def load_record(self, model: str) -> UpdateRecord:
        """The model's persisted record, or a fresh Idle one when there is none yet.

        Raises `CorruptStateError` when the file exists but cannot be read as a record.
        """
        path = self._record_path(model)
        raw = read_json(path, None)
        if raw is None:
            return UpdateRecord(model=model)
        try:
            record = UpdateRecord.from_dict(raw)
        except ValueError as exc:
            raise CorruptStateError(f"update record {path} is invalid: {exc}", path=str(path)) from exc
        if record.model != model:
            raise CorruptStateError(
                f"update record {path} belongs to model {record.model!r}, not {model!r}", path=str(path)
            )
        return record

    def save_record(self, record: UpdateRecord) -> None:
        write_json_atomic(self._record_path(record.model), record.to_dict())

    # -- slots --------------------------------------------------------------------------------

    def has_version(self, model: str, version: str) -> bool:
        return (self.version_dir(model, version) / MANIFEST_NAME).is_file()

    def versions(self, model: str) -> list[str]:
        base = self.model_dir(model) / "versions"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def manifest_for(self, model: str, version: str) -> Manifest:
        path = self.version_dir(model, version) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotFoundError(f"{model}:{version} is not on this device (no {path})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"the manifest of slot {model}:{version} is corrupt: {exc}") from exc
        manifest = Manifest.from_dict(raw)
        if manifest.name != model or manifest.version != version:
            raise BundleError(f"slot {model}:{version} holds the manifest of {manifest.ref}")
        return manifest

    def verify_version(self, model: str, version: str) -> bool:
        """Whether the slot is intact: its manifest parses and every listed file has its size and hash.

        Every variant is checked, not only the one this device loads, so a slot that verifies is
        byte-for-byte what the release signed. Files the manifest does not list (other than the
        slot's own info file) make the slot suspect too.
        """
        directory = self.version_dir(model, version)
        try:
            manifest = self.manifest_for(model, version)
        except (NotFoundError, BundleError):
            return False
        listed = {v.file for v in manifest.variants}
        try:
            present = {p.name for p in directory.iterdir()}
        except OSError:
            return False
        if present - listed - {MANIFEST_NAME, SLOT_INFO}:
            return False
        for variant in manifest.variants:
            path = directory / variant.file
            try:
                if path.is_symlink() or path.stat().st_size != variant.size:
                    return False
                if sha256_file(path) != variant.sha256:
                    return False
            except OSError:
                return False
        return True

    def install_staged(self, model: str, version: str, bundle: dict[str, Any] | None) -> Path:
        """Move a fully extracted staging dir into `versions/` in one rename; return the slot path.

        `bundle` (the BundleRef the slot came from) is written into the slot first, so the slot and
        its info appear together. An existing slot of the same version is replaced.
        """
        staging = self.staging_dir(model, version)
        if not (staging / MANIFEST_NAME).is_file():
            raise BundleError(f"nothing staged for {model}:{version} (no {staging / MANIFEST_NAME})")
        write_json_atomic(staging / SLOT_INFO, {"bundle": bundle})
        target = self.version_dir(model, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # Never served while we replace it: the caller stages only versions that are not loaded.
            shutil.rmtree(target)
        os.replace(staging, target)
        fsync_dir(target.parent)
        return target

    def slot_info(self, model: str, version: str) -> dict[str, Any]:
        """What `install_staged` recorded about the slot; {} when unknown or unreadable."""
        try:
            info = read_json(self.version_dir(model, version) / SLOT_INFO, {})
        except CorruptStateError:
            return {}
        return info if isinstance(info, dict) else {}

    def remove_version(self, model: str, version: str) -> None:
        shutil.rmtree(self.version_dir(model, version), ignore_errors=True)

    def clear_staging(self, model: str, version: str | None = None) -> None:
        """Drop staging debris (of one version, or all) left by an interrupted extraction."""
        path = self.staging_dir(model, version) if version else self.model_dir(model) / "staging"
        shutil.rmtree(path, ignore_errors=True)

    def remove_downloads(self, model: str, version: str) -> None:
        for path in (self.part_path(model, version), self.download_path(model, version)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def prune(self, model: str, keep: set[str]) -> list[str]:
        """Delete slots not in `keep` (and all staging debris); return the versions removed.

        Callers keep serving, shadow and previous: the previous version stays cached so that a
        rollback is a local load, not a download.
        """
        removed = []
        for version in self.versions(model):
            if version not in keep:
                self.remove_version(model, version)
                removed.append(version)
        self.clear_staging(model)
        return removed

    # -- the device -----------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def models(self) -> list[str]:
        """Models this device has state or slots for."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir())

