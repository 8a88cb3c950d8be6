"""Helpers for the tests: waiting on a condition with a deadline (:func:`wait_until`), and
isolated pipelines on the session's real broker for the end-to-end tests."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from streams import processes
from streams.admin import ensure_topics
from streams.kafka_security import aiokafka_kwargs
from topologies import Settings, Topology, load_settings

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What :func:`wait_until` raises at its deadline; ``last`` is the last value seen."""

    def __init__(self, what: str, timeout: float, last: object) -> None:
        shown = repr(last)
        if len(shown) > 2000:
            shown = shown[:2000] + " ..."
        super().__init__(f"timed out after {timeout:g} s waiting for {what}; last seen: {shown}")
        self.last: Any = last


async def wait_until(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: str,
    *,
    accept: Callable[[T], Any] = bool,
    interval: float = 0.25,
) -> T:
    """Call ``condition`` (sync or async) until what it returns is accepted (by default:
    is truthy) and return that value; at the deadline raise :class:`WaitTimeout`, an
    AssertionError naming ``what``, the timeout and the last value seen. ``interval`` is
    the pause between calls: 0 for a condition that waits by itself (a Kafka poll with a
    timeout). An exception from ``condition`` (a worker found dead) ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if accept(value):
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(what, timeout, value)
        await asyncio.sleep(interval)  # the poll interval


@dataclass
class Collected:
    results: list[dict] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)

    def result_ids(self) -> Counter[str]:
        return Counter(r["request_id"] for r in self.results)


@dataclass
class Pipeline:
    """One test's deployment: its own topic prefix, consumer groups and worker processes."""

    env: dict[str, str]
    settings: Settings
    log_dir: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(self.settings)

    def kafka_kwargs(self) -> dict[str, object]:
        """aiokafka client kwargs (bootstrap servers, SASL/SSL) for this pipeline, with the
        password looked up as the workers see it: this process's environment plus ``env``."""
        return aiokafka_kwargs(self.settings.kafka, {**os.environ, **self.env})

    async def committed_lag(self, role: str, topic: str) -> dict[int, int]:
        """Per partition of ``topic``: messages not yet committed by ``role``'s consumer group."""
        from aiokafka.admin import AIOKafkaAdminClient

        from benchmarks.lag import committed_lag

        group = self.topology.consumer_group(self.settings.app_id, role)
        spec = next(t for t in self.topology.all() if t.name == topic)
        admin = AIOKafkaAdminClient(**self.kafka_kwargs())
        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **self.kafka_kwargs())
        await admin.start()
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(spec.partitions)]
            return {tp.partition: lag for tp, lag in (await committed_lag(admin, consumer, group, tps)).items()}
        finally:
            await consumer.stop()
            await admin.close()

    async def start_workers(self, *role_specs: str, health_ports: Sequence[int] = ()) -> None:
        """Create the topics (so producers cannot auto-create them with one partition),
        then start one ``tierstream worker --roles <spec>`` process per spec (the i-th on
        ``health_ports[i]`` when given, else on a free port)."""
        await ensure_topics(self.settings)
        for i, spec in enumerate(role_specs):
            name = spec.replace(":", "-").replace(",", "+")
            env = dict(self.env)
            if i < len(health_ports):
                env["TIERSTREAM__WORKER__HEALTH_PORT"] = str(health_ports[i])
            self.workers.append(
                processes.spawn(["worker", "--roles", spec], env, self.log_dir / f"worker-{name}.log")
            )

    def stop_workers(self) -> list[int]:
        """SIGTERM every worker at once (each may take its shutdown grace); their exit codes."""
        return processes.stop_all(self.workers)

    def assert_workers_alive(self) -> None:
        dead = [w.args for w in self.workers if w.poll() is not None]
        assert not dead, f"worker(s) exited early: {dead}; logs in {self.log_dir}"

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


def new_pipeline(bootstrap: str, simulator_port: int, log_dir: Path, **overrides: str) -> Pipeline:
    run = uuid.uuid4().hex[:10]
    env = {
        "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "TIERSTREAM__KAFKA__TOPIC_PREFIX": f"t{run}",
        "TIERSTREAM__APP_ID": f"ts-{run}",
        "TIERSTREAM__WORKER__HEALTH_PORT": "0",  # several workers per host: free ports
        **processes.simulator_env(simulator_port),
        # Rate limits would pace these workloads; tests/test_ratelimit_e2e.py tests them.
        "TIERSTREAM__RATE_LIMITS": "null",
        **overrides,
    }
    return Pipeline(env=env, settings=load_settings(environ=env), log_dir=log_dir)


async def collect(
    pipeline: Pipeline, expected: int, timeout: float, *, settle: float = 2.0
) -> Collected:
    """Read the results and dead-letter topics from the start until ``expected`` messages
    arrived (then ``settle`` seconds more, to catch duplicates) or ``timeout`` passed."""
    topology = pipeline.topology
    consumer = AIOKafkaConsumer(
        topology.results.name,
        topology.dead_letters.name,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **pipeline.kafka_kwargs(),
    )
    collected = Collected()
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            if settle_until is not None and time.monotonic() > settle_until:
                break
            batch = await consumer.getmany(timeout_ms=250)
            for records in batch.values():
                for record in records:
                    item = orjson.loads(record.value)
                    target = collected.results if record.topic == topology.results.name else collected.dead_letters
                    target.append(item)
            if settle_until is None and len(collected.results) + len(collected.dead_letters) >= expected:
                settle_until = time.monotonic() + settle
            pipeline.assert_workers_alive()
    finally:
        await consumer.stop()
    return collected


async def produce_raw(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Write raw (key, value) pairs with a plain aiokafka producer."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(futures)


def is_cost(item: dict) -> bool:
    """A costs-topic record that is a call's cost, not a budget lease's record."""
    return "budget" not in item


async def read_topic(
    pipeline: Pipeline, topic: str, expected: int, timeout: float, keep: Callable[[dict], bool] | None = None,
) -> list[dict]:
    """Every JSON message of ``topic`` from the start (those ``keep`` accepts), once
    ``expected`` arrived or at the deadline."""
    consumer = AIOKafkaConsumer(
        topic,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **pipeline.kafka_kwargs(),
    )
    items: list[dict] = []
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while len(items) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=250)).values():
                items.extend(i for i in map(orjson.loads, (r.value for r in records)) if keep is None or keep(i))
    finally:
        await consumer.stop()
    return items


async def read_to_end(pipeline: Pipeline, *topics: str) -> list[ConsumerRecord]:
    """Every record of ``topics``, from the start to the end offsets of when it was called."""
    consumer = AIOKafkaConsumer(
        group_id=None, auto_offset_reset="earliest", enable_auto_commit=False, **pipeline.kafka_kwargs()
    )
    records: list[ConsumerRecord] = []
    await consumer.start()
    try:
        partitions = []
        for topic in topics:

            async def partitions_of(topic: str = topic) -> set[int]:
                await consumer._client.force_metadata_update()
                return consumer.partitions_for_topic(topic) or set()

            found = await wait_until(partitions_of, 30, f"the partitions of topic {topic}")
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)

        async def left_to_read() -> dict[TopicPartition, int]:
            left = {tp: end - await consumer.position(tp) for tp, end in ends.items()}
            left = {tp: n for tp, n in left.items() if n > 0}
            if left:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
            return left

        await wait_until(left_to_read, 120, f"the end of {', '.join(topics)}", accept=lambda left: not left, interval=0)
    finally:
        await consumer.stop()
    return records
