"""Where the controller's signed update metadata lives: the database or a directory.

Both implement `fleet.core.trust.MetadataStore`. `SqlMetadataStore` (PostgreSQL, several
replicas) keeps the files in the controller database so every replica serves one repository,
and offers `exclusive()`, which the repository uses around each read-check-write so two
replicas cannot both publish targets version N+1 (a transaction-level advisory lock).
`FileMetadataStore` is the embedded mode's (SQLite, one process): every write is atomic
(temporary file in the same directory, fsync, `os.replace`, fsync of the directory), so a crash
leaves either the old or the new file, never a torn one that agents would refuse. Only plain
names are accepted: the repository decides the names, and nothing may escape the directory.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from fleet.controller.models import TufMetadata, utcnow
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


# Arbitrary but fixed: the transaction-level advisory lock guarding metadata writes.
METADATA_LOCK_ID = 0x7475666D64  # "tufmd"


class SqlMetadataStore:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory
        self._local = threading.local()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """One transaction, held for the whole block, that other replicas wait for."""
        if getattr(self._local, "session", None) is not None:  # re-entrant
            yield
            return
        with self._factory() as session, session.begin():
            bind = session.get_bind()
            if bind.dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": METADATA_LOCK_ID})
            self._local.session = session
            try:
                yield
            finally:
                self._local.session = None

    def get(self, filename: str) -> bytes | None:
        _check_name(filename)
        session = getattr(self._local, "session", None)
        if session is not None:
            row = session.get(TufMetadata, filename)
            return bytes(row.data) if row is not None else None
        with self._factory() as own:
            row = own.get(TufMetadata, filename)
            return bytes(row.data) if row is not None else None

    def put(self, filename: str, data: bytes) -> None:
        _check_name(filename)
        session = getattr(self._local, "session", None)
        if session is not None:
            self._upsert(session, filename, data)
            return
        with self._factory() as own, own.begin():
            self._upsert(own, filename, data)

    @staticmethod
    def _upsert(session: Session, filename: str, data: bytes) -> None:
        row = session.get(TufMetadata, filename)
        if row is None:
            session.add(TufMetadata(filename=filename, data=data, updated_at=utcnow()))
        else:
            row.data = data
            row.updated_at = utcnow()
        session.flush()


def _check_name(filename: str) -> None:
    if not _NAME_RE.match(filename) or ".." in filename:
        raise InvalidInputError(f"metadata file name {filename!r} is not a plain file name")
