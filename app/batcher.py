"""Micro-batching: requests bound for one replica within a short window leave in one call.

The first request for a replica opens its window; every request for that replica that arrives
before the window closes (or until ``max_batch`` are gathered) joins it; then ``send`` gets the
whole batch. Windows of different replicas are independent. A zero window sends at the next
event-loop turn, which still gathers requests that arrived in the same turn.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
SendFn = Callable[[str, list[T]], Coroutine[Any, Any, None]]


def spawn(coro: Coroutine[Any, Any, R]) -> asyncio.Task[R]:
    """Start a task in a fresh context, detached from the HTTP request that caused it.

    Serve keys handle calls by the request context they are made in; a batch (or poll, or
    abort) serves many requests, so it must not carry the first one's context.
    """
    return contextvars.Context().run(asyncio.get_running_loop().create_task, coro)


class MicroBatcher(Generic[T]):
    """Gathers items per replica for ``window_s`` and hands each batch to ``send``."""

    def __init__(self, send: SendFn[T], window_s: float, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._send = send
        self._window_s = window_s
        self._max_batch = max_batch
        self._pending: dict[str, list[T]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, replica_id: str, item: T) -> None:
        """Queue an item for a replica; must be called on the event loop."""
        batch = self._pending.setdefault(replica_id, [])
        batch.append(item)
        if len(batch) >= self._max_batch:
            self._flush(replica_id)
        elif replica_id not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[replica_id] = loop.call_later(self._window_s, self._flush, replica_id,
                                                       context=contextvars.Context())

    def discard(self, replica_id: str, item: T) -> bool:
        """Take back an item that has not been sent yet (its client left); True if found."""
        batch = self._pending.get(replica_id)
        if batch is None or item not in batch:
            return False
        batch.remove(item)
        return True

    def _flush(self, replica_id: str) -> None:
        timer = self._timers.pop(replica_id, None)
        if timer is not None:
            timer.cancel()
        batch = self._pending.pop(replica_id, [])
        if not batch:
            return
        task = spawn(self._send(replica_id, batch))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch send failed", exc_info=task.exception())

    async def close(self) -> None:
        """Send what is pending now and wait for the sends in progress."""
        for replica_id in list(self._pending):
            self._flush(replica_id)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
