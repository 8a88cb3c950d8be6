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


@pytest.mark.e2e
@pytest.mark.parametrize("fetch", [{}, {"fetch_min_bytes": 64 * 1024, "fetch_max_wait_ms": 250}],
                         ids=["prompt", "in-chunks"])
async def test_a_tail_since_a_time_starts_there_per_partition_and_catches_up(
    kafka_bootstrap: str, fetch: dict[str, int]
) -> None:
    """On a real broker: a partition with only old records starts at its end, one with
    recent records at the first recent one, an empty one at its end (0); the first
    catch-up covers what the topic held at start, and later records are read too, also
    by a follower that asks for more than the topic holds (as the answered index does)."""
    import asyncio
    import time
    import uuid

    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from streams.tail import TopicTail
    from topologies.config import load_settings

    topic = f"tail-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    now_ms = int(time.time() * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(3):  # two hours old: before the window
            await producer.send_and_wait(topic, f"old-0-{i}".encode(), partition=0, timestamp_ms=now_ms - 7_200_000)
        await producer.send_and_wait(topic, b"old-1", partition=1, timestamp_ms=now_ms - 7_200_000)
        await producer.send_and_wait(topic, b"new-1", partition=1, timestamp_ms=now_ms - 60_000)
    finally:
        await producer.stop()

    seen: list[bytes | None] = []
    settings = load_settings(environ={"TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap})
    tail = TopicTail(settings, [topic], lambda _topic, value: seen.append(value), since_seconds=3600, **fetch)
    await tail.start()
    try:
        await asyncio.wait_for(tail.caught_up.wait(), 30)
        assert seen == [b"new-1"]
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for partition in range(3):
                await producer.send_and_wait(topic, f"later-{partition}".encode(), partition=partition)
        finally:
            await producer.stop()
        await asyncio.wait_for(tail.catch_up(), 30)
        assert sorted(seen) == [b"later-0", b"later-1", b"later-2", b"new-1"]
    finally:
        await tail.stop()
