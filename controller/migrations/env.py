"""Alembic environment for the controller's schema.

Runs online only, on a connection handed in by `fleet.controller.db.migrate` through
`config.attributes["connection"]` (or, when run by the `alembic` command, an engine made from
`sqlalchemy.url` by `fleet.controller.db.make_engine`). SQLite gets batch mode, because it
cannot ALTER most things in place.
"""

from __future__ import annotations

from alembic import context

from fleet.controller.db import is_sqlite, make_engine
from fleet.controller.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=is_sqlite(str(config.get_main_option("sqlalchemy.url"))),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(str(config.get_main_option("sqlalchemy.url")))
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; run `migrate(db_url)`")
run_migrations_online()
