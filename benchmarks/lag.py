"""Consumer lag over time, sampled while a pipeline runs.

Lag of a role = sum over its source topic's partitions of (log end offset - the role's
consumer group's committed offset). Committed offsets are what Kafka, KEDA and lag
exporters see: Faust commits every ``broker_commit_interval`` (2.8 s by default) and the
raw baselines every 0.5 s, so the curve is as coarse as the commits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from streams.kafka_security import aiokafka_kwargs
from topologies.config import Settings
from topologies.topics import topology_of


def role_partitions(settings: Settings, roles: list[str]) -> dict[str, list[TopicPartition]]:
    """Each role's source partitions (of the first topic its flow reads)."""
    topology = topology_of(settings)
    counts = {spec.name: spec.partitions for spec in topology.all()}
    flows = {flow.role: flow for flow in topology.flows()}
    return {
        role: [TopicPartition(flows[role].reads[0], p) for p in range(counts[flows[role].reads[0]])]
        for role in roles
    }


async def committed_lag(
    admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, group: str, partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """Per partition: log end offset - ``group``'s committed offset (0 if none committed).

    The committed offsets are read first: the end offsets, read after, can only have grown,
    so no partition comes out negative. Read the other way round, a commit landing between
    the two reads can pass the end offset already read.
    """
    committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
    ends = await consumer.end_offsets(partitions)
    return {
        tp: ends[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
        for tp in partitions
    }


class LagSampler:
    def __init__(self, settings: Settings, roles: list[str], interval: float = 0.5) -> None:
        self.settings = settings
        self.interval = interval
        self.partitions = role_partitions(settings, roles)
        self.groups = {role: topology_of(settings).consumer_group(settings.app_id, role) for role in roles}
        self.samples: list[dict[str, float | int]] = []
        self.errors = 0
        self.latest: dict[str, int] = {}

    async def _sample(self, admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, t0: float) -> None:
        sample: dict[str, float | int] = {"t_s": round(time.time() - t0, 3)}
        for role, tps in self.partitions.items():
            sample[role] = sum((await committed_lag(admin, consumer, self.groups[role], tps)).values())
        sample["total"] = sum(int(sample[r]) for r in self.partitions)
        self.latest = {r: int(sample[r]) for r in self.partitions}
        self.samples.append(sample)

    async def run(self, stop: asyncio.Event, t0: float, on_sample: Callable[[], None] = lambda: None) -> None:
        """Sample every ``interval`` seconds until ``stop`` is set (and once more then),
        calling ``on_sample`` after each sample."""
        kafka = aiokafka_kwargs(self.settings.kafka)
        admin = AIOKafkaAdminClient(**kafka)
        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **kafka)
        await admin.start()
        await consumer.start()
        try:
            while True:
                try:
                    await self._sample(admin, consumer, t0)
                except KafkaError:
                    self.errors += 1
                on_sample()
                if stop.is_set():
                    return
                try:
                    await asyncio.wait_for(stop.wait(), self.interval)
                except TimeoutError:
                    pass
        finally:
            await consumer.stop()
            await admin.close()

    def figures(self) -> dict[str, object]:
        peak = {role: max((int(s[role]) for s in self.samples), default=0) for role in self.partitions}
        return {
            "interval_s": self.interval,
            "basis": "log end offset - committed offset, summed over the role's source partitions",
            "peak": peak,
            "peak_total": max((int(s["total"]) for s in self.samples), default=0),
            "final": self.samples[-1] if self.samples else None,
            "errors": self.errors,
            "samples": self.samples,
        }
