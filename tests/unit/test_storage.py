"""Storage: the Alembic migrations build exactly the ORM's schema, on SQLite and PostgreSQL.

Also checks the SQLite connection rules (WAL, foreign keys, busy timeout, serialized writers)
and that timestamps come back timezone-aware UTC.
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from fleet.controller.db import (
    alembic_config,
    current_revision,
    make_engine,
    make_session_factory,
    migrate,
    session_scope,
)
from fleet.controller.models import Base, Decision, Device, Rollout

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()

PG_URL = os.environ.get("FLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _diffs(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def _device(device_id: str) -> Device:
    return Device(id=device_id, secret_hash="x" * 64, labels={}, hardware={}, actual={}, desired={})


def test_migration_matches_orm_on_sqlite(sqlite_url: str) -> None:
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        assert _diffs(engine) == []
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert "alembic_version" in tables
    finally:
        engine.dispose()
    assert current_revision(sqlite_url) == HEAD


def test_migrate_is_idempotent_and_reversible(sqlite_url: str) -> None:
    migrate(sqlite_url)
    migrate(sqlite_url)  # a restart re-runs it: no error, no change
    assert current_revision(sqlite_url) == HEAD
    command.downgrade(alembic_config(sqlite_url), "base")
    engine = make_engine(sqlite_url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


def test_a_schema_drift_is_detected(sqlite_url: str) -> None:
    """Guards the guard: compare_metadata does notice a column the migration lacks."""
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE devices ADD COLUMN extra INTEGER")
        assert any("extra" in repr(d) for d in _diffs(engine))
    finally:
        engine.dispose()


def test_sqlite_pragmas_apply_to_every_connection(sqlite_url: str) -> None:
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        factory = make_session_factory(engine)
        # Foreign keys are enforced: a decision of a rollout that does not exist is refused.
        with pytest.raises(IntegrityError), session_scope(factory) as session:
            session.add(Decision(rollout_id="nope", step_index=0, kind="gate", reason="", metrics={}))
    finally:
        engine.dispose()


def test_timestamps_round_trip_as_aware_utc(sqlite_url: str) -> None:
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    berlin = timezone(timedelta(hours=2))
    seen = datetime(2024, 5, 1, 14, 0, tzinfo=berlin)
    try:
        with session_scope(factory) as session:
            device = _device("d1")
            device.last_seen_at = seen
            session.add(device)
        with factory() as session:
            loaded = session.get(Device, "d1")
            assert loaded is not None
            assert loaded.last_seen_at == seen
            assert loaded.last_seen_at.tzinfo is not None
            assert loaded.last_seen_at.utcoffset() == timedelta(0)
            assert loaded.enrolled_at.tzinfo is not None  # the default is aware too
        with pytest.raises(StatementError, match="naive datetime"), session_scope(factory) as session:
            bad = _device("d2")
            bad.last_seen_at = datetime(2024, 5, 1)  # naive on purpose
            session.add(bad)
    finally:
        engine.dispose()


def test_concurrent_writers_are_serialized_not_refused(sqlite_url: str) -> None:
    """Read-modify-write from several threads: no 'database is locked', no lost update."""
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        session.add(_device("counter"))
    errors: list[BaseException] = []

    def bump(times: int) -> None:
        try:
            for _ in range(times):
                with session_scope(factory) as session:
                    device = session.scalar(select(Device).where(Device.id == "counter"))
                    assert device is not None
                    device.desired_generation = device.desired_generation + 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(15,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        with factory() as session:
            device = session.get(Device, "counter")
            assert device is not None and device.desired_generation == 60
    finally:
        engine.dispose()


def test_json_columns_keep_structure(sqlite_url: str) -> None:
    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as session:
            session.add(
                Rollout(
                    id="r1", model="m", version="v2", steps=[0.1, 1.0], selector={"site": "a"},
                    gate={"min_requests": 100}, shadow_sample_rate=0.5, created_by="test",
                )
            )
        with factory() as session:
            rollout = session.get(Rollout, "r1")
            assert rollout is not None
            assert rollout.steps == [0.1, 1.0]
            assert rollout.phase == "Pending" and rollout.step_phase == "Shadow"
            assert rollout.created_at.utcoffset() == timedelta(0)
    finally:
        engine.dispose()


def _postgres_available() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'edge-fleet[postgres]')"
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}"
    return None


def test_migration_matches_orm_on_postgresql() -> None:
    reason = _postgres_available()
    if reason:
        pytest.skip(reason)
    schema = f"fleet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    # libpq `options` puts every connection of this URL into the fresh schema.
    separator = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{separator}options=-csearch_path%3D{schema}"
    try:
        migrate(url)
        migrate(url)
        engine = make_engine(url)
        try:
            assert _diffs(engine) == []
            assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
            factory = make_session_factory(engine)
            with session_scope(factory) as session:
                session.add(_device("pg-device"))
            with factory() as session:
                loaded = session.get(Device, "pg-device")
                assert loaded is not None and loaded.enrolled_at.utcoffset() == timedelta(0)
        finally:
            engine.dispose()
        assert current_revision(url) == HEAD
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
