"""The raw aiokafka baseline: the same hops as tierstream, without Faust.

``python -m benchmarks.baseline --role <role> --mode fake|sdk`` runs one role as a plain
aiokafka consume-transform-produce loop, configured like a worker (``TIERSTREAM__*``
environment). It reuses tierstream's transport-neutral handlers
(:class:`streams.roles.classifier.ClassifierHandler`, :class:`streams.roles.tier.TierHandler`),
so it decodes with ``schemas.codec.decode``, classifies with
:func:`streams.routing.rules.rules_tier` (``classifier.strategy: rules``) and writes the
same messages (tier request; result and cost event; dead letters) to the same kinds of
topics. Only the transport differs.

Modes of the tier roles:

* ``fake``: NO model call. The completion is built locally with the simulator's own
  deterministic answer generator, so results have the same shape and size as the
  simulator's. tierstream / this = Faust overhead + SDK + simulator cost.
* ``sdk``: the model is called through the same provider client registry tierstream uses
  (official ``openai`` SDK for the nano and premium tiers, ``anthropic`` SDK for
  standard, per ``topologies/default.yaml``) against the same simulator.
  tierstream / this = Faust overhead alone.

The cost role is the same hop too: it reads the costs topic and applies each event with
tierstream's :class:`streams.roles.cost.CostAccountant`, publishing the spend
snapshots of each poll's events together (its ``SpendBatch``, as tierstream does per
batch), and follows the spend topic with a :class:`GuardrailView`. Its totals live in
plain dicts (:class:`HourWindows`, a dict of lists) instead of Faust's changelog-backed
tables: durable state is part of what Faust costs.

Delivery matches tierstream's: at least once, an offset is committed only after
everything its message caused was acknowledged by the broker. Concurrency matches too:
the classifier handles one message at a time, a tier role keeps up to
``worker.max_concurrent_tasks`` calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.models import ChatMessage, Tier
from streams.envelope import Outgoing, Source
from streams.guardrails.money import hour_window
from streams.guardrails.view import GuardrailView
from streams.kafka_security import aiokafka_kwargs
from streams.pricing import PriceBook
from streams.providers import Completion, ProviderRegistry
from streams.providers.registry import Attempted
from streams.roles.classifier import Classifier, ClassifierHandler
from streams.roles.cost import COST_BATCH_EVENTS, CostAccountant
from streams.roles.tier import TierHandler
from streams.runtime.worker import producer_linger_seconds, producer_max_batch_bytes, use_event_loop
from streams.simulator import SimulatorConfig
from streams.simulator.content import AnswerMaker, content_text, estimate_text_tokens
from topologies.config import Settings, load_settings
from topologies.topics import ALL_ROLES, CLASSIFIER_ROLE, COST_ROLE, Topology, tier_role, topology_of

Handler = Callable[[Source], Awaitable[list[Outgoing]]]
COMMIT_INTERVAL_S = 0.5


class FakeProviders:
    """Stands in for :class:`ProviderRegistry`: answers at once, no HTTP, no SDK."""

    def __init__(self) -> None:
        sim = SimulatorConfig()
        self.answers = AnswerMaker(sim.output_tokens_min, sim.output_tokens_max)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def complete(
        self,
        provider: str,
        model: str,
        messages: list[ChatMessage],
        max_output_tokens: int,
        before_attempt: Callable[[int], Awaitable[None]] | None = None,
    ) -> Attempted:
        if before_attempt is not None:  # the registry's contract: one attempt, announced
            await before_attempt(1)
        texts = [content_text(m.content)[0] for m in messages]
        user = next((t for m, t in zip(reversed(messages), reversed(texts), strict=True) if m.role == "user"), "")
        system = "\n".join(t for m, t in zip(messages, texts, strict=True) if m.role == "system")
        answer = self.answers.answer(
            model=model, texts=texts, user_text=user, system_text=system,
            max_tokens=max_output_tokens,
        )
        completion = Completion(
            text=answer.text,
            finish_reason="length" if answer.truncated else "stop",
            model=model,
            input_tokens=sum(estimate_text_tokens(t) + 3 for t in texts) + 3,
            output_tokens=answer.output_tokens,
        )
        return Attempted(completion, 1)


class HourWindows:
    """A plain stand-in for the cost role's hourly tumbling table
    (:class:`streams.runtime.types.HourlyTable`)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, int], list[float | int]] = {}

    def get(self, key: str, at: float) -> list[float | int]:
        return self.data.get((key, hour_window(at)), [])

    def set(self, key: str, value: list[float | int], at: float, partition: int) -> None:
        self.data[(key, hour_window(at))] = value


class Workflows(dict):  # type: ignore[type-arg]
    """A plain stand-in for the cost role's workflow table (:class:`streams.runtime.types.KeyedTable`)."""

    def get(self, key: str) -> list[float | int]:  # type: ignore[override]
        return super().get(key) or []

    def set(self, key: str, value: list[float | int], partition: int) -> None:
        self[key] = value

    def delete(self, key: str, partition: int) -> None:
        self.pop(key, None)


class OffsetTracker:
    """The highest offset per partition below which every message is done."""

    def __init__(self) -> None:
        self.next_to_commit: dict[TopicPartition, int] = {}
        self.done: dict[TopicPartition, set[int]] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        self.next_to_commit.setdefault(tp, offset)
        self.done.setdefault(tp, set())

    def finished(self, tp: TopicPartition, offset: int) -> None:
        done = self.done[tp]
        done.add(offset)
        nxt = self.next_to_commit[tp]
        while nxt in done:
            done.discard(nxt)
            nxt += 1
        self.next_to_commit[tp] = nxt

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self.next_to_commit.pop(tp, None)
            self.done.pop(tp, None)


def _clients(
    settings: Settings, topology: Topology, source: str, role: str
) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
    """A role's producer (configured as tierstream's workers') and its group's consumer of
    ``source``, committing by hand."""
    kafka_kwargs = aiokafka_kwargs(settings.kafka)
    producer = AIOKafkaProducer(
        acks="all", linger_ms=round(producer_linger_seconds() * 1000),
        max_request_size=settings.kafka.max_message_bytes,
        max_batch_size=producer_max_batch_bytes(settings), **kafka_kwargs,
    )
    consumer = AIOKafkaConsumer(
        source, group_id=topology.consumer_group(settings.app_id, role),
        enable_auto_commit=False, auto_offset_reset="earliest", **kafka_kwargs,
    )
    return producer, consumer


async def run_role(settings: Settings, role: str, mode: str, stop: asyncio.Event) -> None:
    topology = topology_of(settings)
    if role == COST_ROLE:
        await run_cost_role(settings, topology, stop)
        return
    prices = PriceBook(settings)
    providers: ProviderRegistry | FakeProviders | None = None
    if role == CLASSIFIER_ROLE:
        if settings.classifier.strategy != "rules":
            raise SystemExit("the baseline classifier supports classifier.strategy=rules only")
        handler: Handler = ClassifierHandler(settings, topology, Classifier(settings, None), prices).handle
        source, concurrency = topology.requests.name, 1
    else:
        tier = next(t for t in Tier if tier_role(t) == role)
        providers = FakeProviders() if mode == "fake" else ProviderRegistry(settings)
        await providers.start()
        handler = TierHandler(tier, settings, topology, providers, prices).handle  # type: ignore[arg-type]
        source, concurrency = topology.tiers[tier].name, settings.worker.max_concurrent_tasks

    producer, consumer = _clients(settings, topology, source, role)
    offsets = OffsetTracker()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(tp: TopicPartition, record: object) -> None:
        # As a Faust agent: the concurrency slot covers handling and handing the output to
        # the producer; waiting for the broker's acknowledgement does not hold the slot.
        # The offset counts as done (committable) only once every output is acknowledged.
        try:
            outgoing = await handler(
                Source(record.topic, record.partition, record.offset, record.key, record.value)  # type: ignore[attr-defined]
            )
            sent = [await producer.send(o.topic, o.value, key=o.key) for o in outgoing]
        finally:
            slots.release()
        await asyncio.gather(*sent)
        offsets.finished(tp, record.offset)  # type: ignore[attr-defined]

    async def commit() -> None:
        assigned = consumer.assignment()
        wanted = {tp: o for tp, o in offsets.next_to_commit.items() if tp in assigned}
        if wanted:
            await consumer.commit(wanted)

    await producer.start()
    await consumer.start()
    try:
        last_commit = asyncio.get_running_loop().time()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=concurrency * 2)
            for tp, records in batch.items():
                for record in records:
                    await slots.acquire()
                    offsets.started(tp, record.offset)
                    task = asyncio.create_task(one(tp, record))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            now = asyncio.get_running_loop().time()
            if now - last_commit >= COMMIT_INTERVAL_S:
                await commit()
                last_commit = now
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        await commit()
    finally:
        await consumer.stop()
        await producer.stop()
        if providers is not None:
            await providers.close()


async def run_cost_role(settings: Settings, topology: Topology, stop: asyncio.Event) -> None:
    """The cost hop: each poll's cost events applied in offset order, their latest spend
    snapshots (and any guardrail events) published together, offsets committed once the
    broker has them all."""
    view = GuardrailView(settings)
    hourly = HourWindows()
    accountant = CostAccountant(settings, topology, hourly, Workflows(), view)
    batch = accountant.batch
    producer, consumer = _clients(settings, topology, topology.costs.name, COST_ROLE)
    await view.start()
    await producer.start()
    await consumer.start()
    try:
        await view.caught_up.wait()  # as tierstream: the published totals first
        while not stop.is_set():
            polled = await consumer.getmany(timeout_ms=200, max_records=COST_BATCH_EVENTS)
            if not polled:
                continue
            for records in polled.values():
                for record in records:
                    at = record.timestamp / 1000
                    batch.add(accountant.apply(
                        Source(record.topic, record.partition, record.offset, record.key, record.value, at), at,
                    ))
            accountant.tables.write()
            sent = [await producer.send(o.topic, o.value, key=o.key) for o in batch.take()]
            await asyncio.gather(*sent)
            await consumer.commit({tp: records[-1].offset + 1 for tp, records in polled.items()})
    finally:
        await consumer.stop()
        await producer.stop()
        await view.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=ALL_ROLES, required=True)
    parser.add_argument("--mode", choices=("fake", "sdk"), default="fake")
    args = parser.parse_args(argv)
    settings = load_settings()
    use_event_loop()  # the same event loop as tierstream's workers (uvloop by default)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_role(settings, args.role, args.mode, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
