"""Producing requests and reading results: what an application around tierstream does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.codec import DecodeError, decode, encode
from schemas.models import AgentRequest, AgentResult, DeadLetter, WireModel
from streams.kafka_security import aiokafka_kwargs
from topologies.config import Settings
from topologies.topics import topology_of


def read_jsonl(path: Path) -> Iterable[AgentRequest]:
    """Requests from a JSON-lines file; a bad line stops with its line number."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield decode(line.strip(), AgentRequest)
                except DecodeError as exc:
                    raise ValueError(f"{path}:{number}: {exc.reason}") from None


async def produce_requests(
    settings: Settings,
    requests: Iterable[AgentRequest],
    on_sent: Callable[[int], None] | None = None,
) -> int:
    """Write requests to the requests topic keyed by workflow_id; return how many."""
    topic = topology_of(settings).requests.name
    producer = AIOKafkaProducer(
        acks="all", linger_ms=5, enable_idempotence=True, **aiokafka_kwargs(settings.kafka),
    )
    await producer.start()
    sent = 0
    try:
        pending: list[asyncio.Future[object]] = []
        for request in requests:
            pending.append(
                await producer.send(topic, encode(request), key=request.workflow_id.encode())
            )
            sent += 1
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                if on_sent:
                    on_sent(len(pending))
                pending.clear()
        await asyncio.gather(*pending)
        if on_sent and pending:
            on_sent(len(pending))
    finally:
        await producer.stop()
    return sent


async def follow(
    settings: Settings,
    topics: list[str],
    *,
    from_beginning: bool = False,
    idle_timeout: float | None = None,
    ready: asyncio.Event | None = None,
) -> AsyncIterator[tuple[str, bytes]]:
    """Yield (topic, value) from the given topics without a consumer group.

    Starts at the end of each partition unless ``from_beginning``; ``ready`` is set once
    the start positions are fixed, so a caller can produce without racing the seek.
    Stops after ``idle_timeout`` seconds without a message, if given.
    """
    consumer = AIOKafkaConsumer(
        *topics,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        **aiokafka_kwargs(settings.kafka),
    )
    await consumer.start()
    try:
        # Resolve positions now, so messages produced after `ready` are never skipped.
        partitions = consumer.assignment()
        while not partitions:
            await consumer.getmany(timeout_ms=100)
            partitions = consumer.assignment()
        for tp in partitions:
            await consumer.position(tp)
        if ready:
            ready.set()
        last = time.monotonic()
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            if batch:
                last = time.monotonic()
                for records in batch.values():
                    for record in records:
                        yield record.topic, record.value
            elif idle_timeout is not None and time.monotonic() - last > idle_timeout:
                return
    finally:
        await consumer.stop()


def render(topic_kind: str, value: bytes) -> str:
    """One readable line per result or dead letter."""
    model: type[WireModel] = AgentResult if topic_kind == "result" else DeadLetter
    try:
        item = decode(value, model)
    except DecodeError as exc:
        return f"(undecodable {topic_kind}: {exc.reason})"
    if isinstance(item, AgentResult):
        return (
            f"{item.request_id} {item.status:<8} {item.tier.value:<8} {item.model:<20} "
            f"in={item.input_tokens:<5} out={item.output_tokens:<5} ${item.cost_usd:.6f} "
            f"{item.timings.model_latency_ms:.0f}ms"
        )
    assert isinstance(item, DeadLetter)
    return f"DLQ {item.request_id or '-'} {item.code}: {item.reason}"


def result_topics(settings: Settings) -> tuple[str, str]:
    topology = topology_of(settings)
    return topology.results.name, topology.dead_letters.name
