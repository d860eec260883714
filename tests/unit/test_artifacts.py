"""The local artifact store: streamed, hashed, atomic puts; size caps; keys that cannot escape."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import pytest

from fleet.controller.artifacts import LocalArtifactStore
from fleet.core.errors import InvalidInputError, NotFoundError, StorageFullError

KEY = "bundles/detector/v1/bundle.tar"


class ChunkyReader(io.RawIOBase):
    """A stream that yields its data in small pieces, like a network upload."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self._data = data
        self._pos = 0
        self._piece = piece
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        end = self._pos + min(self._piece, size if size >= 0 else self._piece)
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file() and p.name.startswith(".tmp-"))


def test_put_streams_hashes_and_reads_back(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    data = os.urandom(3 * 1024 * 1024 + 17)
    size, sha = store.put(KEY, io.BytesIO(data), max_bytes=10 * 1024 * 1024)
    assert size == len(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.exists(KEY) and store.size(KEY) == len(data)
    with store.open(KEY) as handle:
        assert handle.read() == data
    assert _leftovers(store.root) == []


def test_put_from_a_trickling_stream(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    data = b"abcdefghij" * 10
    source = ChunkyReader(data)
    size, sha = store.put("a/b.bin", source, max_bytes=1000)  # type: ignore[arg-type]
    assert (size, sha) == (100, hashlib.sha256(data).hexdigest())
    assert source.reads > 10


def test_oversize_upload_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    source = ChunkyReader(b"x" * 10_000, piece=100)
    with pytest.raises(InvalidInputError, match="larger than the limit of 1000 bytes"):
        store.put(KEY, source, max_bytes=1000)  # type: ignore[arg-type]
    assert not store.exists(KEY)
    assert _leftovers(store.root) == []
    # Refused as soon as the limit is crossed, not after reading everything.
    assert source.reads <= 12


def test_failed_replacement_keeps_the_old_object(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    store.put(KEY, io.BytesIO(b"old bytes"), max_bytes=100)
    with pytest.raises(InvalidInputError):
        store.put(KEY, io.BytesIO(b"n" * 200), max_bytes=100)
    with store.open(KEY) as handle:
        assert handle.read() == b"old bytes"


def test_disk_full_becomes_storage_full_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalArtifactStore(tmp_path)

    def full(_fd: int) -> None:  # ENOSPC often surfaces only at fsync (delayed allocation, NFS)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageFullError, match="no space left"):
        store.put(KEY, io.BytesIO(b"data"), max_bytes=100)
    monkeypatch.undo()
    assert not store.exists(KEY)
    assert _leftovers(store.root) == []


def test_other_os_errors_are_not_disguised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalArtifactStore(tmp_path)

    def broken(_fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        store.put(KEY, io.BytesIO(b"data"), max_bytes=100)


@pytest.mark.parametrize(
    "key",
    ["../outside", "/etc/passwd", "a/../../b", "a/./b", ".hidden", "a//b", "a\\b", "", "a/.tmp-x", "a/"],
)
def test_keys_that_could_escape_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalArtifactStore(tmp_path / "root")
    with pytest.raises(InvalidInputError):
        store.put(key, io.BytesIO(b"x"), max_bytes=10)
    with pytest.raises(InvalidInputError):
        store.exists(key)
    assert not (tmp_path / "outside").exists()


def test_symlink_inside_root_cannot_lead_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalArtifactStore(tmp_path / "root")
    (store.root / "bundles").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidInputError, match="escapes"):
        store.put(KEY, io.BytesIO(b"x"), max_bytes=10)
    assert list(outside.iterdir()) == []


def test_missing_objects_and_idempotent_delete(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(NotFoundError):
        store.open(KEY)
    with pytest.raises(NotFoundError):
        store.size(KEY)
    store.delete(KEY)  # absent: fine, deletes are retried
    store.put(KEY, io.BytesIO(b"x"), max_bytes=10)
    store.delete(KEY)
    assert not store.exists(KEY)
    assert not (store.root / "bundles").exists()  # empty parents are pruned


def test_download_url_points_at_the_controller_route(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    assert (
        store.download_url(KEY, "http://ctl:8080/")
        == "http://ctl:8080/api/v1/models/detector/versions/v1/bundle"
    )
    with pytest.raises(InvalidInputError):
        store.download_url("other/thing.bin", "http://ctl:8080")
