"""BoundedTasks: the tier roles' in-flight bound, and a failing task stopping its actor."""

from __future__ import annotations

import asyncio

import pytest

from streams.tasks import BoundedTasks


async def test_no_more_than_the_limit_run_at_once() -> None:
    tasks = BoundedTasks(3)
    running, most = 0, 0
    release = asyncio.Event()

    async def call() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    async def actor() -> None:
        for _ in range(10):
            await tasks.slot()
            tasks.start(call())

    reading = asyncio.create_task(actor())
    await asyncio.sleep(0.05)
    assert (running, len(tasks), reading.done()) == (3, 3, False)  # the 4th read waits for a slot
    release.set()
    await asyncio.wait_for(reading, 1)
    await tasks.close()
    assert (most, len(tasks)) == (3, 0)


async def test_a_failing_task_raises_in_the_actor_that_started_it() -> None:
    tasks = BoundedTasks(2)

    async def fails() -> None:
        raise ValueError("a handler's bug")

    async def actor() -> None:
        try:
            await tasks.slot()
            tasks.start(fails())
            await asyncio.Event().wait()  # reading the next event, forever
        finally:
            await tasks.close()

    with pytest.raises(ValueError, match="a handler's bug"):
        await asyncio.wait_for(actor(), 1)


async def test_close_cancels_running_tasks_and_cleans_up_those_never_started() -> None:
    tasks = BoundedTasks(4)
    cleaned: list[str] = []
    started: list[str] = []

    async def call(name: str) -> None:
        started.append(name)
        await asyncio.Event().wait()

    await tasks.slot()
    tasks.start(call("a"), lambda: cleaned.append("a"))
    await asyncio.sleep(0)  # "a" begins
    await tasks.slot()
    tasks.start(call("b"), lambda: cleaned.append("b"))  # cancelled before it begins
    await tasks.close()
    assert started == ["a"]
    assert sorted(cleaned) == ["a", "b"]
    assert len(tasks) == 0
