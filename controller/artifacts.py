"""Artifact storage for bundle bytes, behind one small interface.

Rules this module enforces:

- `put` streams: bytes are hashed (SHA-256) while written and never held in memory whole;
- `put` is atomic: bytes go to a temporary file in the destination folder, are fsynced, and
  only then renamed over the key with `os.replace`; a crash, a size overrun or a full disk
  leaves nothing at the key and no temporary file behind;
- uploads larger than `max_bytes` are refused (`InvalidInputError`) as soon as the limit is
  crossed, not after the whole body was stored; ENOSPC becomes `StorageFullError`;
- keys are relative, slash-separated paths (`bundles/<name>/<version>/bundle.tar`) that may not
  escape the store's root.

`ArtifactStore` is the seam for other backends: an S3 store implements the same methods and
returns presigned URLs from `download_url`, so agents download straight from the bucket.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

from fleet.core.errors import InvalidInputError, NotFoundError, StorageFullError

CHUNK = 1024 * 1024
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_key(key: str) -> str:
    """Validate an artifact key: relative, '/'-separated, no '..' or hidden segments."""
    if not key or len(key) > 1024 or key.startswith("/") or "\\" in key:
        raise InvalidInputError(f"invalid artifact key {key!r}: must be a relative path with '/' separators")
    for segment in key.split("/"):
        if not _SEGMENT_RE.match(segment):
            raise InvalidInputError(
                f"invalid artifact key {key!r}: segment {segment!r} must be letters, digits, '.', '_', '+' "
                "or '-' and must not start with '.'"
            )
    return key


class ArtifactStore(ABC):
    """Where bundle bytes live. Implementations must keep `put` atomic and streaming."""

    @abstractmethod
    def put(self, key: str, src: BinaryIO, *, max_bytes: int) -> tuple[int, str]:
        """Store everything readable from `src` under `key`; returns (size, sha256 hex)."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open the stored bytes for reading (seekable for the local store). NotFoundError if absent."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Stored size in bytes. NotFoundError if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error (deletes are retried)."""

    @abstractmethod
    def download_url(self, key: str, base_url: str) -> str:
        """Where an agent fetches the object: the controller's route, or a presigned URL."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for zero-copy serving, when the backend has one."""
        return None


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under `root`. The default, embedded store."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        check_key(key)
        path = (self.root / key).resolve()
        # Belt and braces after check_key: symlinks inside the root could still point outside it.
        if not path.is_relative_to(self.root):
            raise InvalidInputError(f"artifact key {key!r} escapes the store root")
        return path

    def put(self, key: str, src: BinaryIO, *, max_bytes: int) -> tuple[int, str]:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise InvalidInputError(
                            f"artifact {key!r} is larger than the limit of {max_bytes} bytes",
                            limit=max_bytes,
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            _remove_quietly(tmp_name)
            raise _map_os_error(exc, key) from exc
        except BaseException:
            _remove_quietly(tmp_name)
            raise
        return size, digest.hexdigest()

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return path.open("rb")
        except FileNotFoundError as exc:
            raise NotFoundError(f"artifact {key!r} not found", key=key) from exc

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            return path.stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"artifact {key!r} not found", key=key) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # Drop now-empty parent folders up to the root, so deleted versions leave no litter.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def download_url(self, key: str, base_url: str) -> str:
        # The local store has no URL of its own: agents use the controller's bundle route,
        # whose path mirrors the key layout `bundles/<name>/<version>/bundle.tar`.
        parts = check_key(key).split("/")
        if len(parts) == 4 and parts[0] == "bundles" and parts[3] == "bundle.tar":
            return f"{base_url.rstrip('/')}/api/v1/models/{parts[1]}/versions/{parts[2]}/bundle"
        raise InvalidInputError(f"artifact {key!r} is not served over HTTP by the local store")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


def _map_os_error(exc: OSError, key: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"no space left to store artifact {key!r}", key=key)
    return exc


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
