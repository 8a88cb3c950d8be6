"""The cluster's open batches, as the batch-jobs topic says, and what a batch already wrote.

Every batch role reads the whole batch-jobs topic (:class:`JobBook`): it knows every open
batch of the cluster, so it can count what is enqueued per model, recognise a request it
reads again as one a batch already carries, and, after a rebalance, take over the batches
of the partitions it was given. :class:`WrittenRecords` reads back, from the offsets a
batch recorded before answering, which requests it already answered.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import DecodeError, decode
from schemas.models import BatchJob
from streams.dedupe import request_id_of
from streams.kafka_security import aiokafka_kwargs
from streams.tail import TopicTail, topic_partitions, until_answered
from streams.tokens import estimate_input_tokens
from topologies.config import Settings
from topologies.topics import topology_of

log = logging.getLogger(__name__)

OPEN_STATES = ("submitting", "submitted", "answering")
STEP = {"submitting": 0, "submitted": 1, "answering": 2, "answered": 3}
# How long an answered job's key is remembered: its older records, read late from the
# topic, must not bring it back.
CLOSED_MEMORY_SECONDS = 86_400.0


def enqueued_tokens(job: BatchJob) -> int:
    """What the providers count against a model's batch queue: input plus max output."""
    return sum(estimate_input_tokens(r) + r.max_output_tokens for r in job.items)


@dataclass(frozen=True, slots=True)
class Enqueued:
    requests: int = 0
    tokens: int = 0


class JobBook:
    def __init__(self, settings: Settings) -> None:
        self.jobs: dict[str, BatchJob] = {}
        self._carrying: dict[str, str] = {}  # request_id -> job_key
        self._closed: dict[str, float] = {}  # answered job keys -> when, oldest first
        self._tail = TopicTail(settings, [topology_of(settings).batch_jobs.name], self._apply)
        self.ready = asyncio.Event()  # caught up since the last assignment
        self._generation = 0
        self._catching_up: set[asyncio.Future[None]] = set()

    def _apply(self, _topic: str, value: bytes | None) -> None:
        if value is None:
            return  # a tombstone follows the job's "answered" record, which removed it
        try:
            job = decode(value, BatchJob)
        except DecodeError as exc:
            log.warning("unreadable batch-jobs record skipped: %s", exc)
            return
        self.apply(job)

    def apply(self, job: BatchJob) -> None:
        """A job's record. A role applies its own records as it writes them, and reads
        them again from the topic a moment later: a record of an earlier step (or of a
        job already answered) changes nothing."""
        if job.job_key in self._closed:
            return
        known = self.jobs.get(job.job_key)
        if known is not None and STEP[job.state] < STEP[known.state]:
            return
        if job.state == "answered":
            now = time.monotonic()
            self._closed[job.job_key] = now
            for key, at in list(itertools.islice(self._closed.items(), 16)):
                if now - at <= CLOSED_MEMORY_SECONDS:
                    break
                del self._closed[key]
        old = self.jobs.pop(job.job_key, None)
        if old is not None:
            for request in old.items:
                self._carrying.pop(request.request_id, None)
        if job.state in OPEN_STATES:
            self.jobs[job.job_key] = job
            for request in job.items:
                self._carrying[request.request_id] = job.job_key

    def carries(self, request_id: str) -> bool:
        return request_id in self._carrying

    def enqueued(self, provider: str, model: str) -> Enqueued:
        """What the cluster's open batches hold for a model (answered ones are gone)."""
        jobs = [j for j in self.jobs.values() if j.provider == provider and j.model == model and j.state != "answering"]
        return Enqueued(sum(len(j.items) for j in jobs), sum(enqueued_tokens(j) for j in jobs))

    def owned(self, partitions: Iterable[int]) -> list[BatchJob]:
        mine = set(partitions)
        return [job for job in self.jobs.values() if job.source_partition in mine]

    def batch_ids(self) -> set[str]:
        return {job.batch_id for job in self.jobs.values() if job.batch_id}

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.assigned(())
        await self._tail.start()

    async def stop(self) -> None:
        for task in self._catching_up:
            task.cancel()
        await self._tail.stop()

    async def catch_up(self) -> None:
        await self._tail.catch_up()

    def assigned(self, _partitions: object) -> None:
        """After every assignment: the batches of the new partitions are known (what their
        previous owner recorded) before any of their requests is read."""
        task = asyncio.ensure_future(self._on_assigned())
        self._catching_up.add(task)
        task.add_done_callback(self._catching_up.discard)

    async def _on_assigned(self) -> None:
        self._generation += 1
        generation = self._generation
        self.ready.clear()
        await self._tail.catch_up()
        if generation == self._generation:
            self.ready.set()


def position_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


class WrittenRecords:
    """End offsets of topics, and the request ids written to them since recorded offsets."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        # One read at a time: the consumer's assignment is the read's (two batches resumed
        # together after a restart each assigned their own, and one waited forever).
        self._reading = asyncio.Lock()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, **aiokafka_kwargs(self.settings.kafka)
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def ends(self, topics: Iterable[str]) -> dict[str, int]:
        assert self._consumer is not None
        partitions = [
            TopicPartition(t, p) for t in topics for p in sorted(await topic_partitions(self.settings, self._consumer, t))
        ]
        ends = await until_answered(functools.partial(self._consumer.end_offsets, partitions))
        return {position_key(tp.topic, tp.partition): end for tp, end in ends.items()}

    async def request_ids(self, since: dict[str, int]) -> dict[str, set[str]]:
        """Per topic, the request ids of the records written from ``since`` to now."""
        async with self._reading:
            return await self._request_ids(since)

    async def _request_ids(self, since: dict[str, int]) -> dict[str, set[str]]:
        assert self._consumer is not None
        consumer = self._consumer
        starts = {}
        for key, offset in since.items():
            topic, _, partition = key.rpartition(":")
            starts[TopicPartition(topic, int(partition))] = offset
        ends = await until_answered(functools.partial(consumer.end_offsets, list(starts)))
        todo = {tp: end for tp, end in ends.items() if end > starts[tp]}
        found: dict[str, set[str]] = {}
        if not todo:
            return found
        consumer.assign(list(todo))
        for tp in todo:
            consumer.seek(tp, starts[tp])
        try:
            while todo:
                batch = await consumer.getmany(*todo, timeout_ms=1000)
                for tp, records in batch.items():
                    for record in records:
                        request_id = request_id_of(record.value)
                        if request_id is not None:
                            found.setdefault(tp.topic, set()).add(request_id)
                for tp in list(todo):
                    if await consumer.position(tp) >= todo[tp]:
                        del todo[tp]
        finally:
            consumer.unsubscribe()
        return found


def open_batches(book: JobBook, now: float) -> list[dict[str, object]]:
    """What ``tierstream batch status`` prints: every open batch, oldest first."""
    jobs = sorted(book.jobs.values(), key=lambda j: j.created_at)
    return [
        {
            "job": job.job_key, "state": job.state, "provider": job.provider, "model": job.model,
            "batch_id": job.batch_id, "items": len(job.items), "source_partition": job.source_partition,
            "age_seconds": round(now - job.created_at.timestamp(), 1), "resubmissions": job.resubmissions,
        }
        for job in jobs
    ]


async def read_open_batches(settings: Settings, timeout: float = 30) -> list[dict[str, object]]:
    book = JobBook(settings)
    await book.start()
    try:
        await asyncio.wait_for(book.ready.wait(), timeout)
    finally:
        await book.stop()
    return open_batches(book, time.time())
