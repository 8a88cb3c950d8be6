"""Tasks one Faust actor starts, a bounded number at once.

A tier role keeps up to ``worker.max_concurrent_tasks`` calls in flight. Faust's agent
concurrency does that with one actor per slot, each its own stream with its own buffers
and tasks (119 MB per tier process at 4,000); here one actor reads the events and starts
a task for each, holding back the next read while every slot is taken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class BoundedTasks:
    """At most ``limit`` tasks at once. A task that raises cancels the actor that started
    it, and :meth:`close` raises its exception there: a handler's bug stops the worker,
    as it would in the actor itself (``mode.CrashingSupervisor``)."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        self._owner: asyncio.Task[Any] | None = None
        self._failure: BaseException | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    async def slot(self) -> None:
        """Wait for a free slot; :meth:`start` then takes it."""
        await self._slots.acquire()

    def start(self, coro: Coroutine[Any, Any, None], cleanup: Callable[[], object] | None = None) -> None:
        """Run ``coro`` in a slot taken with :meth:`slot`. ``cleanup`` runs when it ends,
        even if it was cancelled before it began (when none of its code runs)."""
        self._owner = asyncio.current_task()
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        if cleanup is not None:
            task.add_done_callback(lambda _: cleanup())
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if task.cancelled() or task.exception() is None or self._failure is not None:
            return
        self._failure = task.exception()
        if self._owner is not None:
            self._owner.cancel()

    async def close(self) -> None:
        """Cancel the tasks still running and wait for them; raise the first failure."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._failure is not None:
            raise self._failure
