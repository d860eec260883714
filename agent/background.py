"""A bounded, low-priority background worker: the agent's rule for work off the request path.

Serving hands items over with `offer()`, which never blocks: when the queue is full the item is
dropped and `offer` says so, so the caller counts it. One thread consumes the items at a lower
OS scheduling priority (Linux schedules threads individually; elsewhere this is a no-op), so on
a small device the shadow model and the drift monitor lose every contest for a core to serving.
A failing item is logged and skipped: the worker outlives any one odd request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()


class BackgroundWorker(Generic[T]):
    def __init__(self, handle: Callable[[T], None], *, name: str, maxsize: int, nice: int) -> None:
        self._handle = handle
        self._nice = nice
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, maxsize))
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def offer(self, item: T) -> bool:
        """Queue `item` without waiting; False when it was dropped (queue full or closed)."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def _loop(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._handle(item)  # type: ignore[arg-type]
            except Exception:
                log.exception("%s failed on an item; continuing", self._thread.name)
            finally:
                self._queue.task_done()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until every item queued so far has been handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self) -> None:
        """Stop the thread; items still queued are discarded (not worth waiting for at shutdown)."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                self._queue.put_nowait(_STOP)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:
                    pass
        self._thread.join(timeout=10)
