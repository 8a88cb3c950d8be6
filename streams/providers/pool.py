"""A pool of provider SDK clients, after the seed lesson's agent pool.

An async SDK client multiplexes many calls over one HTTP connection pool, so a pooled
client is shared by up to ``max_calls_per_client`` concurrent calls. The pool pre-warms
``min_size`` clients, grows to ``max_size`` under load, retires a client after
``recycle_after`` calls (bounding what a long-lived connection pool can accumulate), and
closes clients idle for ``idle_timeout`` seconds down to ``min_size``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
_ids = itertools.count(1)


@dataclass(eq=False)
class PooledClient(Generic[T]):
    client: T
    client_id: int = field(default_factory=lambda: next(_ids))
    in_use: int = 0
    calls: int = 0
    retiring: bool = False
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PoolStats:
    name: str
    size: int
    in_use: int
    max_size: int
    total_calls: int
    created: int
    retired: int
    # The pool's configuration, for `tierstream status`.
    min_size: int
    max_calls_per_client: int
    recycle_after: int
    idle_timeout: float


class ClientPool(Generic[T]):
    def __init__(
        self,
        name: str,
        factory: Callable[[], T],
        close: Callable[[T], Awaitable[None]],
        *,
        min_size: int = 1,
        max_size: int = 4,
        max_calls_per_client: int = 256,
        recycle_after: int = 100_000,
        idle_timeout: float = 300.0,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        self.name = name
        self._factory = factory
        self._close = close
        self.min_size = min_size
        self.max_size = max_size
        self.max_calls_per_client = max_calls_per_client
        self.recycle_after = recycle_after
        self.idle_timeout = idle_timeout
        self._clients: list[PooledClient[T]] = []
        self._changed = asyncio.Condition()
        self._total_calls = 0
        self._created = 0
        self._retired = 0

    def _new(self) -> PooledClient[T]:
        pooled = PooledClient(self._factory())
        self._clients.append(pooled)
        self._created += 1
        return pooled

    async def start(self) -> None:
        """Pre-warm ``min_size`` clients."""
        while len(self._clients) < self.min_size:
            self._new()

    def _pick(self) -> PooledClient[T] | None:
        usable = [
            c for c in self._clients if not c.retiring and c.in_use < self.max_calls_per_client
        ]
        if usable:
            return min(usable, key=lambda c: c.in_use)
        if len([c for c in self._clients if not c.retiring]) < self.max_size:
            return self._new()
        return None

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[T]:
        async with self._changed:
            pooled = self._pick()
            while pooled is None:
                await self._changed.wait()
                pooled = self._pick()
            pooled.in_use += 1
        try:
            yield pooled.client
        finally:
            pooled.in_use -= 1
            pooled.calls += 1
            pooled.last_used = time.monotonic()
            self._total_calls += 1
            if pooled.calls >= self.recycle_after:
                pooled.retiring = True
            if pooled.retiring and pooled.in_use == 0:
                await self._retire(pooled)
            async with self._changed:
                self._changed.notify()

    async def _retire(self, pooled: PooledClient[T]) -> None:
        if pooled in self._clients:
            self._clients.remove(pooled)
            self._retired += 1
            await self._close(pooled.client)

    async def scale_down_idle(self) -> int:
        """Close clients idle past ``idle_timeout``, keeping ``min_size``. Returns how many."""
        now = time.monotonic()
        idle = [
            c for c in self._clients
            if c.in_use == 0 and now - c.last_used > self.idle_timeout
        ]
        # Mark them all before the first close awaits, so acquire() cannot hand one out.
        idle = idle[: max(0, len(self._clients) - self.min_size)]
        for pooled in idle:
            pooled.retiring = True
        for pooled in idle:
            await self._retire(pooled)
        return len(idle)

    async def close(self) -> None:
        for pooled in list(self._clients):
            await self._retire(pooled)

    def stats(self) -> PoolStats:
        return PoolStats(
            name=self.name,
            size=len(self._clients),
            in_use=sum(c.in_use for c in self._clients),
            max_size=self.max_size,
            total_calls=self._total_calls,
            created=self._created,
            retired=self._retired,
            min_size=self.min_size,
            max_calls_per_client=self.max_calls_per_client,
            recycle_after=self.recycle_after,
            idle_timeout=self.idle_timeout,
        )
