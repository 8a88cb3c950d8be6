"""Writing requests to, and reading whole topics back from, the benchmarks' pipelines
(plain aiokafka clients, outside any consumer group)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.kafka_security import aiokafka_kwargs
from topologies.config import Settings
from topologies.topics import topology_of


async def produce_requests(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    """Write (key, value) pairs to the requests topic, acknowledged by every replica."""
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings.kafka))
    await producer.start()
    try:
        topic = topology_of(settings).requests.name
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_to_end(settings: Settings, topic: str) -> list[tuple[float, bytes | None]]:
    """Every record of ``topic`` up to its current end: (record timestamp s, raw value)."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **aiokafka_kwargs(settings.kafka))
    await consumer.start()
    out: list[tuple[float, bytes | None]] = []
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp, end in ends.items() if end > 0}
        while pending:
            for records in (await consumer.getmany(*pending, timeout_ms=500)).values():
                out.extend((r.timestamp / 1000, r.value) for r in records)
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return out
