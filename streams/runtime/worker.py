"""Runs a role as a Faust worker: one app per role, one agent loop for every role.

A role's app id is ``<app_id>-<role>``, so every role is a consumer group of its own: any
mix of processes, a monolith beside a scaled-out tier, consumes each topic exactly once
per group, and Faust's partition assignor only ever sees members with identical
subscriptions. The role declares what it consumes, produces and needs
(:class:`streams.runtime.types.RoleSpec`); everything here is the same for every role:
acks only once an event's output is with the producer, the answer-once rules, metrics,
health, graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
import mode
from aiokafka.admin import NewTopic
from faust.types import TP

from streams.admin import ensure_topics
from streams.dedupe import request_id_of
from streams.envelope import Outgoing, Source
from streams.logs import logging_config
from streams.observability import Metrics, OutgoingObserver, default_metrics, worker_services
from streams.runtime.credentials import faust_settings
from streams.runtime.transport import Transport, as_current_event
from streams.runtime.types import (
    HourlyTable,
    KeyedTable,
    Lifecycle,
    Partition,
    RoleSpec,
    Send,
)
from streams.shutdown import InFlight
from streams.throttle_feed import ThrottleFeed, process_origin
from topologies.config import Settings
from topologies.topics import Role, TopicSpec, Topology, topology_of

log = logging.getLogger(__name__)
RoleBuilder = Callable[["FaustWorker"], RoleSpec]

EVENT_LOOP_ENV = "TIERSTREAM_EVENT_LOOP"
PRODUCER_BATCH_ENV = "TIERSTREAM_PRODUCER_MAX_BATCH_BYTES"
PRODUCER_LINGER_ENV = "TIERSTREAM_PRODUCER_LINGER_MS"


class _Service(mode.Service):
    """A :class:`Lifecycle` (or a timer) run with the worker."""

    def __init__(
        self, lifecycle: Lifecycle | None = None,
        timers: Iterable[tuple[float, Callable[[], Awaitable[None]]]] = (), **kwargs: Any,
    ) -> None:
        self.lifecycle = lifecycle
        self.timers = list(timers)
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        if self.lifecycle is not None:
            await self.lifecycle.start()
        for interval, tick in self.timers:
            self.add_future(self._every(interval, tick))

    async def _every(self, interval: float, tick: Callable[[], Awaitable[None]]) -> None:
        while not self.should_stop:
            await self.sleep(interval)
            if not self.should_stop:
                await tick()

    async def on_stop(self) -> None:
        if self.lifecycle is not None:
            await self.lifecycle.stop()


class FaustPartitions:
    """:class:`streams.runtime.types.Partitions` of a Faust app's consumer."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    def generation(self) -> int:
        return self.app.consumer_generation_id

    def assigned(self) -> set[Partition]:
        return {(tp.topic, tp.partition) for tp in self.app.consumer.assignment()}

    def owns(self, topic: str, partition: int) -> bool:
        return not self.app.rebalancing and TP(topic, partition) in self.app.consumer.assignment()

    def committed(self, topic: str, partition: int) -> int | None:
        # Faust's record of the group's committed offsets, kept without a request.
        return self.app.consumer._committed_offset.get(TP(topic, partition))

    def highwater(self, topic: str, partition: int) -> int | None:
        return self.app.consumer.highwater(TP(topic, partition))

    async def log_start(self, topic: str, partition: int) -> int:
        tp = TP(topic, partition)
        return (await self.app.consumer.earliest_offsets(tp))[tp]

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        await self.app.consumer.seek(TP(topic, partition), offset)


class _BatchEvents:
    """The events of the batch being handled, last one per partition: a table write
    names its changelog partition through the event Faust takes to be current."""

    def __init__(self) -> None:
        self.last_of: dict[int, faust.EventT] = {}

    @contextlib.contextmanager
    def as_partition(self, partition: int) -> Iterator[None]:
        event = self.last_of.get(partition)
        if event is None:
            raise RuntimeError(f"a table write for partition {partition}, outside the batch of its events")
        with as_current_event(event):
            yield


class _HourlyTable:
    def __init__(self, table: Any, events: _BatchEvents) -> None:
        self.table = table  # tumbling windows: read and written relative to a timestamp
        self.events = events

    def get(self, key: str, at: float) -> list[float | int]:
        return self.table.relative_to(float(at))[key].value()  # Faust takes a float, not an int

    def set(self, key: str, value: list[float | int], at: float, partition: int) -> None:
        with self.events.as_partition(partition):
            self.table.relative_to(float(at))[key] = value


class _KeyedTable:
    def __init__(self, table: faust.Table, events: _BatchEvents) -> None:
        self.table = table
        self.events = events

    def get(self, key: str) -> list[float | int]:
        return self.table.get(key) or []

    def set(self, key: str, value: list[float | int], partition: int) -> None:
        with self.events.as_partition(partition):
            self.table[key] = value

    def delete(self, key: str, partition: int) -> None:
        if key in self.table:
            with self.events.as_partition(partition):
                del self.table[key]


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


def _new_app(settings: Settings, role: Role, datadir: Path | None) -> faust.App:
    group = topology_of(settings).consumer_group(settings.app_id, role)
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
        # An agent that raises must not look healthy while doing nothing (a cost role
        # restarted into the same error every few seconds disables the guardrails): the
        # worker exits and its process manager restarts it. Handlers catch what they
        # expect, so this is for bugs.
        agent_supervisor=mode.CrashingSupervisor,
        datadir=str(datadir),
        logging_config=logging_config(settings.worker.log_level, role),
    )
    # Before anything reaches app.transport (app.topic does): see streams.runtime.transport.
    app.transport = Transport(app.conf.broker_consumer, app)
    return app


class FaustWorker:
    """The :class:`streams.runtime.types.Worker` a role is built from, and the agent loop
    that runs it."""

    def __init__(self, settings: Settings, role: Role, datadir: Path | None = None) -> None:
        self.settings = settings
        self.topology: Topology = topology_of(settings)
        self.role = role
        self.app = _new_app(settings, role, datadir)
        self.partitions = FaustPartitions(self.app)
        self._batch = _BatchEvents()

    # ------------------------------------------------------------------ what roles ask
    def hourly_table(self, name: str, help: str, partitions: int, expires_hours: float) -> HourlyTable:
        table = self.app.Table(name, default=list, partitions=partitions, help=help).tumbling(
            timedelta(hours=1), expires=timedelta(hours=expires_hours)
        )
        return _HourlyTable(table, self._batch)

    def table(self, name: str, help: str, partitions: int) -> KeyedTable:
        return _KeyedTable(self.app.Table(name, default=list, partitions=partitions, help=help), self._batch)

    def sender(self, spec: TopicSpec) -> Send:
        app, name = self.app, spec.name

        async def send(key: bytes | None, value: bytes) -> tuple[int, int]:
            metadata = await (await _produce(app, name, key, value))
            return metadata.partition, metadata.offset

        return send

    # ------------------------------------------------------------------ running a role
    def run(self, spec: RoleSpec) -> faust.App:
        """Declare the role's agent, services and hooks on the app; return the app."""
        app, settings, role = self.app, self.settings, self.role
        app.conf.stream_wait_empty = spec.wait_empty
        app.transport.fetch_wait_seconds = spec.fetch_wait_seconds
        metrics = default_metrics()
        self._needs(spec, metrics)
        for service in worker_services(self.partitions, settings, metrics, spec.providers, spec.view):
            app.service(service)  # /health /ready /metrics, and what they read
        loop = _AgentLoop(app, spec, role, metrics, self.topology, self._batch)

        @app.on_before_shutdown.connect
        async def drain_in_flight(sender: faust.App, **kwargs: object) -> None:
            await loop.in_flight.drain(settings.worker.shutdown_grace_seconds)

        agent = loop.process_batches if spec.handle_batch is not None else loop.process
        app.agent(_faust_topic(app, spec.consumes), name=role, concurrency=spec.concurrency)(agent)
        return app

    def _needs(self, spec: RoleSpec, metrics: Metrics) -> None:
        app = self.app
        services: list[Lifecycle] = list(spec.lifecycles)
        timers = list(spec.timers)
        on_assigned = list(spec.on_assigned)
        on_revoked = []
        if spec.view is not None:
            services.append(spec.view)
        if spec.answered is not None:
            services.append(spec.answered)
            on_assigned.append(spec.answered.assigned)
            on_revoked.append(spec.answered.on_revoked)
        if spec.providers is not None:
            providers = spec.providers
            services.append(providers)

            async def scale_down_idle_clients() -> None:
                for pool in providers.pools.values():
                    await pool.scale_down_idle()

            # Every quarter of the shortest idle timeout (at most every minute), so a
            # configured timeout holds to within a quarter of itself.
            timers.append((providers.idle_check_seconds, scale_down_idle_clients))
            # A 429 here pauses every replica; every replica's 429 pauses this one.
            publish = self.sender(self.topology.throttles)
            services.append(ThrottleFeed(self.settings, providers.throttles, publish, process_origin(self.role)))
            metrics.rate_limits.watch(providers, spec.limiter)
        for lifecycle in services:
            app.service(_Service(lifecycle))
        if timers:
            app.service(_Service(timers=timers))

        @app.on_partitions_assigned.connect
        async def assigned(_app: faust.App, assigned: set[TP], **_: object) -> None:
            partitions = [(tp.topic, tp.partition) for tp in assigned]
            for callback in on_assigned:
                callback(partitions)

        @app.on_partitions_revoked.connect
        async def revoked(_app: faust.App, revoked: set[TP], **_: object) -> None:
            for callback in on_revoked:
                callback()


def _ack(app: faust.App, event: faust.EventT) -> None:
    app.consumer.mark_handled(event.message)  # see streams.runtime.transport: acks
    event.ack()


def _source_of(event: faust.EventT) -> Source:
    message = event.message
    return Source(message.topic, message.partition, message.offset, message.key, message.value, message.timestamp)


async def _produce(app: faust.App, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
    """Hand a record to the app's producer; the future resolves once the broker has it.

    Straight to the producer: ``Topic.send`` wraps each record in a FutureMessage and runs
    Faust's send sensors, which nothing here reads, for about half of the record's send CPU.
    """
    producer = await app.maybe_start_producer()  # as Topic.send does: started once
    return await producer.send(topic, key, value, None, None, None)  # type: ignore[return-value]


def _delivery_callback(on_delivered: Callable[[int, int], None]) -> Callable[[asyncio.Future], None]:  # type: ignore[type-arg]
    def callback(future: asyncio.Future) -> None:  # type: ignore[type-arg]
        if not future.cancelled() and future.exception() is None:
            metadata = future.result()
            on_delivered(metadata.partition, metadata.offset)

    return callback


async def gathered(stream: faust.StreamT, max_: int) -> AsyncIterator[list[faust.EventT]]:
    """Batches of a stream's events, in order, as they come: a batch is taken as soon as
    one event is there, with every event handed to the stream meanwhile (at most ``max_``),
    and the events that arrive while it is handled make the next batch. Alone, an event
    waits for nothing; in a burst, batches grow to ``max_``. Acks nothing (as
    ``noack_take``, whose stream plumbing this follows; ``noack_take`` instead closes a
    batch on a timer, which both delays an event that arrives alone and wakes an idle
    role at that period)."""
    buffer: list[faust.EventT] = []
    ready = asyncio.Event()  # the buffer holds an event
    room = asyncio.Event()  # set when a batch was taken

    async def add_to_buffer(value: Any) -> Any:
        event = stream.current_event
        if event is None:
            raise RuntimeError("a stream event without its current_event")
        while len(buffer) >= max_:  # a full buffer holds the stream until it is taken
            room.clear()
            await stream.wait(room)
            if stream.should_stop:
                return value
        buffer.append(event)
        ready.set()
        return value

    acks, stream.enable_acks = stream.enable_acks, False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(aiter(stream.channel))  # type: ignore[attr-defined]
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(ready)
            await asyncio.sleep(0)  # events already in the stream's hands join the batch
            if not buffer:
                continue
            batch = buffer[:]
            buffer.clear()
            ready.clear()
            room.set()
            yield batch
    finally:
        stream.enable_acks = acks
        stream._processors.remove(add_to_buffer)  # type: ignore[attr-defined]


class _AgentLoop:
    """Every role's agent: hands events to the role's handler and its output to the
    producer, and acks an event only then (Faust's own ack runs in a ``finally`` block,
    so an agent cancelled mid-call, at shutdown, would commit a request nobody
    answered). Faust flushes the producer before it commits, so an offset is committed
    only after everything its event caused is in Kafka."""

    def __init__(
        self, app: faust.App, spec: RoleSpec, role: Role, metrics: Metrics, topology: Topology, batch: _BatchEvents,
    ) -> None:
        self.app = app
        self.spec = spec
        self.role = role
        self.metrics = metrics
        self.batch = batch
        self.answered = spec.answered
        self.costs_topic = spec.costs_topic
        self.observe = OutgoingObserver(topology, metrics).observe_outgoing
        self.produces = frozenset(s.name for s in spec.produces)
        self.in_flight = InFlight()

    async def _send(self, out: Outgoing) -> asyncio.Future[Any]:
        if out.topic not in self.produces:
            raise ValueError(f"role {self.role} does not produce to {out.topic!r}")
        future = await _produce(self.app, out.topic, out.key, out.value)
        if out.on_delivered is not None:
            future.add_done_callback(_delivery_callback(out.on_delivered))
        return future

    def _owned(self, event: faust.EventT) -> bool:
        # A rebalance since this event was fetched means the partition's owner (maybe this
        # worker again) reads it again from the committed offset and answers it.
        message, app = event.message, self.app
        return (
            message.generation_id == app.consumer_generation_id
            and not app.rebalancing
            and message.tp in app.consumer.assignment()
        )

    async def deliver(self, event: faust.EventT, outgoing: list[Outgoing]) -> bool:
        """Hand an event's output to the producer; whether the event is to be acked."""
        owned = self.answered is None or self._owned(event)
        costs = self.costs_topic
        if not owned:
            outgoing = [out for out in outgoing if out.topic == costs]  # the call was made: it counts
        self.observe(self.role, outgoing)  # every output passes here: handlers carry no metrics code
        first = [out for out in outgoing if out.topic == costs] if costs is not None else []
        # A worker killed between a result and its cost would leave an answered request
        # (skipped when read again) whose call was never costed: the costs go first, and
        # are acknowledged (together, in one linger) before the rest is sent.
        for future in [await self._send(out) for out in first]:
            await future
        for out in outgoing:
            if out not in first:
                await self._send(out)
        return owned

    async def process(self, stream: faust.StreamT) -> None:
        """One event at a time, ``spec.concurrency`` of these actors at once."""
        app, answered, handle = self.app, self.answered, self.spec.handle
        assert handle is not None
        async for event in stream.noack().events():
            request_id = request_id_of(event.message.value) if answered is not None else None
            if answered is not None:
                await answered.ready.wait()  # the results written before this assignment
                if request_id is not None:
                    await answered.settled(request_id)  # a copy in progress here ends first
                    if answered.answered(request_id):
                        answered.skipped += 1
                        log.info("request %s is already answered: skipped", request_id)
                        _ack(app, event)
                        continue
            answering = answered.answering(request_id) if answered and request_id else contextlib.nullcontext()
            with self.in_flight.track(), answering, self.metrics.track_in_flight(self.role):
                outgoing = await handle(_source_of(event))
                if outgoing is None:
                    app.consumer.release(event.message)  # not handled: read again
                    continue
                if not await self.deliver(event, outgoing):
                    continue
                if answered is not None and request_id is not None:
                    answered.mark_answered(request_id)
            _ack(app, event)

    async def process_batches(self, stream: faust.StreamT) -> None:
        """Batches of up to ``spec.batch_size`` events, in offset order. ``noack_take``
        hands over events and acks none of them (``take_events`` acks in a ``finally``, so
        a batch cut short by a shutdown would be committed unanswered); a batch's events
        are acked together once all of its output is with the producer."""
        spec, app = self.spec, self.app
        assert spec.handle_batch is not None
        stream = stream.noack()
        batches = (
            stream.noack_take(spec.batch_size, within=spec.batch_wait_seconds) if spec.batch_wait_seconds
            else gathered(stream, spec.batch_size)
        )
        async for events in batches:
            with self.in_flight.track(), self.metrics.track_in_flight(self.role):
                self.batch.last_of = {event.message.partition: event for event in events}
                try:
                    produced = await spec.handle_batch([_source_of(event) for event in events])
                finally:
                    self.batch.last_of = {}
                done = []
                for event, outgoing in zip(events, produced, strict=True):
                    if outgoing is None:
                        app.consumer.release(event.message)  # not handled: read again
                    elif await self.deliver(event, outgoing):
                        done.append(event)
                for event in done:
                    _ack(app, event)


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


def build_role_app(settings: Settings, role: Role, build: RoleBuilder, datadir: Path | None = None) -> faust.App:
    """The Faust app of one role, built by ``build`` (see :mod:`streams.roles`)."""
    worker = FaustWorker(settings, role, datadir)
    return worker.run(build(worker))


def run_app(settings: Settings, role: Role, build: RoleBuilder) -> None:
    """Run one role's Faust worker in this process until SIGTERM/SIGINT."""
    use_event_loop()  # before the app exists: Faust takes its loop from the policy
    app = build_role_app(settings, role, build)
    # Create the topics (the topology's and the tables' changelogs) before the consumer
    # starts: one created later may be missing from its metadata when partitions are
    # assigned (a changelog then fails every event with "0 partitions").
    asyncio.run(ensure_topics(settings, changelog_topics(app, settings)))
    worker = _Worker(
        app,
        loglevel=settings.worker.log_level,
        logging_config=logging_config(settings.worker.log_level, role),
        redirect_stdouts=False,
    )
    # Faust's terminal spinner sets the root logger to DEBUG (its handler counts every
    # record), so every library's logger.debug built a LogRecord. A headless worker has no
    # use for it.
    worker.spinner = None
    freeze_the_heap()  # the SDKs' and Faust's modules and types: most of the heap
    tune_the_collector(settings)
    worker.execute_from_commandline()


def freeze_the_heap() -> None:
    """Move every live object out of the collector's reach: what is alive at start lives
    as long as the process, and a full pass walks every tracked object while the event
    loop waits (an agent's 4,000 actors, at ``max_concurrent_tasks=4000``, are about
    600,000 objects: 0.2-0.7 s per pass on the benchmark machine)."""
    gc.collect()
    gc.freeze()


def tune_the_collector(settings: Settings) -> None:
    """The cyclic collector's thresholds (``worker.gc_thresholds``): with CPython's, a
    young collection every 700 net allocations moves the objects of every call in flight
    into older generations, whose passes then walk them again and again."""
    gc.set_threshold(*settings.worker.gc_thresholds)


class _Worker(faust.Worker):
    @property
    def shortlabel(self) -> str:
        return "Worker"  # Faust's "[^Worker]: Ready" line, which people and tests look for

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        # The agents' actors, the clients and the services exist once the app has
        # started; the objects a worker creates from here on are its events and calls.
        freeze_the_heap()
