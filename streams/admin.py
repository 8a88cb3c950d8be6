"""Create the topology's topics on a cluster (idempotent)."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from topologies.config import Settings
from topologies.topics import Topology

log = logging.getLogger(__name__)


async def ensure_topics(settings: Settings) -> list[str]:
    """Create every topic that does not exist yet; return the names created."""
    topology = Topology(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [spec for spec in topology.all() if spec.name not in existing]
        created: list[str] = []
        for spec in wanted:
            try:
                await admin.create_topics(
                    [NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=spec.config)]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another process won the race
        return created
    finally:
        await admin.close()
