"""Graceful shutdown: on SIGTERM, let the model calls already in flight finish.

Faust stops a worker in this order: stop fetching and drop what is buffered but not
started, (for roles with ``stream_wait_empty``) wait for the agents, send
``on_before_shutdown``, then stop the agents and commit what was acked. Tier roles do not
wait for their agents (a call held by the budget gate could take the rest of the hour),
so without this a SIGTERM cancels every call in flight: its money is spent and another
replica pays it again. ``InFlight.drain`` waits up to ``worker.shutdown_grace_seconds``
for them; what finishes is answered and committed, what does not is handed back
uncommitted, to be answered by the partition's next owner (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


class InFlight:
    """Counts the handler calls in progress in one process."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def drain(self, grace_seconds: float) -> bool:
        """Wait until nothing is in flight, at most ``grace_seconds``; True if drained."""
        if self.count == 0:
            return True
        started, waiting = time.monotonic(), self.count
        log.info("shutting down: waiting up to %.0f s for %d calls in flight", grace_seconds, waiting)
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except TimeoutError:
            log.warning(
                "shutting down: %d calls still in flight after %.0f s are handed back uncommitted",
                self.count, grace_seconds,
            )
            return False
        log.info("shutting down: %d calls finished in %.1f s", waiting, time.monotonic() - started)
        return True
