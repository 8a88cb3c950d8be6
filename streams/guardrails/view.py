"""Every process's view of the cluster's spend and guardrail state, rebuilt from Kafka.

A group-less consumer reads the compacted spend and guardrails topics from the start, so
a new or restarted worker knows the hour's spend, each workflow's spend, the operator's
limits and resumes before it admits a single model call (``caught_up``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import DecodeError, decode
from schemas.models import GuardrailEvent, SpendSnapshot
from streams.guardrails.money import hour_window, nanos_to_usd, usd_to_nanos
from streams.kafka_security import aiokafka_kwargs
from topologies.config import Settings
from topologies.topics import Topology

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PartTotal:
    nanos: int
    last_offset: int


@dataclass(frozen=True, slots=True)
class WorkflowTotal:
    nanos: int
    partition: int
    last_offset: int
    # When the cost role published it (epoch seconds): how long the workflow has been idle.
    updated_at: float = field(default=0.0, compare=False)


class GuardrailView:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology(settings)
        guard = settings.cost_guardrails
        self.hour_limit = usd_to_nanos(guard.max_cost_per_hour_usd)
        self.workflow_limit = usd_to_nanos(guard.max_cost_per_workflow_usd)
        self.alert_threshold = usd_to_nanos(guard.alert_threshold_usd)
        # (window_start, scope, partition) -> total; only the newest windows are kept
        self.hours: dict[tuple[int, str, int], PartTotal] = {}
        self.workflows: dict[str, WorkflowTotal] = {}
        self.resumed_windows: set[int] = set()
        self.caught_up = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    # ------------------------------------------------------------------ state
    def apply(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        try:
            if topic == self.topology.spend.name:
                self._apply_spend(decode(value, SpendSnapshot))
            else:
                self._apply_guardrail(decode(value, GuardrailEvent))
        except DecodeError as exc:
            log.warning("ignoring an undecodable message on %s: %s", topic, exc.reason)

    def _apply_spend(self, snap: SpendSnapshot) -> None:
        if snap.kind == "hour" and snap.window_start is not None:
            window = int(snap.window_start.timestamp())
            self.hours[(window, snap.scope, snap.partition)] = PartTotal(snap.spent_nanos, snap.last_offset)
            self._forget_old_windows(window)
        elif snap.kind == "workflow":
            self.workflows[snap.scope] = WorkflowTotal(
                snap.spent_nanos, snap.partition, snap.last_offset, snap.updated_at.timestamp()
            )

    def _forget_old_windows(self, newest: int) -> None:
        if len(self.hours) > 512:
            self.hours = {k: v for k, v in self.hours.items() if k[0] >= newest - 7200}

    def _apply_guardrail(self, event: GuardrailEvent) -> None:
        if event.kind == "limit_set" and event.scope == "limit:hour":
            self.hour_limit = usd_to_nanos(event.limit_usd)
        elif event.kind == "limit_set" and event.scope == "limit:workflow":
            self.workflow_limit = usd_to_nanos(event.limit_usd)
        elif event.kind == "limit_set" and event.scope == "limit:alert":
            self.alert_threshold = usd_to_nanos(event.limit_usd)
        elif event.scope == "resume:hour" and event.window_start is not None:
            self.resumed_windows.add(int(event.window_start.timestamp()))

    # ---------------------------------------------------------------- queries
    def hour_spend(self, window: int, scope: str = "global") -> int:
        return sum(t.nanos for (w, s, _), t in self.hours.items() if w == window and s == scope)

    def hour_part(self, window: int, partition: int, scope: str = "global") -> PartTotal | None:
        return self.hours.get((window, scope, partition))

    def workflow_spend(self, workflow_id: str) -> WorkflowTotal | None:
        return self.workflows.get(workflow_id)

    def alerting(self, now: float | None = None) -> bool:
        """The hour's spend has reached the alert threshold."""
        return self.hour_spend(hour_window(time.time() if now is None else now)) >= self.alert_threshold

    def hour_paused(self, now: float | None = None) -> bool:
        window = hour_window(time.time() if now is None else now)
        return window not in self.resumed_windows and self.hour_spend(window) >= self.hour_limit

    def status(self, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
        window = hour_window(now)
        spent = self.hour_spend(window)
        blocked = sorted(w for w, t in self.workflows.items() if t.nanos >= self.workflow_limit)
        return {
            "window_start": window,
            "hour_spent_usd": nanos_to_usd(spent),
            "hour_limit_usd": nanos_to_usd(self.hour_limit),
            "alert_threshold_usd": nanos_to_usd(self.alert_threshold),
            "alerting": spent >= self.alert_threshold,
            "paused": self.hour_paused(now),
            "resumed_by_operator": window in self.resumed_windows,
            "workflow_limit_usd": nanos_to_usd(self.workflow_limit),
            "blocked_workflows": blocked,
        }

    # ------------------------------------------------------------- consuming
    async def start(self) -> None:
        spend, guardrails = self.topology.spend.name, self.topology.guardrails.name
        consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **aiokafka_kwargs(self.settings.kafka),
        )
        await consumer.start()
        self._consumer = consumer
        partitions = [
            TopicPartition(topic, p)
            for topic in (spend, guardrails)
            for p in sorted(await self._partitions(consumer, topic))
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        self._task = asyncio.create_task(self._run(consumer, ends))

    @staticmethod
    async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            found = consumer.partitions_for_topic(topic)
            if found:
                return found
            if loop.time() > deadline:
                raise RuntimeError(f"topic {topic} does not exist; run `tierstream topics create`")
            await consumer._client.force_metadata_update()  # topic just created elsewhere

    async def _run(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        pending = {tp for tp, end in ends.items() if end > 0}
        if not pending:
            self._caught_up(0)
        read = 0
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=100)
                for tp, records in batch.items():
                    for record in records:
                        self.apply(tp.topic, record.value)
                    read += len(records)
                if pending:
                    pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
                    if not pending:
                        self._caught_up(read)
                if batch:
                    for listener in self.listeners:
                        listener()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep the view alive; aiokafka reconnects
                log.exception("reading guardrail state failed; retrying")
                await asyncio.sleep(1.0)

    def _caught_up(self, read: int) -> None:
        log.info("guardrail state read from Kafka (%d messages): %s", read, self.status())
        self.caught_up.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        if self._consumer is not None:
            await self._consumer.stop()
