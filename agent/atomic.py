"""The agent's state files: JSON written through `fleet.core.atomic`, read back strictly.

Every file the agent relies on after a crash is either the old or the new version; a file that
exists but does not parse is a disk fault, reported as `CorruptStateError`, never a silent reset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleet.core.atomic import write_bytes_atomic
from fleet.core.errors import FleetError


class CorruptStateError(FleetError):
    """A state file exists but cannot be parsed. Atomic writes make this a disk fault, not a crash."""

    code = "corrupt_state"


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
