"""TopicTail's offset requests outlast a broker that is slow to answer."""

from __future__ import annotations

import pytest
import stamina
from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError

from streams.tail import until_answered


@pytest.fixture
def no_backoff():
    stamina.set_testing(True, attempts=5)
    yield
    stamina.set_testing(False)


async def test_offset_requests_that_time_out_are_asked_again(no_backoff: None) -> None:
    calls = []

    async def end_offsets() -> dict[str, int]:
        calls.append(1)
        if len(calls) < 3:
            raise KafkaTimeoutError("Failed to get offsets by times in 40000 ms")
        return {"p0": 42}

    assert await until_answered(end_offsets) == {"p0": 42}
    assert len(calls) == 3


async def test_errors_that_are_not_kafka_errors_are_not_retried(no_backoff: None) -> None:
    calls = []

    async def broken() -> None:
        calls.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await until_answered(broken)
    assert len(calls) == 1


async def test_kafka_errors_are_retried_until_answered(no_backoff: None) -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 5:
            raise UnknownTopicOrPartitionError()
        return "ok"

    assert await until_answered(flaky) == "ok"
