"""End-to-end check of the local Kafka broker that streams/broker_files/kafka.sh runs."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from streams.broker import LocalBroker, wait_until_ready

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
        reason="KAFKA_BOOTSTRAP_SERVERS is set: an external broker is in use",
    ),
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A private broker on free ports, always stopped afterwards."""
    b = LocalBroker.on_free_ports(data_dir=tmp_path / "kafka")
    try:
        yield b
    finally:
        b.stop()


async def test_local_broker_roundtrip(broker: LocalBroker) -> None:
    assert broker.status() is False

    bootstrap = broker.start(timeout=120)
    assert bootstrap == broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
    assert broker.status() is True
    # start() already waited; a second probe must succeed at once.
    await wait_until_ready(bootstrap, timeout=10)
    # Idempotent: a second start finds it running and returns.
    assert broker.start(timeout=30) == bootstrap

    topic = f"broker-test-{uuid.uuid4().hex[:8]}"
    payload = b"hello kafka"

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        # Topic is auto-created on first send (auto.create.topics.enable=true).
        meta = await producer.send_and_wait(topic, payload, key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), timeout=30)
        assert (msg.value, msg.key) == (payload, b"k")
        tp = TopicPartition(topic, meta.partition)
        assert tp in consumer.assignment()
        await consumer.commit()
        assert await consumer.committed(tp) == meta.offset + 1
    finally:
        await consumer.stop()

    broker.stop()
    assert broker.status() is False
    # Stopping twice is harmless.
    broker.stop()
