"""The answered-requests index, without a broker (its Kafka side runs in the fault tests)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from streams import dedupe
from streams.dedupe import AnsweredIndex, request_id_of
from topologies.config import load_settings


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (orjson.dumps({"request_id": "r-1", "status": "ok"}), "r-1"),
        (orjson.dumps({"request_id": 7}), None),
        (orjson.dumps(["request_id"]), None),
        (b"not json", None),
        (b"", None),
        (None, None),
    ],
)
def test_request_id_of(raw: bytes | None, expected: str | None) -> None:
    assert request_id_of(raw) == expected


def index(window: float = 60) -> AnsweredIndex:
    return AnsweredIndex(load_settings(environ={"TIERSTREAM__WORKER__DEDUPE_WINDOW_SECONDS": str(window)}))


def test_results_read_from_the_topic_mark_requests_answered() -> None:
    answered = index()
    answered._apply("agent.results", orjson.dumps({"request_id": "r-1"}))
    answered._apply("agent.results", b"garbage")
    assert answered.answered("r-1") and not answered.answered("r-2")
    assert len(answered) == 1


async def test_a_copy_read_again_waits_for_the_one_in_progress_and_is_answered_if_it_was_not() -> None:
    """The copy in progress was fetched before a rebalance: its result is dropped, so
    the copy read again after the rebalance must be answered, not skipped."""
    answered = index()
    first = answered.answering("r-1")
    first.__enter__()
    second = asyncio.create_task(answered.settled("r-1"))
    await asyncio.sleep(0)  # one turn of the loop: the second copy starts and blocks
    assert not second.done(), "the second copy must wait for the first"
    first.__exit__(None, None, None)  # ended without a result
    await asyncio.wait_for(second, 1)
    assert not answered.answered("r-1"), "a call that ended without a result must be answered again"


async def test_a_copy_read_again_is_skipped_once_the_one_in_progress_answered_it() -> None:
    answered = index()
    with answered.answering("r-1"):
        waiting = asyncio.create_task(answered.settled("r-1"))
        await asyncio.sleep(0)  # one turn of the loop: the copy starts and blocks
        answered.mark_answered("r-1")
    await asyncio.wait_for(waiting, 1)
    assert answered.answered("r-1")


async def test_two_copies_read_again_take_turns() -> None:
    answered = index()
    order: list[str] = []

    async def copy(name: str) -> None:
        await answered.settled("r-1")
        with answered.answering("r-1"):
            order.append(f"{name} starts")
            await asyncio.sleep(0)  # two turns of the loop in which the other copy could
            await asyncio.sleep(0)  # cut in, were it not held back
            order.append(f"{name} ends")

    with answered.answering("r-1"):
        tasks = [asyncio.create_task(copy("a")), asyncio.create_task(copy("b"))]
        await asyncio.sleep(0)  # one turn of the loop: both copies start and block
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert order == ["a starts", "a ends", "b starts", "b ends"]


def test_answers_older_than_the_window_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(dedupe.time, "monotonic", lambda: now[0])
    answered = index(window=60)
    answered.mark_answered("old")
    now[0] += 61
    answered.mark_answered("new")
    assert not answered.answered("old") and answered.answered("new")


async def test_ready_only_after_the_latest_assignment_caught_up() -> None:
    answered = index()
    release = asyncio.Event()

    async def catch_up() -> None:
        await release.wait()

    answered._tail.catch_up = catch_up  # type: ignore[method-assign]
    stale = asyncio.create_task(answered.on_assigned())
    await asyncio.sleep(0)  # one turn of the loop: the catch-up starts and blocks
    answered.on_revoked()  # a rebalance began before that catch-up ended
    release.set()
    await stale
    assert not answered.ready.is_set(), "a catch-up from before the revocation let work through"
    await answered.on_assigned()
    assert answered.ready.is_set()
