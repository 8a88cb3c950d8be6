"""Unit tests for streams/providers/pool.py with a fake client (the pool is generic), and
for its configuration (``providers.<name>.pool``) reaching each provider's pool.

Waiting is proven with asyncio events and task states, never with sleeps.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import pytest

from streams.providers import ProviderRegistry
from streams.providers.pool import ClientPool, PoolStats
from topologies.config import ConfigError, load_settings


@dataclass(eq=False)
class FakeClient:
    number: int
    closed: int = 0


@dataclass
class Factory:
    """Makes numbered fake clients and records closes; ``close`` may be made to block."""

    made: list[FakeClient] = field(default_factory=list)
    closed: list[FakeClient] = field(default_factory=list)
    block_close_of: set[int] = field(default_factory=set)
    close_started: asyncio.Event = field(default_factory=asyncio.Event)
    close_may_finish: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self) -> FakeClient:
        client = FakeClient(len(self.made) + 1)
        self.made.append(client)
        return client

    async def close(self, client: FakeClient) -> None:
        client.closed += 1
        self.closed.append(client)
        if client.number in self.block_close_of:
            self.close_started.set()
            await self.close_may_finish.wait()


def make_pool(factory: Factory, **kw: object) -> ClientPool[FakeClient]:
    return ClientPool("fake", factory, factory.close, **kw)  # type: ignore[arg-type]


class Held:
    """An acquired client, released on demand (the context manager driven by hand)."""

    def __init__(self, cm: AbstractAsyncContextManager[FakeClient], client: FakeClient) -> None:
        self._cm = cm
        self.client = client

    async def release(self) -> None:
        await self._cm.__aexit__(None, None, None)


async def hold(pool: ClientPool[FakeClient]) -> Held:
    cm = pool.acquire()
    client = await cm.__aenter__()
    return Held(cm, client)


def stats(pool: ClientPool[FakeClient], **expected: int) -> None:
    actual = pool.stats()
    assert isinstance(actual, PoolStats)
    assert {k: getattr(actual, k) for k in expected} == expected


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(("min_size", "max_size"), [(3, 2), (-1, 2), (0, 0)])
def test_invalid_sizes(min_size: int, max_size: int) -> None:
    factory = Factory()
    with pytest.raises(ValueError, match="min_size <= max_size"):
        make_pool(factory, min_size=min_size, max_size=max_size)


async def test_prewarm_creates_min_size() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=3, max_size=5)
    stats(pool, size=0, created=0)
    await pool.start()
    assert [c.number for c in factory.made] == [1, 2, 3]
    stats(pool, size=3, in_use=0, max_size=5, total_calls=0, created=3, retired=0)
    await pool.start()  # idempotent
    stats(pool, size=3, created=3)
    assert pool.stats().name == "fake"


async def test_sequential_calls_share_one_client() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=1, max_size=4)
    await pool.start()
    seen = []
    for _ in range(5):
        async with pool.acquire() as client:
            seen.append(client)
    assert seen == [factory.made[0]] * 5
    stats(pool, size=1, in_use=0, total_calls=5, created=1, retired=0)


async def test_starts_empty_and_creates_on_demand() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=0, max_size=2)
    async with pool.acquire() as client:
        assert client is factory.made[0]
        stats(pool, size=1, in_use=1, created=1)


# --------------------------------------------------------------------------- growth and waiting


async def test_grows_to_max_size_then_waits_for_a_release() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=1, max_size=2, max_calls_per_client=2)
    await pool.start()

    held = [await hold(pool) for _ in range(4)]
    # a client is shared up to max_calls_per_client before the pool grows
    assert [h.client.number for h in held] == [1, 1, 2, 2]
    stats(pool, size=2, in_use=4, created=2)

    trying = asyncio.Event()
    got: list[FakeClient] = []
    acquired = asyncio.Event()
    done = asyncio.Event()

    async def waiter() -> None:
        trying.set()
        async with pool.acquire() as client:
            got.append(client)
            acquired.set()
            await done.wait()

    task = asyncio.create_task(waiter())
    await trying.wait()
    # the waiter ran into acquire() and is parked: no fifth client, nothing handed out
    assert not task.done()
    assert not acquired.is_set()
    assert got == []
    stats(pool, size=2, in_use=4, created=2)

    await held[2].release()  # frees a slot on client 2
    await acquired.wait()
    assert got == [factory.made[1]]
    stats(pool, size=2, in_use=4, created=2, total_calls=1)

    done.set()
    await task
    for h in (held[0], held[1], held[3]):
        await h.release()
    stats(pool, size=2, in_use=0, created=2, total_calls=5, retired=0)
    assert factory.closed == []


async def test_least_loaded_client_is_picked() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=2, max_size=2, max_calls_per_client=10)
    await pool.start()
    held = [await hold(pool) for _ in range(4)]
    assert sorted(h.client.number for h in held) == [1, 1, 2, 2]
    for h in held:
        await h.release()


async def test_many_waiters_are_all_served() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=0, max_size=1, max_calls_per_client=1)
    first = await hold(pool)
    served: list[int] = []

    async def worker(i: int) -> None:
        async with pool.acquire():
            served.append(i)

    tasks = [asyncio.create_task(worker(i)) for i in range(5)]
    # scheduled after the tasks' first steps (FIFO), so each has reached acquire() by then
    started = asyncio.Event()
    asyncio.get_running_loop().call_soon(started.set)
    await started.wait()
    assert not any(t.done() for t in tasks)
    assert served == []
    await first.release()
    await asyncio.gather(*tasks)
    assert sorted(served) == [0, 1, 2, 3, 4]
    stats(pool, size=1, in_use=0, created=1, total_calls=6)


# --------------------------------------------------------------------------- recycling


async def test_recycle_after_retires_and_closes_exactly_once() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=1, max_size=1, recycle_after=3)
    await pool.start()
    first = factory.made[0]

    for call in range(1, 4):
        async with pool.acquire() as client:
            assert client is first
        if call < 3:
            assert factory.closed == []
    assert factory.closed == [first]
    assert first.closed == 1
    stats(pool, size=0, created=1, retired=1, total_calls=3)

    async with pool.acquire() as client:
        assert client is not first
        assert client is factory.made[1]
    assert first.closed == 1
    stats(pool, size=1, created=2, retired=1, total_calls=4)


async def test_recycled_client_is_closed_only_after_its_last_call() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=1, max_size=2, max_calls_per_client=5, recycle_after=2)
    await pool.start()
    a = await hold(pool)
    b = await hold(pool)
    assert a.client is b.client is factory.made[0]

    await a.release()  # 1 completed call: below recycle_after
    assert factory.closed == []
    c = await hold(pool)
    assert c.client is factory.made[0]

    await b.release()  # 2 calls: retiring, but c still uses it
    assert factory.closed == []
    d = await hold(pool)  # a retiring client is not handed out
    assert d.client is factory.made[1]
    stats(pool, size=2, in_use=2, created=2, retired=0)

    await c.release()
    assert factory.closed == [factory.made[0]]
    assert factory.made[0].closed == 1
    stats(pool, size=1, in_use=1, created=2, retired=1, total_calls=3)

    await d.release()
    assert factory.made[0].closed == 1
    assert factory.made[1].closed == 0
    await pool.close()
    assert factory.made[0].closed == 1
    assert factory.made[1].closed == 1


async def test_waiter_gets_a_fresh_client_when_the_only_one_retires() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=1, max_size=1, max_calls_per_client=1, recycle_after=1)
    await pool.start()
    held = await hold(pool)
    trying = asyncio.Event()
    got: list[FakeClient] = []

    async def waiter() -> None:
        trying.set()
        async with pool.acquire() as client:
            got.append(client)

    task = asyncio.create_task(waiter())
    await trying.wait()
    assert not task.done()
    await held.release()
    await task
    assert got == [factory.made[1]]
    assert factory.made[0].closed == 1


# --------------------------------------------------------------------------- idle scale-down


async def test_scale_down_idle_closes_idle_clients_down_to_min_size() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=2, max_size=4, max_calls_per_client=1, idle_timeout=0)
    await pool.start()
    held = [await hold(pool) for _ in range(4)]
    stats(pool, size=4, in_use=4, created=4)
    assert await pool.scale_down_idle() == 0  # all in use
    assert factory.closed == []

    for h in held[1:]:
        await h.release()
    busy = held[0].client

    # 3 idle, 1 busy: only 2 may go, so that min_size=2 clients remain
    assert await pool.scale_down_idle() == 2
    assert busy.closed == 0
    assert busy not in factory.closed
    assert len(factory.closed) == 2
    assert all(c.closed == 1 for c in factory.closed)
    stats(pool, size=2, in_use=1, created=4, retired=2)

    # the busy client is released normally and survives; never below min_size
    await held[0].release()
    assert await pool.scale_down_idle() == 0
    stats(pool, size=2, in_use=0, created=4, retired=2, total_calls=4)
    assert busy.closed == 0
    assert sorted(c.closed for c in factory.made) == [0, 0, 1, 1]


async def test_scale_down_idle_never_closes_a_busy_client() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=0, max_size=3, max_calls_per_client=1, idle_timeout=0)
    held = [await hold(pool) for _ in range(3)]
    await held[0].release()
    await held[2].release()
    assert await pool.scale_down_idle() == 2
    assert [c.closed for c in factory.made] == [1, 0, 1]
    stats(pool, size=1, in_use=1, retired=2)
    await held[1].release()
    assert factory.made[1].closed == 0
    assert await pool.scale_down_idle() == 1
    assert [c.closed for c in factory.made] == [1, 1, 1]
    stats(pool, size=0, in_use=0, retired=3, total_calls=3)


async def test_scale_down_idle_keeps_recent_clients() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=0, max_size=3, max_calls_per_client=1, idle_timeout=3600)
    held = [await hold(pool) for _ in range(3)]
    for h in held:
        await h.release()
    assert await pool.scale_down_idle() == 0
    stats(pool, size=3, retired=0)
    assert factory.closed == []


async def test_scale_down_idle_to_zero() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=0, max_size=2, max_calls_per_client=1, idle_timeout=0)
    held = [await hold(pool) for _ in range(2)]
    for h in held:
        await h.release()
    assert await pool.scale_down_idle() == 2
    stats(pool, size=0, retired=2)


async def test_scale_down_idle_never_closes_a_client_acquired_meanwhile() -> None:
    factory = Factory(block_close_of={1})
    pool = make_pool(factory, min_size=0, max_size=3, max_calls_per_client=1, idle_timeout=0)
    held = [await hold(pool) for _ in range(3)]
    for h in held:
        await h.release()

    scaling = asyncio.create_task(pool.scale_down_idle())
    await factory.close_started.wait()  # closing client 1; clients 2 and 3 still look idle
    busy = await hold(pool)
    # every idle client was marked for closing before the first close began: a new one
    assert busy.client.number == 4

    factory.close_may_finish.set()
    await scaling
    try:
        assert busy.client.closed == 0, "a client in use was closed"
        stats(pool, in_use=1)
    finally:
        await busy.release()


# --------------------------------------------------------------------------- stats and close


async def test_stats_track_in_use_and_calls() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=2, max_size=3, max_calls_per_client=2)
    await pool.start()
    a = await hold(pool)
    b = await hold(pool)
    c = await hold(pool)
    stats(pool, size=2, in_use=3, max_size=3, total_calls=0, created=2, retired=0)
    await a.release()
    stats(pool, in_use=2, total_calls=1)
    await b.release()
    await c.release()
    stats(pool, size=2, in_use=0, total_calls=3, created=2, retired=0)


async def test_release_after_an_exception_frees_the_slot() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=1, max_size=1, max_calls_per_client=1)
    await pool.start()
    with pytest.raises(RuntimeError, match="provider down"):
        async with pool.acquire():
            raise RuntimeError("provider down")
    stats(pool, in_use=0, total_calls=1)
    async with pool.acquire() as client:
        assert client is factory.made[0]


async def test_close_closes_every_client_once() -> None:
    factory = Factory()
    pool = make_pool(factory, min_size=2, max_size=4, max_calls_per_client=1)
    await pool.start()
    held = [await hold(pool) for _ in range(3)]
    for h in held:
        await h.release()
    stats(pool, size=3, created=3)
    await pool.close()
    assert sorted(c.number for c in factory.closed) == [1, 2, 3]
    assert [c.closed for c in factory.made] == [1, 1, 1]
    stats(pool, size=0, in_use=0, created=3, retired=3)
    await pool.close()  # a second close does nothing
    assert [c.closed for c in factory.made] == [1, 1, 1]


# --------------------------------------------------------------------------- configuration


def _registry(**env: str) -> ProviderRegistry:
    return ProviderRegistry(load_settings(environ={"TIERSTREAM__PROVIDERS__OPENAI__USE_SIMULATOR": "always", **env}))


async def test_configured_pool_settings_reach_each_providers_pool() -> None:
    registry = _registry(
        TIERSTREAM__PROVIDERS__OPENAI__POOL__MIN_SIZE="2",
        TIERSTREAM__PROVIDERS__OPENAI__POOL__MAX_SIZE="3",
        TIERSTREAM__PROVIDERS__OPENAI__POOL__MAX_CALLS_PER_CLIENT="8",
        TIERSTREAM__PROVIDERS__OPENAI__POOL__RECYCLE_AFTER_CALLS="500",
        TIERSTREAM__PROVIDERS__OPENAI__POOL__IDLE_TIMEOUT_SECONDS="12",
    )
    try:
        await registry.start()  # pre-warms min_size clients per provider
        openai, anthropic = registry.pools["openai"], registry.pools["anthropic"]
        assert (openai.min_size, openai.max_size, openai.max_calls_per_client) == (2, 3, 8)
        assert (openai.recycle_after, openai.idle_timeout) == (500, 12)
        assert openai.stats().size == 2
        # the other provider keeps the documented defaults; max_size follows the concurrency
        assert (anthropic.min_size, anthropic.max_calls_per_client, anthropic.recycle_after) == (1, 256, 100_000)
        assert (anthropic.max_size, anthropic.idle_timeout) == (1, 300)
        assert registry.idle_check_seconds == 3  # a quarter of the shortest idle timeout
    finally:
        await registry.close()


@pytest.mark.parametrize(
    ("tasks", "per_client", "min_size", "expected"),
    [(64, 256, 1, 1), (600, 256, 1, 3), (100, 10, 0, 10), (4, 256, 5, 5)],
)
def test_unset_max_size_fits_the_concurrency(tasks: int, per_client: int, min_size: int, expected: int) -> None:
    registry = _registry(
        MAX_CONCURRENT_TASKS=str(tasks),
        TIERSTREAM__PROVIDERS__OPENAI__POOL__MAX_CALLS_PER_CLIENT=str(per_client),
        TIERSTREAM__PROVIDERS__OPENAI__POOL__MIN_SIZE=str(min_size),
    )
    assert registry.pools["openai"].max_size == expected


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("MIN_SIZE", "-1", "providers.openai.pool.min_size: Input should be greater than or equal to 0"),
        ("MAX_SIZE", "0", "providers.openai.pool.max_size: Input should be greater than or equal to 1"),
        ("MAX_CALLS_PER_CLIENT", "0", "providers.openai.pool.max_calls_per_client: Input should be greater"),
        ("RECYCLE_AFTER_CALLS", "zero", "providers.openai.pool.recycle_after_calls: Input should be a valid integer"),
        ("IDLE_TIMEOUT_SECONDS", "0", "providers.openai.pool.idle_timeout_seconds: Input should be greater than 0"),
        ("PREWARM", "true", "providers.openai.pool.prewarm: Extra inputs are not permitted"),
    ],
)
def test_invalid_pool_settings_are_refused_naming_the_field(field: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={f"TIERSTREAM__PROVIDERS__OPENAI__POOL__{field}": value})
    assert message in str(info.value)


def test_min_size_above_max_size_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={
            "TIERSTREAM__PROVIDERS__ANTHROPIC__POOL__MIN_SIZE": "3",
            "TIERSTREAM__PROVIDERS__ANTHROPIC__POOL__MAX_SIZE": "2",
        })
    assert "providers.anthropic.pool: Value error, min_size (3) must not exceed max_size (2)" in str(info.value)


def test_the_registry_resolves_the_platform_so_no_model_call_forks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDKs' platform header needs the processor name, which Python gets from a
    # `uname -p` child process the first time; a worker should pay that once, at start.
    import platform
    import subprocess

    import anthropic._base_client
    import openai._base_client

    monkeypatch.setattr(platform, "_platform_cache", {})
    monkeypatch.setattr(platform, "_uname_cache", None)
    _registry()
    spawned: list[object] = []
    real_init = subprocess.Popen.__init__

    def record(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
        spawned.append(args)
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", record)
    assert openai._base_client.get_platform() == anthropic._base_client.get_platform()
    assert spawned == []
