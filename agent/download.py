"""Resumable, size-capped, hash-checked bundle downloads.

Rules this module enforces:

- **The signed length is a hard cap.** No more than `length` bytes are ever written. A server that
  announces or sends more gets `IntegrityError` and the part file is deleted: a hostile mirror
  cannot fill the disk (the "endless data" attack TUF guards against).
- **The signed SHA-256 is checked over the whole file** before it leaves the `.part` name. A
  mismatch deletes the part file (its bytes cannot be trusted to resume from) and raises
  `IntegrityError`.
- **Interrupted downloads resume.** The bytes already in the part file are re-hashed to continue
  the streaming digest, and the rest is requested with `Range: bytes=<n>-`. A `206` must start
  exactly at `n`; a `200` means the server ignored the range, so the file starts over.
- **Network trouble is retryable and keeps the part file** (`DownloadError`, code "download");
  a full disk is `StorageFullError`. Nothing here retries in a loop: the caller's backoff decides.
- The finished file is fsynced, then renamed from `<name>.part` to `<name>.tar` and the rename made
  durable, so a `.tar` on disk is always a complete, hash-checked download.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx

from fleet.core.atomic import fsync_dir
from fleet.core.errors import FleetError, IntegrityError, StorageFullError

DEFAULT_CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
# Restarting from zero is allowed once per call (server ignored or garbled the range); a server
# that keeps doing it is reported, not chased.
_MAX_PASSES = 3

Progress = Callable[[int, int], None]


class DownloadError(FleetError):
    """The download did not complete for a reason that may pass (network, server status).

    The part file is kept so that the next attempt resumes. `retryable` is False for answers
    that will not change by waiting (404, 403...), though the caller's backoff still applies.
    """

    code = "download"

    def __init__(self, message: str, *, retryable: bool = True, **details: object) -> None:
        super().__init__(message, **details)
        self.retryable = retryable


def file_sha256(path: Path, limit: int | None = None) -> tuple[str, int]:
    """SHA-256 hex of the first `limit` bytes (all when None) and the number of bytes hashed."""
    digest = hashlib.sha256()
    count = _hash_into(digest, path, limit)
    return digest.hexdigest(), count


def download_bundle(
    client: httpx.Client,
    url: str,
    part_path: Path,
    *,
    length: int,
    sha256: str,
    progress: Progress | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Path:
    """Download `url` into `part_path` (resuming it), check it, and return the completed `.tar` path.

    `length` and `sha256` must be the release-signed values. Raises `IntegrityError` (too long,
    wrong hash: part deleted), `DownloadError` (network or server trouble: part kept for resume),
    `StorageFullError` (not enough free space: part kept).
    """
    part_path = Path(part_path)
    if part_path.suffix != ".part":
        raise ValueError(f"download target must end in .part, got {part_path.name}")
    if length <= 0:
        raise ValueError("the signed length of a bundle must be positive")
    sha256 = sha256.lower()
    final = part_path.with_suffix(".tar")
    part_path.parent.mkdir(parents=True, exist_ok=True)

    # A previous call finished but its caller crashed before using the file.
    if final.exists():
        digest, size = file_sha256(final)
        if size == length and digest == sha256:
            return final
        final.unlink()

    for _ in range(_MAX_PASSES):
        done = _fetch(client, url, part_path, length=length, sha256=sha256, progress=progress,
                      chunk_size=chunk_size)
        if done:
            os.replace(part_path, final)
            fsync_dir(final.parent)
            return final
    raise DownloadError(
        f"{url} kept answering range requests with a different range; giving up for now",
        url=url,
    )


def _fetch(
    client: httpx.Client,
    url: str,
    part: Path,
    *,
    length: int,
    sha256: str,
    progress: Progress | None,
    chunk_size: int,
) -> bool:
    """One pass. True: the part file is complete and checked. False: start over from byte 0."""
    digest = hashlib.sha256()
    have = 0
    if part.exists():
        have = part.stat().st_size
        if have > length:
            # Bytes past the signed length cannot be part of the bundle: the part is garbage.
            part.unlink()
            have = 0
        else:
            have = _hash_into(digest, part, have)
    if have == length:
        return _finish(part, digest, sha256, url)

    _check_space(part.parent, length - have)
    # identity: Range offsets and Content-Length must count the bundle's own bytes, not a gzip stream.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if have and status == 206:
                start = _range_start(response.headers.get("content-range"))
                if start != have:
                    part.unlink(missing_ok=True)
                    return False
            elif status == 200:
                if have:
                    # The server ignored our Range and sends the whole file: start over.
                    digest = hashlib.sha256()
                    have = 0
            elif have and status == 416:
                # Our part is not a prefix the server can continue: drop it.
                part.unlink(missing_ok=True)
                return False
            else:
                raise DownloadError(
                    f"GET {url} answered HTTP {status}"
                    + (" (bundle not found on the server)" if status == 404 else ""),
                    retryable=status >= 500 or status in (408, 429),
                    url=url,
                    status=status,
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and have + int(declared) > length:
                part.unlink(missing_ok=True)
                raise _too_long(url, length, have + int(declared))
            _receive(response, part, have, digest, length=length, url=url, progress=progress,
                     chunk_size=chunk_size)
    except httpx.TransportError as exc:
        raise DownloadError(
            f"download of {url} interrupted after {_size(part)} of {length} bytes ({exc.__class__.__name__}: "
            f"{exc}); it will resume from there",
            url=url,
        ) from exc
    if _size(part) < length:
        raise DownloadError(
            f"{url} ended after {_size(part)} of {length} bytes; the download will resume from there",
            url=url,
        )
    return _finish(part, digest, sha256, url)


def _receive(
    response: httpx.Response,
    part: Path,
    have: int,
    digest: hashlib._Hash,
    *,
    length: int,
    url: str,
    progress: Progress | None,
    chunk_size: int,
) -> None:
    mode = "r+b" if part.exists() else "wb"
    overflow = False
    try:
        with open(part, mode) as out:
            out.seek(have)
            out.truncate()
            for chunk in response.iter_bytes(chunk_size):
                if have + len(chunk) > length:
                    overflow = True
                    break
                out.write(chunk)
                digest.update(chunk)
                have += len(chunk)
                if progress is not None:
                    progress(have, length)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(
                f"the disk filled up while downloading {url} ({have} of {length} bytes); free space "
                f"under {part.parent} and the download will resume",
                path=str(part),
            ) from exc
        raise
    if overflow:
        part.unlink(missing_ok=True)
        raise _too_long(url, length, None)


def _finish(part: Path, digest: hashlib._Hash, sha256: str, url: str) -> bool:
    actual = digest.hexdigest()
    if actual != sha256:
        part.unlink(missing_ok=True)
        raise IntegrityError(
            f"bundle from {url} has SHA-256 {actual}, but the signed metadata says {sha256}: "
            "the file was tampered with or corrupted in transit; it was deleted",
            url=url,
        )
    return True


def _too_long(url: str, length: int, announced: int | None) -> IntegrityError:
    said = f" (the server announced {announced} bytes)" if announced is not None else ""
    return IntegrityError(
        f"bundle is larger than its signed length of {length} bytes{said}: refusing {url}; "
        "the partial file was deleted",
        url=url,
    )


def _range_start(header: str | None) -> int | None:
    match = _CONTENT_RANGE.match(header or "")
    return int(match.group(1)) if match else None


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise StorageFullError(
            f"not enough disk space to download the bundle: {needed} bytes needed, {free} free under "
            f"{directory}; free some space (old model versions, logs) and the download will resume",
            needed=needed,
            free=free,
        )


def _hash_into(digest: hashlib._Hash, path: Path, limit: int | None) -> int:
    count = 0
    with open(path, "rb") as handle:
        while limit is None or count < limit:
            want = DEFAULT_CHUNK if limit is None else min(DEFAULT_CHUNK, limit - count)
            chunk = handle.read(want)
            if not chunk:
                break
            digest.update(chunk)
            count += len(chunk)
    return count


def _size(path: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_size
    return 0
