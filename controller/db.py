"""Database engines, sessions and schema migrations for the controller.

Rules this module enforces:

- SQLite (the embedded default) is opened in WAL mode with a busy timeout and foreign keys on,
  for every pooled connection, and every transaction starts with `BEGIN IMMEDIATE`: the
  controller's writers (gRPC telemetry, the reconciler, REST) read before they write, and a
  deferred transaction that upgrades to a write lock fails at once with "database is locked"
  instead of waiting. Taking the write lock up front makes SQLite serialise them and honour
  the busy timeout. PostgreSQL URLs are used as given.
- The schema is created and changed only by Alembic migrations shipped in the package
  (`controller/migrations/`), never by `metadata.create_all` at runtime, so a database made
  by one release upgrades cleanly with the next. `migrate()` runs them programmatically; no
  `alembic.ini` is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 15_000


def is_sqlite(db_url: str) -> bool:
    return make_url(db_url).get_backend_name() == "sqlite"


def make_engine(db_url: str, *, echo: bool = False) -> Engine:
    """An engine for `db_url`; SQLite files get their parent folder created and the pragmas above."""
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite":
        # pre_ping: a replica outlives PostgreSQL restarts and failovers without stale-connection errors.
        return create_engine(url, echo=echo, pool_pre_ping=True)

    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    kwargs: dict[str, Any] = {"echo": echo}
    if in_memory:
        # One shared connection, or every session would see its own empty database.
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    engine = create_engine(url, **kwargs)
    _install_sqlite_pragmas(engine, wal=not in_memory)
    return engine


def _install_sqlite_pragmas(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would BEGIN lazily, deferred);
        # the "begin" hook below issues BEGIN IMMEDIATE itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL is durable across application crashes; only an OS crash may lose
                # the last transactions, never corrupt the file.
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: service functions return ORM objects that routers serialise after commit.
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(db_url: str) -> Config:
    """An Alembic `Config` pointing at the packaged migrations, without any alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on '%' in URL-encoded passwords.
    config.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return config


def migrate(db_url: str, *, revision: str = "head") -> None:
    """Bring the database at `db_url` to `revision` (default: the newest schema)."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            config = alembic_config(db_url)
            # env.py uses this connection, so the SQLite pragmas above apply to the migration too.
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(db_url: str) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
