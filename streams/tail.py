"""Follow topics without a consumer group, and know when everything written so far is read.

Every process that must rebuild state from Kafka before it acts (the guardrail view, the
answered-requests index) reads its topics with one of these: all partitions, from the
beginning or from a point in time, each record handed to ``apply``. ``catch_up()``
returns once the reader has passed what the topics held when it was called.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import stamina
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from streams.kafka_security import aiokafka_kwargs
from topologies.config import Settings

log = logging.getLogger(__name__)
Apply = Callable[[str, bytes | None], None]
T = TypeVar("T")


async def until_answered(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, retried with backoff for as long as the broker does not answer it: an
    offsets request that timed out under load (seen at 40 s in the 20,000-request kill
    loop) must delay a catch-up, not crash the worker."""
    async for attempt in stamina.retry_context(on=KafkaError, attempts=None, timeout=None):
        with attempt:
            return await call()
    raise AssertionError("unreachable: stamina either returns or raises")


class TopicTail:
    def __init__(
        self, settings: Settings, topics: Sequence[str], apply: Apply, since_seconds: float | None = None,
        fetch_min_bytes: int = 1, fetch_max_wait_ms: int = 500,
    ) -> None:
        """``since_seconds``: start that far back in time; None: from the beginning.
        ``fetch_min_bytes``/``fetch_max_wait_ms``: the broker answers a fetch once it has
        that much or has waited that long (a follower that need not be prompt asks less
        often)."""
        self.settings = settings
        self.fetch = {"fetch_min_bytes": fetch_min_bytes, "fetch_max_wait_ms": fetch_max_wait_ms}
        self.topics = list(topics)
        self.apply = apply
        self.since_seconds = since_seconds
        self.caught_up = asyncio.Event()  # set by the first catch-up
        self.listeners: list[Callable[[], None]] = []
        self.read = 0
        self._targets: list[tuple[dict[TopicPartition, int], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        # Asks for offsets and never fetches: on the reading consumer's connection an offsets
        # request waits behind the fetcher's long poll (fetch_max_wait_ms, 500 ms), which made
        # a catch-up after a rebalance take 0.5-1 s, and one request per partition at start 4 s.
        self._offsets: AIOKafkaConsumer | None = None
        self._started = asyncio.Event()

    async def start(self) -> None:
        kafka = aiokafka_kwargs(self.settings.kafka)
        offsets = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **kafka)
        await offsets.start()
        self._offsets = offsets
        consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **self.fetch, **kafka
        )
        await consumer.start()
        self._consumer = consumer
        partitions = [
            TopicPartition(topic, p) for topic in self.topics for p in sorted(await topic_partitions(self.settings, consumer, topic))
        ]
        ends = await until_answered(functools.partial(offsets.end_offsets, partitions))
        consumer.assign(partitions)
        if self.since_seconds is None:
            await consumer.seek_to_beginning(*partitions)
        else:
            since_ms = int((time.time() - self.since_seconds) * 1000)
            found = await until_answered(
                functools.partial(offsets.offsets_for_times, dict.fromkeys(partitions, since_ms))
            )
            for tp, at in found.items():
                consumer.seek(tp, ends[tp] if at is None else at.offset)  # None: nothing that recent
        self._task = asyncio.create_task(self._run(consumer))
        first = self._add_target(ends)
        first.add_done_callback(lambda _: self.caught_up.set())
        self._started.set()

    async def catch_up(self) -> None:
        """Return once everything the topics hold now has been applied."""
        await self._started.wait()
        assert self._consumer is not None and self._offsets is not None
        assignment = list(self._consumer.assignment())
        ends = await until_answered(functools.partial(self._offsets.end_offsets, assignment))
        await asyncio.shield(self._add_target(ends))

    def _add_target(self, ends: dict[TopicPartition, int]) -> asyncio.Future[None]:
        """A future set once the reader has passed ``ends``."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._targets.append(({tp: end for tp, end in ends.items() if end > 0}, future))
        return future

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=100)
                for tp, records in batch.items():
                    for record in records:
                        self.apply(tp.topic, record.value)
                    self.read += len(records)
                if self._targets:
                    positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
                    still = []
                    for ends, future in self._targets:
                        if all(positions[tp] >= end for tp, end in ends.items()):
                            if not future.done():
                                future.set_result(None)
                        else:
                            still.append((ends, future))
                    self._targets = still
                if batch:
                    for listener in self.listeners:
                        listener()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep reading; aiokafka reconnects
                log.exception("reading %s failed; retrying", ", ".join(self.topics))
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        for consumer in (self._consumer, self._offsets):
            if consumer is not None:
                await consumer.stop()


async def topic_partitions(settings: Settings, consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    found = consumer.partitions_for_topic(topic)
    if found:
        return found
    # Not in the consumer's metadata (created moments ago, maybe by another process): ask
    # the cluster until it exists.
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings.kafka))
    await admin.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            for described in await admin.describe_topics([topic]):
                if described["topic"] == topic and described["error_code"] == 0 and described["partitions"]:
                    return {p["partition"] for p in described["partitions"]}
            if loop.time() > deadline:
                raise RuntimeError(f"topic {topic} does not exist; run `tierstream topics create`")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
