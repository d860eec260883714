"""Coordination between controller replicas: who runs the reconciler, and fan-out of changes.

Rules this module keeps:
- exactly one replica runs the rollout reconciler at a time. On PostgreSQL the leader holds a
  session-level advisory lock on a dedicated connection; if the leader dies its connection
  closes and PostgreSQL releases the lock at once, so another replica takes over within one
  retry interval (about a second). A leader that loses its connection stops reconciling before
  it tries to win the lock again;
- a desired-state change made on any replica reaches the Sync streams held by every replica:
  changes are published with NOTIFY and each replica wakes its own streams on LISTEN. The
  publishing replica also wakes its own streams directly, so nothing waits on a round trip;
- with SQLite (one process) the single replica is always the leader and nothing is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "fleet_events"
# Arbitrary but fixed: the advisory lock id every replica of this product competes for.
LEADER_LOCK_ID = 0x666C656574  # "fleet"
# NOTIFY payloads are limited to 8000 bytes; device-id batches are split below that.
MAX_PAYLOAD = 7000


class LocalCoordinator:
    """One process: always the leader, nothing to publish to."""

    def __init__(self) -> None:
        self.is_leader = True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def publish_desired(self, device_ids: Iterable[str]) -> None:
        return None

    def publish_kick(self) -> None:
        return None


def libpq_dsn(db_url: str) -> str:
    """The libpq connection string of a SQLAlchemy PostgreSQL URL."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def _batches(device_ids: list[str]) -> list[str]:
    payloads: list[str] = []
    batch: list[str] = []
    size = 0
    for device_id in device_ids:
        if batch and size + len(device_id) + 4 > MAX_PAYLOAD:
            payloads.append(json.dumps({"t": "desired", "ids": batch}))
            batch, size = [], 0
        batch.append(device_id)
        size += len(device_id) + 4
    if batch:
        payloads.append(json.dumps({"t": "desired", "ids": batch}))
    return payloads


class PostgresCoordinator:
    """Leader election by advisory lock and change fan-out by LISTEN/NOTIFY."""

    def __init__(
        self,
        db_url: str,
        *,
        on_desired: Callable[[list[str]], None],
        on_kick: Callable[[], None],
        retry_s: float = 1.0,
    ) -> None:
        self.dsn = libpq_dsn(db_url)
        self.on_desired = on_desired
        self.on_kick = on_kick
        self.retry_s = retry_s
        self.is_leader = False
        self._tasks: list[asyncio.Task[None]] = []
        self._publisher: Any = None
        self._outbox: asyncio.Queue[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._lead(), name="leader-election"),
            asyncio.create_task(self._listen(), name="listen"),
            asyncio.create_task(self._publish(), name="notify"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.is_leader = False

    # -- publishing (thread-safe: called from reconciler threads and request handlers) --------

    def publish_desired(self, device_ids: Iterable[str]) -> None:
        for payload in _batches(sorted(set(device_ids))):
            self._enqueue(payload)

    def publish_kick(self) -> None:
        self._enqueue(json.dumps({"t": "kick"}))

    def _enqueue(self, payload: str) -> None:
        if self._loop is None or self._outbox is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, payload)

    # -- tasks ------------------------------------------------------------------------------

    async def _connect(self, role: str) -> Any:
        import psycopg

        # The application name tells operators (and pg_stat_activity) which replica holds what.
        name = f"fleet-controller:{socket.gethostname()}:{os.getpid()}:{role}"
        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, application_name=name[:63])

    async def _lead(self) -> None:
        while True:
            conn = None
            try:
                conn = await self._connect("leader")
                while True:
                    if not self.is_leader:
                        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_ID,))
                        row = await cursor.fetchone()
                        if row and row[0]:
                            self.is_leader = True
                            log.info("this replica is now the leader: it runs the rollout reconciler")
                            self.on_kick()
                    else:
                        # Still connected means still holding the lock; a dead connection raises here.
                        await conn.execute("SELECT 1")
                    await asyncio.sleep(self.retry_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.is_leader:
                    log.warning("leadership lost with the database connection: %s", exc)
                self.is_leader = False
                await asyncio.sleep(self.retry_s)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                self.is_leader = False

    async def _listen(self) -> None:
        while True:
            try:
                conn = await self._connect("listen")
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # After (re)connecting, changes may have been missed: wake every stream once.
                    self.on_desired(["*"])
                    async for note in conn.notifies():
                        self._dispatch(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                await asyncio.sleep(self.retry_s)

    def _dispatch(self, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if event.get("t") == "desired":
            self.on_desired([str(i) for i in event.get("ids", [])])
        elif event.get("t") == "kick" and self.is_leader:
            self.on_kick()

    async def _publish(self) -> None:
        assert self._outbox is not None
        conn = None
        while True:
            payload = await self._outbox.get()
            try:
                if conn is None:
                    conn = await self._connect("notify")
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("NOTIFY failed (%s); other replicas will catch up on their next wake", exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
