"""One Faust app per role, each its own consumer group.

A role (``classifier``, ``tier-nano`` ...) is a Faust app whose id is
``<app_id>-<role>``, so every role is a consumer group of its own: any mix of processes,
a monolith beside a scaled-out tier, consumes each topic exactly once per group, and
Faust's partition assignor only ever sees members with identical subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import faust
import mode
from aiokafka.admin import NewTopic

from schemas.models import Tier
from streams.admin import ensure_topics
from streams.classifier import Classifier, ClassifierHandler
from streams.dedupe import AnsweredIndex, DedupeService, request_id_of
from streams.envelope import Outgoing, Source
from streams.faust_transport import Transport, as_current_event
from streams.guardrails.budget import BudgetGate
from streams.guardrails.cost_role import CostAccountant, CostOffsets, FaustPositions, Rewound, cost_tables
from streams.guardrails.service import GuardrailService
from streams.guardrails.view import GuardrailView
from streams.kafka_security import faust_settings
from streams.logs import logging_config
from streams.observability import OutgoingObserver, default_metrics, worker_services
from streams.pricing import PriceBook
from streams.providers import ProviderRegistry
from streams.ratelimit import RateLimiter
from streams.shutdown import InFlight
from streams.tail import FollowerService
from streams.throttle_feed import ThrottleFeed, process_origin
from streams.tier_worker import TierHandler
from topologies.config import Settings
from topologies.topics import CLASSIFIER_ROLE, COST_ROLE, Role, TopicSpec, Topology, tier_role

Handler = Callable[[Source], Awaitable[list[Outgoing]]]
BatchHandler = Callable[[list[Source]], Awaitable[list[list[Outgoing]]]]
log = logging.getLogger(__name__)


class ProviderService(mode.Service):
    """Opens the provider client pools with the app and closes them on shutdown."""

    def __init__(self, registry: ProviderRegistry, **kwargs: object) -> None:
        self.registry = registry
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.registry.start()

    async def on_stop(self) -> None:
        await self.registry.close()

    @mode.Service.task
    async def _scale_down_idle_clients(self) -> None:
        # Checked every quarter of the shortest idle timeout (at most every minute), so a
        # configured timeout holds to within a quarter of itself.
        while not self.should_stop:
            await self.sleep(self.registry.idle_check_seconds)
            for pool in self.registry.pools.values():
                await pool.scale_down_idle()


def _faust_topic(app: faust.App, spec: TopicSpec) -> faust.TopicT:
    return app.topic(
        spec.name,
        partitions=spec.partitions,
        replicas=spec.replication_factor,
        compacting=spec.compacted,
        config={k: v for k, v in spec.config.items() if k != "cleanup.policy"},
        key_serializer="raw",
        value_serializer="raw",
    )


def _ack(app: faust.App, event: faust.EventT) -> None:
    app.consumer.mark_handled(event.message)  # see streams.faust_transport: acks
    event.ack()


def _answering(index: AnsweredIndex | None, request_id: str | None) -> contextlib.AbstractContextManager[None]:
    if index is None or request_id is None:
        return contextlib.nullcontext()
    return index.answering(request_id)


async def _send(outputs: dict[str, faust.TopicT], out: Outgoing, wait: bool = False) -> None:
    future = await outputs[out.topic].send(key=out.key, value=out.value)
    if out.on_delivered is not None:
        future.add_done_callback(_delivery_callback(out.on_delivered))
    if wait:
        await future


def _delivery_callback(on_delivered: Callable[[int, int], None]) -> Callable[[asyncio.Future], None]:
    def callback(future: asyncio.Future) -> None:  # type: ignore[type-arg]
        if not future.cancelled() and future.exception() is None:
            metadata = future.result()
            on_delivered(metadata.partition, metadata.offset)

    return callback


def build_role_app(settings: Settings, role: Role, datadir: Path | None = None) -> faust.App:
    topology = Topology(settings)
    group = topology.consumer_group(settings.app_id, role)
    datadir = datadir or settings.worker.datadir or Path(tempfile.mkdtemp(prefix=f"{group}-"))
    app = faust.App(
        group,
        **faust_settings(settings.kafka),
        key_serializer="raw",
        value_serializer="raw",
        topic_replication_factor=settings.kafka.replication_factor,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.worker.session_timeout_seconds,
        producer_acks=-1,
        producer_max_request_size=settings.kafka.max_message_bytes,
        producer_linger=producer_linger_seconds(),
        producer_max_batch_size=producer_max_batch_bytes(settings),
        web_enabled=False,
        # Tier agents can be held by the budget gate for the rest of an hour; a rebalance
        # must not wait for them. An event held across a rebalance is still answered (and
        # maybe again by the partition's new owner): at least once, never lost.
        stream_wait_empty=role == CLASSIFIER_ROLE or role == COST_ROLE,
        # An agent that raises must not look healthy while doing nothing (a cost role
        # restarted into the same error every few seconds disables the guardrails): the
        # worker exits and its process manager restarts it. Handlers catch what they
        # expect, so this is for bugs.
        agent_supervisor=mode.CrashingSupervisor,
        datadir=str(datadir),
        logging_config=logging_config(settings.worker.log_level, role),
    )
    # Before anything reaches app.transport (app.topic does): see streams.faust_transport.
    app.transport = Transport(app.conf.broker_consumer, app)
    prices = PriceBook(settings)
    providers: ProviderRegistry | None = None
    limiter: RateLimiter | None = None
    view: GuardrailView | None = None
    accountant: CostAccountant | None = None
    answered: AnsweredIndex | None = None
    batch_handler: BatchHandler | None = None
    if role == CLASSIFIER_ROLE:
        needs_models = settings.classifier.strategy == "llm"
        providers = ProviderRegistry(settings) if needs_models else None
        classifier = Classifier(settings, providers)
        classifier_handler = ClassifierHandler(settings, topology, classifier, prices)
        handler: Handler = classifier_handler.handle
        batch_handler = classifier_handler.handle_batch
        source = topology.requests
        # One agent classifying in batches keeps each workflow's requests in offset order
        # (a partition's records reach one stream in order, and a batch is sent in order).
        concurrency = 1
    elif role == COST_ROLE:
        view = GuardrailView(settings)
        hourly, workflows = cost_tables(app, topology)
        accountant = CostAccountant(settings, topology, hourly, workflows, view)
        offsets = CostOffsets(view)

        @app.on_partitions_assigned.connect
        async def _resume_after_published(_app: faust.App, assigned: set, **_: object) -> None:
            offsets.on_assigned()

        positions = FaustPositions(app)

        @app.timer(offsets.patience)
        async def repeat_overdue_rewinds() -> None:
            await offsets.repeat_overdue(topology.costs.name, positions)

        async def handler(source: Source) -> list[Outgoing]:
            generation = app.consumer_generation_id
            # The published totals must be read before the first event is counted.
            await accountant.view.caught_up.wait()
            await offsets.admit(source, generation, positions)
            out = accountant.apply(source, source.timestamp)
            offsets.counted(source.partition, source.offset)
            return out

        source = topology.costs
        concurrency = 1  # tables are updated in offset order
    else:
        tier = next(t for t in Tier if tier_role(t) == role)
        providers = ProviderRegistry(settings)
        view = GuardrailView(settings)
        limiter = RateLimiter(settings, tier, topology, providers.throttles)
        handler = TierHandler(
            tier, settings, topology, providers, prices, BudgetGate(view), limiter
        ).handle
        source = topology.tiers[tier]
        concurrency = settings.worker.max_concurrent_tasks
        answered = AnsweredIndex(settings)
        app.service(DedupeService(answered, app))

        @app.on_partitions_assigned.connect
        async def _rate_limit_shares(_app: faust.App, assigned: set, **_: object) -> None:
            # Quotas follow partitions: recomputed from the full assignment on every rebalance.
            limiter.on_assignment((tp.topic, tp.partition) for tp in assigned)
    if view is not None:
        app.service(GuardrailService(view, source.name if role != COST_ROLE else None))
    metrics = default_metrics()
    if providers is not None:
        app.service(ProviderService(providers))
        # A 429 here pauses every replica; every replica's 429 pauses this one.
        throttles_topic = _faust_topic(app, topology.throttles)

        async def publish_throttle(key: bytes, value: bytes) -> None:
            await throttles_topic.send(key=key, value=value)

        feed = ThrottleFeed(settings, providers.throttles, publish_throttle, process_origin(role))
        app.service(FollowerService(feed))
        metrics.rate_limits.watch(providers, limiter)
    for service in worker_services(app, settings, metrics, providers, view):
        app.service(service)  # /health /ready /metrics, and what they read
    observe = OutgoingObserver(topology, metrics).observe_outgoing

    outputs = {spec.name: _faust_topic(app, spec) for spec in topology.all() if spec is not source}
    in_flight = InFlight()
    costs_topic = topology.costs.name

    # The cost role publishes its snapshots per batch of events (see SpendBatch): a batch
    # goes out when it holds COST_BATCH_EVENTS events or COST_BATCH_SECONDS after its first,
    # and its events are acked only then. Faust waits for those acks before a rebalance
    # completes (stream_wait_empty), so no batch is published after its partitions moved.
    batch = accountant.batch if accountant is not None else None
    batched: list[faust.EventT] = []
    batch_started = asyncio.Event()
    publishing = asyncio.Lock()

    async def publish_batch() -> None:
        async with publishing:
            if batch is None or not batched:
                return
            outgoing, events = batch.take(), list(batched)
            batched.clear()
            if accountant is not None:  # the batch's table updates, then its snapshots
                last_of = {event.message.partition: event for event in events}
                accountant.tables.write(lambda partition: as_current_event(last_of[partition]))
            for out in outgoing:
                await _send(outputs, out)
            for event in events:
                _ack(app, event)

    if batch is not None:

        @app.task
        async def publish_batches() -> None:
            while True:
                await batch_started.wait()
                await asyncio.sleep(COST_BATCH_SECONDS)
                batch_started.clear()
                await publish_batch()

    @app.on_before_shutdown.connect
    async def drain_in_flight(sender: faust.App, **kwargs: object) -> None:
        await in_flight.drain(settings.worker.shutdown_grace_seconds)
        await publish_batch()

    def source_of(event: faust.EventT) -> Source:
        message = event.message
        return Source(
            message.topic, message.partition, message.offset, message.key,
            message.value, message.timestamp,
        )

    async def handle_event(event: faust.EventT, request_id: str | None) -> None:
        """One event, from the handler to its ack."""
        with in_flight.track(), _answering(answered, request_id), metrics.track_in_flight(role):
            try:
                outgoing = await handler(source_of(event))
            except Rewound:
                app.consumer.release(event.message)  # not handled: read again (see Rewound)
                return
            if not await deliver(event, outgoing, request_id):
                return
        _ack(app, event)

    async def deliver(event: faust.EventT, outgoing: list[Outgoing], request_id: str | None) -> bool:
        """Hand an event's output to the producer; whether the event is to be acked now."""
        message = event.message
        # A rebalance since this event was fetched means the partition's owner (maybe
        # this worker again) reads it again from the committed offset and answers it.
        owned = answered is None or (
            message.generation_id == app.consumer_generation_id
            and not app.rebalancing
            and message.tp in app.consumer.assignment()
        )
        if not owned:
            # The call was made, so its cost still counts.
            outgoing = [out for out in outgoing if out.topic == costs_topic]
        # Every handler's output passes here, so metrics need no code in the handlers.
        observe(role, outgoing)
        if batch is not None:  # the cost role: sent and acked with its batch
            batch.add(outgoing)
            batched.append(event)
            batch_started.set()
            if len(batch) >= COST_BATCH_EVENTS:
                await publish_batch()
            return False
        # Tier roles write a call's cost before its result and wait for it: a worker
        # killed between the two would otherwise leave an answered request (skipped
        # when read again) whose call was never costed.
        first = [o for o in outgoing if o.topic == costs_topic] if answered is not None else []
        for out in first:
            await _send(outputs, out, wait=True)
        for out in outgoing:
            if out not in first:
                # Faust flushes the producer before it commits the source offset, so
                # an offset is committed only after everything it caused is in Kafka.
                await _send(outputs, out)
        if not owned:
            return False
        if answered is not None and request_id is not None:
            answered.mark_answered(request_id)
        return True

    async def process_batches(stream: faust.StreamT) -> None:
        # noack_take hands over events, not values, and acks none of them: each is acked
        # once its output is with the producer, so a batch cut short by a shutdown is
        # read again rather than committed (take_events acks in a finally block).
        assert batch_handler is not None
        size = settings.classifier.batch_size
        if settings.classifier.strategy == "llm":  # a batch's meta-routing calls run at once
            size = min(size, settings.worker.max_concurrent_tasks)
        async for events in stream.noack().noack_take(size, within=settings.classifier.batch_wait_seconds):
            with in_flight.track(), metrics.track_in_flight(role):
                produced = await batch_handler([source_of(e) for e in events])
                for event, outgoing in zip(events, produced, strict=True):
                    if await deliver(event, outgoing, None):
                        _ack(app, event)

    async def process(stream: faust.StreamT) -> None:
        # Acked by hand once its output is handed to the producer: Faust's own ack runs
        # in a finally block, so an agent cancelled mid-call (shutdown) would commit a
        # request nobody answered. Tier roles run `concurrency` of these actors.
        async for event in stream.noack().events():
            request_id = request_id_of(event.message.value) if answered is not None else None
            if answered is not None:
                await answered.ready.wait()  # the results written before this assignment
                if request_id is not None:
                    await answered.settled(request_id)  # a copy in progress here ends first
                if request_id is not None and answered.answered(request_id):
                    answered.skipped += 1
                    log.info("request %s is already answered: skipped", request_id)
                    _ack(app, event)
                    continue
            await handle_event(event, request_id)

    agent_loop = process_batches if batch_handler is not None else process
    app.agent(_faust_topic(app, source), name=role, concurrency=concurrency)(agent_loop)
    return app


COST_BATCH_EVENTS = 500
COST_BATCH_SECONDS = 0.02
EVENT_LOOP_ENV = "TIERSTREAM_EVENT_LOOP"
PRODUCER_BATCH_ENV = "TIERSTREAM_PRODUCER_MAX_BATCH_BYTES"
PRODUCER_LINGER_ENV = "TIERSTREAM_PRODUCER_LINGER_MS"


def producer_linger_seconds() -> float:
    """How long the workers' producers wait to fill a batch: 5 ms;
    ``TIERSTREAM_PRODUCER_LINGER_MS`` overrides it, for measurements (docs/benchmarks.md)."""
    return max(0.0, float(os.environ.get(PRODUCER_LINGER_ENV, 5))) / 1000


def producer_max_batch_bytes(settings: Settings) -> int:
    """Bytes per partition batch of the workers' producers: 256 KiB (aiokafka's default is
    16 KiB), at most ``kafka.max_message_bytes``. With 16 KiB a batch holds about ten
    results, and a send into a full batch waits for the broker to acknowledge the one in
    flight, holding the agent's concurrency slot (see docs/benchmarks.md).
    ``TIERSTREAM_PRODUCER_MAX_BATCH_BYTES`` overrides it, for measurements."""
    wanted = int(os.environ.get(PRODUCER_BATCH_ENV, 256 * 1024))
    return max(1024, min(wanted, settings.kafka.max_message_bytes))


def use_event_loop() -> str:
    """uvloop for the workers (less CPU per event than asyncio's loop, see
    docs/benchmarks.md); ``TIERSTREAM_EVENT_LOOP=asyncio`` keeps the standard loop."""
    name = os.environ.get(EVENT_LOOP_ENV, "uvloop").strip().lower() or "uvloop"
    if name not in ("uvloop", "asyncio"):
        raise ValueError(f"{EVENT_LOOP_ENV}={name!r}: expected uvloop or asyncio")
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:  # not installed on this platform (Windows): the standard loop
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return name


def changelog_topics(app: faust.App, settings: Settings) -> list[NewTopic]:
    """The app's table changelog topics, configured as Faust would declare them."""
    topics = []
    for table in app.tables.values():
        config = {"cleanup.policy": "compact"}
        expires = table.window.expires if table.window is not None else None
        if expires:  # windowed tables also delete expired windows
            config = {"cleanup.policy": "compact,delete", "retention.ms": str(int(expires * 1000))}
        topics.append(
            NewTopic(
                table.changelog_topic.get_topic_name(), table.partitions or settings.kafka.partitions.costs,
                settings.kafka.replication_factor, topic_configs=config,
            )
        )
    return topics


def run_role(settings: Settings, role: Role) -> None:
    """Run one role's Faust worker in this process until SIGTERM/SIGINT."""
    use_event_loop()  # before the app exists: Faust takes its loop from the policy
    app = build_role_app(settings, role)
    # Create the topics (the topology's and the tables' changelogs) before the consumer
    # starts: one created later may be missing from its metadata when partitions are
    # assigned (a changelog then fails every event with "0 partitions").
    asyncio.run(ensure_topics(settings, changelog_topics(app, settings)))
    worker = faust.Worker(
        app,
        loglevel=settings.worker.log_level,
        logging_config=logging_config(settings.worker.log_level, role),
        redirect_stdouts=False,
    )
    # Faust's terminal spinner sets the root logger to DEBUG (its handler counts every
    # record), so every library's logger.debug built a LogRecord: 4 % of the cost role's
    # samples. A headless worker has no use for it.
    worker.spinner = None
    # What is alive now (the SDKs' and Faust's modules and types: most of the heap) lives
    # as long as the process; frozen, the collector's full passes stop walking it.
    gc.collect()
    gc.freeze()
    worker.execute_from_commandline()
