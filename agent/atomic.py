"""Atomic files: every file the agent relies on after a crash is either the old or the new version.

Rule: write to a temporary file in the same directory, fsync it, `os.replace` it over the target,
then fsync the directory so the rename itself survives a power cut (python-tuf's
`_persist_metadata` does the same). A reader never sees a half-written file; a crash at any
point leaves the previous content, plus at worst a stray `.tmp` file that the next write ignores.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fleet.core.errors import FleetError


class CorruptStateError(FleetError):
    """A state file exists but cannot be parsed. Atomic writes make this a disk fault, not a crash."""

    code = "corrupt_state"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (a no-op where directories cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Serialize `obj` as JSON (sorted keys, so equal states give equal files) and write atomically."""
    data = (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_bytes_atomic(path, data)


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when the file does not exist.

    A file that exists but is not valid JSON raises `CorruptStateError` naming the file, rather
    than being silently replaced by the default: losing the update record would lose track of
    which slot is safe to serve.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return default
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptStateError(
            f"state file {path} is corrupt ({exc}); the disk may be failing. Move it aside to let the "
            "agent start afresh from the desired state",
            path=str(path),
        ) from exc
