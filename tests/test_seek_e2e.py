"""The seek that Faust performs after it drops fetched records, against a real broker.

A consumer reads past records without committing (what Faust's fetcher has done when a
rebalance makes it drop a batch); seeking to the committed offsets must bring it back to
where it has to read again, including on partitions with no commit or a commit of 0.
"""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from streams.runtime.transport import seek_to_committed_or_beginning
from tests.support import produce_raw

pytestmark = pytest.mark.e2e


async def _read_to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
    ends = await consumer.end_offsets(tps)
    for _ in range(100):
        if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
            return
        await consumer.getmany(*tps, timeout_ms=500)
    raise AssertionError("the consumer did not reach the end of the partitions")


async def test_partitions_without_a_committed_offset_are_rewound(kafka_bootstrap: str) -> None:
    topic, other = f"seek-{uuid.uuid4().hex[:8]}", f"changelog-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1), NewTopic(other, 1, 1)])
    finally:
        await admin.close()
    for name in (topic, other):
        # 60 keys spread over the partitions: each gets well over five records
        await produce_raw(kafka_bootstrap, name, [(f"k{n}".encode(), b"v") for n in range(60)])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=f"g-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False, auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        never, zero, five = (TopicPartition(topic, p) for p in range(3))
        changelog = TopicPartition(other, 0)
        tps = [never, zero, five, changelog]
        consumer.assign(tps)
        await consumer.commit({zero: OffsetAndMetadata(0, ""), five: OffsetAndMetadata(5, "")})
        await _read_to_end(consumer, tps)
        assert all([await consumer.position(tp) > 5 for tp in (never, zero, five)])

        committed = await seek_to_committed_or_beginning(consumer, skip_topics={other})

        # where each partition is read from next
        assert committed[never] == 0 and committed[zero] == 0 and committed[five] == 5
        assert await consumer.position(never) == 0
        assert await consumer.position(zero) == 0
        assert await consumer.position(five) == 5
        end = (await consumer.end_offsets([changelog]))[changelog]
        assert await consumer.position(changelog) == end, "a skipped topic must keep its position"
    finally:
        await consumer.stop()
