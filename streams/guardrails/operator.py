"""What an operator does by hand: read the state, resume the hour, change a limit.

Each action is a GuardrailEvent on the compacted guardrails topic, so every worker
(and every worker started later) applies it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.codec import encode
from schemas.models import GuardrailEvent
from streams.guardrails.money import HOUR_SECONDS, hour_window, nanos_to_usd
from streams.guardrails.view import GuardrailView
from streams.kafka_security import aiokafka_kwargs
from streams.tail import topic_partitions
from topologies.config import Settings
from topologies.topics import topology_of

LimitName = Literal["hour", "workflow", "alert"]


async def read_state(settings: Settings, timeout: float = 30) -> GuardrailView:
    view = GuardrailView(settings)
    await view.start()
    try:
        await asyncio.wait_for(view.caught_up.wait(), timeout)
    finally:
        await view.stop()
    return view


async def cost_role_backlog(settings: Settings, view: GuardrailView) -> int:
    """Records of the costs topic the cost role has not counted yet (as its published
    totals say). Lease requests are among them: one that does not drain means no grants."""
    topic = topology_of(settings).costs.name
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **aiokafka_kwargs(settings.kafka))
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(await topic_partitions(settings, consumer, topic))]
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return sum(max(end - 1 - view.costs_applied.get(tp.partition, -1), 0) for tp, end in ends.items())


async def _publish(settings: Settings, event: GuardrailEvent) -> None:
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings.kafka))
    await producer.start()
    try:
        await producer.send_and_wait(
            topology_of(settings).guardrails.name, encode(event), key=event.scope.encode()
        )
    finally:
        await producer.stop()


async def resume_hour(settings: Settings, reason: str) -> GuardrailEvent:
    """Let calls through for the rest of the current hour, whatever was spent."""
    view = await read_state(settings)
    window = hour_window(time.time())
    event = GuardrailEvent(
        scope="resume:hour", kind="cleared", action="resume",
        spent_usd=nanos_to_usd(view.hour_spend(window)), limit_usd=nanos_to_usd(view.hour_limit),
        window_start=datetime.fromtimestamp(window, UTC),
        window_end=datetime.fromtimestamp(window + HOUR_SECONDS, UTC),
        reason=reason,
    )
    await _publish(settings, event)
    return event


async def set_limit(settings: Settings, name: LimitName, usd: float, reason: str) -> GuardrailEvent:
    """Replace a configured limit for the whole cluster until set again."""
    view = await read_state(settings)
    window = hour_window(time.time())
    spent = view.hour_spend(window) if name != "workflow" else 0
    event = GuardrailEvent(
        scope=f"limit:{name}", kind="limit_set", action="set_limit",
        spent_usd=nanos_to_usd(spent), limit_usd=usd, reason=reason,
    )
    await _publish(settings, event)
    return event
