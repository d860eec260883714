"""Metadata files of the controller's TUF repository, kept in one local directory.

Implements `fleet.core.trust.MetadataStore`. Every write is atomic (temporary file in the same
directory, fsync, `os.replace`, fsync of the directory), so a crash leaves either the old or the
new file, never a torn one that agents would refuse. Only plain names are accepted: the
repository decides the names, and nothing here may escape the directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from fleet.core.atomic import write_bytes_atomic
from fleet.core.errors import InvalidInputError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class FileMetadataStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, filename: str) -> Path:
        if not _NAME_RE.match(filename) or ".." in filename:
            raise InvalidInputError(f"metadata file name {filename!r} is not a plain file name")
        return self.directory / filename

    def get(self, filename: str) -> bytes | None:
        try:
            return self._path(filename).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, filename: str, data: bytes) -> None:
        # Public metadata: 0644, where mkstemp's 0600 would hide it from a separate web server.
        write_bytes_atomic(self._path(filename), data, mode=0o644)
