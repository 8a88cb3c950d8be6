"""Each request answered once on the results topic, across crashes and rebalances.

A tier worker commits a request's offset a moment after it writes the result, so a
worker killed in between leaves a request that the partition's next owner reads again.
``AnsweredIndex`` follows the results topic (the last ``worker.dedupe_window_seconds``)
and, after every partition assignment, catches up with everything written so far before
the worker takes another request; a request already answered is skipped. A worker that
loses a partition while a call is in flight drops that call's result (its cost is still
recorded), so the partition's new owner is the only one to answer it.

What is left (see docs/architecture.md, "Delivery guarantees"): the model call in flight
when a worker dies is made again by the next owner (paid twice, answered once); a request
redelivered after more than the window is answered again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import orjson

from streams.tail import TopicTail
from topologies.config import Settings
from topologies.topics import topology_of

log = logging.getLogger(__name__)


def request_id_of(raw: bytes | None) -> str | None:
    """The ``request_id`` of a JSON message, without validating the rest."""
    if not raw:
        return None
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = payload.get("request_id") if isinstance(payload, dict) else None
    return value if isinstance(value, str) else None


class AnsweredIndex:
    def __init__(self, settings: Settings) -> None:
        self.window = settings.worker.dedupe_window_seconds
        self._answered: dict[str, float] = {}  # request_id -> when seen, oldest first
        self._answering: dict[str, asyncio.Event] = {}  # in progress here: set when it ends
        # Every result of every tier passes here, and what it tells is needed only when a
        # request is read again: fetched in chunks of 64 KiB (or every 250 ms) rather than
        # one fetch per producer batch, each of which costs this process a fetch request
        # and response to handle (a catch-up after an assignment waits up to 250 ms more).
        self._tail = TopicTail(
            settings, [topology_of(settings).results.name], self._apply, self.window,
            fetch_min_bytes=64 * 1024, fetch_max_wait_ms=250,
        )
        self.ready = asyncio.Event()  # caught up since the last assignment
        self._generation = 0
        self._catching_up: set[asyncio.Future[None]] = set()
        self.skipped = 0

    def _apply(self, topic: str, value: bytes | None) -> None:
        request_id = request_id_of(value)
        if request_id is not None:
            self.mark_answered(request_id)

    def mark_answered(self, request_id: str) -> None:
        now = time.monotonic()
        self._answered.pop(request_id, None)
        self._answered[request_id] = now
        # Forget what is older than the window (the dict is in insertion order): a look at
        # the oldest few per result, never a copy of the whole window.
        for old, seen in list(itertools.islice(self._answered.items(), 64)):
            if now - seen <= self.window:
                break
            del self._answered[old]

    def answered(self, request_id: str) -> bool:
        return request_id in self._answered

    async def settled(self, request_id: str) -> None:
        """Return once no copy of ``request_id`` is in progress here.

        A copy read again after a rebalance must not be skipped because the first copy is
        still in progress: that one was fetched before the rebalance, so its result is
        dropped, and skipping (and committing) the second would leave the request
        unanswered. Whether the second copy is still to be answered is known once the first has ended."""
        while (ended := self._answering.get(request_id)) is not None:
            await ended.wait()

    @contextmanager
    def answering(self, request_id: str) -> Iterator[None]:
        """A request in progress here (see :meth:`settled`)."""
        ended = asyncio.Event()
        self._answering[request_id] = ended
        try:
            yield
        finally:
            if self._answering.get(request_id) is ended:
                del self._answering[request_id]
            ended.set()

    def __len__(self) -> int:
        return len(self._answered)

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.assigned(())  # whatever is assigned already
        await self._tail.start()

    async def stop(self) -> None:
        for task in self._catching_up:
            task.cancel()
        await self._tail.stop()

    def on_revoked(self) -> None:
        self._generation += 1
        self.ready.clear()

    def assigned(self, _partitions: object) -> None:
        """After every assignment: work waits until the results are read up to now (in the
        background: a rebalance callback must not wait for it)."""
        task = asyncio.ensure_future(self.on_assigned())
        self._catching_up.add(task)
        task.add_done_callback(self._catching_up.discard)

    async def on_assigned(self) -> None:
        """Catch up with the results topic as it is now (which includes what the
        partitions' previous owners wrote before they let go), then let work through."""
        self._generation += 1
        generation = self._generation
        self.ready.clear()
        await self._tail.catch_up()
        if generation == self._generation:
            log.info("results read up to now: %d request ids answered in the last %.0f s", len(self), self.window)
            self.ready.set()
