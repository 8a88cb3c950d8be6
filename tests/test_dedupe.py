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


def test_a_request_in_progress_counts_as_answered_until_it_ends() -> None:
    answered = index()
    with answered.answering("r-1"):
        assert answered.answered("r-1")
    assert not answered.answered("r-1"), "a call that ended without a result must be answerable again"


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
    await asyncio.sleep(0)
    answered.on_revoked()  # a rebalance began before that catch-up ended
    release.set()
    await stale
    assert not answered.ready.is_set(), "a catch-up from before the revocation let work through"
    await answered.on_assigned()
    assert answered.ready.is_set()
