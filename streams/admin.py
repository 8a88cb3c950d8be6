"""Create the topology's topics on a cluster (idempotent)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from streams.kafka_security import aiokafka_kwargs
from topologies.config import Settings
from topologies.topics import topology_of

log = logging.getLogger(__name__)


async def ensure_topics(settings: Settings, extra: Sequence[NewTopic] = ()) -> list[str]:
    """Create every topic of the topology (and ``extra``) that does not exist yet; return
    the names created."""
    topology = topology_of(settings)
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings.kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.config)
            for spec in topology.all()
        ] + list(extra)
        created: list[str] = []
        for topic in wanted:
            if topic.name in existing:
                continue
            try:
                await admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass  # another process won the race
        return created
    finally:
        await admin.close()


async def stable_groups(settings: Settings, groups: list[str]) -> dict[str, int]:
    """Members per consumer group, counting only groups in the Stable state."""
    admin = AIOKafkaAdminClient(**aiokafka_kwargs(settings.kafka))
    await admin.start()
    try:
        members: dict[str, int] = {}
        # One group per request: aiokafka 0.14 sends DescribeGroups v3 but decodes the
        # answer as v2, which misreads every group after the first.
        for group_id in groups:
            for response in await admin.describe_consumer_groups([group_id]):
                for group in response.to_object()["groups"]:
                    if group["error_code"] == 0 and group["state"] == "Stable":
                        members[group["group"]] = len(group["members"])
        return members
    finally:
        await admin.close()


async def wait_for_roles(
    settings: Settings, roles: list[str], timeout: float, members: int = 1
) -> None:
    """Wait until each role's consumer group is Stable with ``members`` members: the
    workers have joined and hold their partitions."""
    topology = topology_of(settings)
    groups = [topology.consumer_group(settings.app_id, role) for role in roles]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            stable = await stable_groups(settings, groups)
        except KafkaError:  # e.g. the offsets topic and its coordinator are still being created
            stable = {}
        waiting = [g for g in groups if stable.get(g, 0) < members]
        if not waiting:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"consumer groups not ready after {timeout:.0f}s: {', '.join(waiting)}")
        await asyncio.sleep(0.25)
