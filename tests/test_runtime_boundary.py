"""The Faust boundary (streams.runtime): every Faust behaviour and member it relies on.

Each test names what tierstream takes from faust-streaming (the version pinned in
pyproject.toml); after an upgrade, what fails here is what to look at in
streams/runtime/. The consumers and apps are real ones, built as a worker builds them
(no broker is needed until they start).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import inspect
import weakref
from collections import defaultdict
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from streams.roles import build_role
from streams.roles.cost import COST_FETCH_WAIT_SECONDS
from streams.runtime.offsets import OffsetOrder
from streams.runtime.transport import FETCH_GATHER_BYTES, as_current_event
from streams.runtime.worker import FaustWorker, _Worker, build_role_app
from topologies.config import load_settings
from topologies.topics import ALL_ROLES, COST_ROLE

TPA = TP("requests.tier.standard", 0)
# faust.transport.consumer.Consumer._drain_messages of faust-streaming 0.15.3, which
# streams.runtime.transport._Consumer._drain_messages copies with its delivery rules.
DRAIN_MESSAGES_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"


class _Event:  # weakly referenceable, as Faust's events are
    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(partition=partition, topic="costs", timestamp=0.0)


def _app(role: str = "tier-standard") -> faust.App:
    return build_role_app(load_settings(environ={}), role, build_role)


def test_the_copied_fetch_loop_matches_faust() -> None:
    """The transport's fetch loop is Faust's with its offset rules replaced: a change
    upstream has to be carried over by hand."""
    source = inspect.getsource(faust_consumer.Consumer._drain_messages)
    assert hashlib.sha256(source.encode()).hexdigest() == DRAIN_MESSAGES_SHA256


def test_the_consumer_members_the_transport_reads_exist() -> None:
    consumer = _app().consumer
    for member in ("_committed_offset", "_read_offset", "_acked", "_acked_index", "_unacked_messages", "_n_acked",
                   "_commit_every", "suspend_flow", "diag", "callback", "_stopped"):
        assert hasattr(consumer, member), member
    for method in ("_new_offset", "perform_seek", "resume_flow", "seek", "on_partitions_revoked",
                   "_new_consumer_thread", "ack", "wait_empty", "getmany", "earliest_offsets", "highwater"):
        assert callable(getattr(faust_aiokafka.Consumer, method)), method
    assert callable(faust_aiokafka.AIOKafkaConsumerThread._ensure_consumer)
    assert callable(faust_aiokafka.AIOKafkaConsumerThread.call_thread)
    assert isinstance(_app().topics._tp_index, defaultdict), "the conductor's partition index"
    assert callable(faust.Stream.noack_take)
    assert callable(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer)


def test_the_stream_members_the_gathering_batches_use_exist() -> None:
    """``streams.runtime.worker.gathered`` buffers a stream's events as ``noack_take``
    does: a processor fed by the stream's passive drainer."""
    app = _app("classifier")
    stream = app.stream(app.channel())
    for method in ("add_processor", "_enable_passive", "wait", "wait_for_stopped"):
        assert callable(getattr(stream, method)), method
    assert isinstance(stream._processors, list) and hasattr(stream, "current_event")
    assert stream.enable_acks is True and stream.noack().enable_acks is False


async def test_every_role_produces_idempotently() -> None:
    """A produce request retried after a broker restart must not be written twice."""
    for role in ALL_ROLES:
        producer = _app(role).producer._new_producer()
        assert producer._txn_manager is not None, role  # aiokafka's idempotence state
        assert producer._txn_manager.transactional_id is None, role  # not transactions
        await producer.stop()


async def test_what_is_alive_once_a_worker_has_started_is_out_of_the_collectors_reach() -> None:
    """The agents' actors exist once Faust's startup has finished (``concurrency`` of them
    per agent: hundreds of thousands of objects at 4,000); a full collection that walks
    them holds the event loop for a fraction of a second."""
    app = _app()
    worker = _Worker(app, redirect_stdouts=False)
    worker.spinner = None
    actors = [object() for _ in range(3)]  # stands for what the app holds from its start
    assert worker.shortlabel == "Worker", "its log lines, '[^Worker]: Ready' among them, read as Faust's"
    try:
        assert any(o is actors for o in gc.get_objects())
        await worker.on_startup_finished()  # Faust calls it once the app has started
        assert gc.get_freeze_count() > 0
        assert not any(o is actors for o in gc.get_objects()), "still walked by every full collection"
    finally:
        gc.unfreeze()


async def test_the_cost_role_lets_the_broker_gather_its_fetches_and_the_roles_on_the_requests_path_do_not() -> None:
    """Faust creates its consumer with a fixed fetch wait and no minimum; the transport
    sets both on the consumer it creates, before aiokafka's fetcher reads them at start."""
    for role in ALL_ROLES:
        app = _app(role)
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        gathers = (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms)
        if role == COST_ROLE:
            assert gathers == (FETCH_GATHER_BYTES, round(COST_FETCH_WAIT_SECONDS * 1000))
        else:
            assert consumer._fetch_min_bytes == 1, role  # answered at the first record
        await consumer.stop()


def test_roles_wait_for_their_events_at_a_rebalance_unless_they_hold_calls() -> None:
    waits = {role: _app(role).conf.stream_wait_empty for role in ALL_ROLES}
    assert waits == {role: not role.startswith("tier-") for role in ALL_ROLES}


def test_a_table_write_goes_to_the_changelog_partition_of_the_current_event() -> None:
    """Faust takes a table write's changelog partition from the event its stream set;
    the cost role's batch writes name it with as_current_event."""
    worker = FaustWorker(load_settings(environ={}), COST_ROLE)
    table = worker.table("t", "test", partitions=3)
    sent: list[int] = []
    table.table.send_changelog = lambda partition, *args, **kwargs: (  # type: ignore[attr-defined]
        sent.append(partition) or SimpleNamespace(message=SimpleNamespace(partition=partition))
    )
    table.table._verify_source_topic_partitions = lambda topic: None  # type: ignore[attr-defined]
    event = _Event(2)
    worker._batch.last_of = {2: event}  # type: ignore[dict-item]
    table.set("wf", [1, 0, 0.0], partition=2)
    assert sent == [2] and table.get("wf") == [1, 0, 0.0]
    assert faust.current_event() is None, "the event context ends with the write"
    with pytest.raises(RuntimeError, match="outside the batch"):
        table.set("wf", [2, 1, 0.0], partition=1)
    with as_current_event(event):  # type: ignore[arg-type]
        assert faust.current_event() is event


def test_hourly_windows_are_read_relative_to_a_given_time() -> None:
    worker = FaustWorker(load_settings(environ={}), COST_ROLE)
    hourly = worker.hourly_table("h", "test", partitions=3, expires_hours=3)
    hourly.table.table.send_changelog = lambda partition, *a, **k: SimpleNamespace(  # type: ignore[attr-defined]
        message=SimpleNamespace(partition=partition)
    )
    hourly.table.table._verify_source_topic_partitions = lambda topic: None  # type: ignore[attr-defined]
    worker._batch.last_of = {0: _Event(0)}  # type: ignore[dict-item]
    hourly.set("k", [5, 1, 7230.0], at=7230.0, partition=0)
    assert hourly.get("k", 7200) == [5, 1, 7230.0], "the same hour (an hour's start, an int)"
    assert hourly.get("k", 10800.0) == [], "the next hour"


def _commit_offset(acked: list[int], committed: int | None) -> int | None:
    consumer = _app().consumer
    consumer._acked[TPA] = list(acked)
    consumer._acked_index[TPA] = set(acked)
    consumer._committed_offset[TPA] = committed
    return consumer._new_offset(TPA)


def test_commits_stop_at_the_first_offset_not_acked() -> None:
    assert _commit_offset([953, 954, 955, 957], committed=953) == 956
    # Faust commits 1100 here (it fills 953-1058 as a gap, or is off by one at 953)
    assert _commit_offset(list(range(954, 1100)), committed=953) is None
    assert _commit_offset(list(range(1059, 1100)), committed=953) is None


def test_acks_below_the_committed_offset_do_not_hold_a_commit_back() -> None:
    assert _commit_offset([3, 4, 10, 11], committed=10) == 12
    assert _commit_offset([3, 4], committed=10) is None


class _Seeking:
    """A consumer for the seek window's tests: Faust's own seek recorded in ``sought``,
    futures it schedules kept in ``pending``, ``seek_to_committed`` given by the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, assignment: set[TP]) -> None:
        self.sought: list[tuple[TP, int]] = []
        self.pending: list[Awaitable[None]] = []
        consumer = _app().consumer
        monkeypatch.setattr(consumer, "assignment", lambda: assignment)
        monkeypatch.setattr(consumer, "add_future", self.pending.append)
        self.consumer = consumer

        async def parent_seek(_: object, tp: TP, offset: int) -> None:
            self.sought.append((tp, offset))

        monkeypatch.setattr(faust_aiokafka.Consumer, "seek", parent_seek)


async def test_partitions_fetched_while_seeking_are_sought_again_once_positions_are_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records that arrive while the committed offsets are being fetched (held back by the
    fetch loop) are read again: their partitions are sought to the positions found."""
    tpb = TP("requests.tier.standard", 1)
    seeking = _Seeking(monkeypatch, {TPA, tpb})
    consumer, sought = seeking.consumer, seeking.sought

    async def seek_to_committed() -> dict[TP, int]:
        assert consumer._seeking, "records arriving now are held back"
        consumer._fetched_while_seeking.add(TPA)  # what the fetch loop does with one of TPA's
        return {TPA: 5, tpb: 7}

    monkeypatch.setattr(consumer, "seek_to_committed", seek_to_committed)
    await consumer.perform_seek()
    assert consumer.delivery.expected(TPA) == 5 and consumer.delivery.expected(tpb) == 7
    # Until the flow resumes (Faust empties the stream queues then), records are still
    # held back: in a role with tables the flow was resumed before, to restore them.
    assert consumer._seeking and sought == []
    consumer._fetched_while_seeking.add(tpb)
    consumer.resume_flow()
    for future in seeking.pending:
        await future
    assert sorted(sought) == [(TPA, 5), (tpb, 7)], "only the partitions that had records held back"
    assert not consumer._seeking


async def test_a_flow_resumed_during_the_seek_ends_the_window_once_positions_are_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seeking = _Seeking(monkeypatch, {TPA})
    consumer = seeking.consumer

    async def seek_to_committed() -> dict[TP, int]:
        consumer._fetched_while_seeking.add(TPA)
        consumer.resume_flow()  # before the positions are known: nothing to seek to yet
        assert consumer._seeking and seeking.pending == []
        return {TPA: 3}

    monkeypatch.setattr(consumer, "seek_to_committed", seek_to_committed)
    await consumer.perform_seek()
    assert seeking.sought == [(TPA, 3)] and not consumer._seeking


def _inline_consumer(flow_on: bool = True, suspended: bool = False, queues: tuple[int, ...] = (0,)) -> Any:
    from mode.utils.queues import FlowControlQueue

    app = _app()
    consumer = app.consumer
    if flow_on:
        app.flow_control.resume()
    else:
        app.flow_control.suspend()

    class Channel:
        def __init__(self, queue: FlowControlQueue[int]) -> None:
            self.queue = queue

    for filled in queues:
        queue: FlowControlQueue[int] = FlowControlQueue(maxsize=2, flow_control=app.flow_control)
        for i in range(filled):
            queue.put_nowait(i)
        app.topics._tp_index[TPA].add(Channel(queue))
    if suspended:
        consumer.suspend_flow.set()
    return consumer


async def test_a_record_is_handed_over_inline_only_when_that_cannot_block() -> None:
    """The fetch loop hands a record over without a task race only when the flow is on and
    every stream queue of its partition has room; otherwise it keeps Faust's race against
    a flow stop, so a full queue never holds up a rebalance."""
    assert _inline_consumer()._delivers_at_once(TPA)
    assert _inline_consumer(queues=(0, 1))._delivers_at_once(TPA)
    assert not _inline_consumer(queues=(0, 2))._delivers_at_once(TPA), "one full queue"
    assert not _inline_consumer(flow_on=False)._delivers_at_once(TPA), "flow suspended (rebalance)"
    assert not _inline_consumer(suspended=True)._delivers_at_once(TPA), "the consumer's flow stopped"
    unknown = _inline_consumer(queues=())
    assert not unknown._delivers_at_once(TPA), "no stream subscribed to the partition yet"
    assert TPA not in unknown.app.topics._tp_index, "asking does not subscribe anything"


async def test_a_message_given_back_does_not_hold_up_a_rebalance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust's own wait_empty (what a rebalance runs with stream_wait_empty) waits while
    a message its stream handed over is unacked and still held, as an agent holds the
    last event it was given; a message given back (read again after a seek) ends it."""

    class Message:  # weakly referenceable, as Faust's are
        acked = False
        refcount = 1

    rounds = 0
    two_rounds = asyncio.Event()

    async def commit(*args: object, **kwargs: object) -> bool:
        nonlocal rounds
        rounds += 1  # once per round of wait_empty's loop (a round waits up to 1 s for an ack)
        if rounds == 2:
            two_rounds.set()
        return False

    consumer = _app().consumer
    monkeypatch.setattr(consumer, "commit", commit)
    monkeypatch.setattr(consumer, "commit_and_end_transactions", commit)
    held = Message()
    consumer._unacked_messages = weakref.WeakSet([held])
    waiting = asyncio.create_task(consumer.wait_empty())
    await asyncio.wait_for(two_rounds.wait(), 10)
    assert not waiting.done(), "a full round passed with the held message unacked"
    consumer.release(held)
    await asyncio.wait_for(waiting, 10)
    assert not consumer._unacked_messages


def test_the_transport_and_the_cost_role_share_one_offset_state_machine() -> None:
    from streams.guardrails.view import GuardrailView
    from streams.roles.cost import CostOffsets

    assert isinstance(_app().consumer.delivery, OffsetOrder)
    assert isinstance(CostOffsets(GuardrailView(load_settings(environ={}))).order, OffsetOrder)


async def test_a_fetch_that_raced_a_seek_reads_its_drained_partitions_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka's fetched_records advances each partition's position as it drains it; a
    KeyError on a later partition (a seek from another thread cleared its buffer) throws
    the drained records away. The fetch loop seeks every tracked partition back to the
    record it expects next: otherwise, with no later record to show the hole, those
    records would never be read and the partition's lag would stay."""
    tpb = TP("requests.tier.standard", 1)
    seeking = _Seeking(monkeypatch, {TPA, tpb})
    consumer = seeking.consumer
    consumer.delivery.reset({TPA: 5, tpb: 7})
    monkeypatch.setattr(consumer.app.topics, "acks_enabled_for", lambda topic: True)
    stop = asyncio.Event()
    namespace: dict[str, Any] = {}
    exec(compile("def fetched_records(records):\n    return records[TPB]\n",
                 "/venv/site-packages/aiokafka/consumer/fetcher.py", "exec"), {"TPB": tpb}, namespace)

    async def getmany(timeout: float) -> Any:
        stop.set()  # one fetch, then the loop ends
        namespace["fetched_records"]({})
        yield  # an async generator, as Faust's is

    monkeypatch.setattr(consumer, "getmany", getmany)
    await consumer._drain_messages(SimpleNamespace(_stopped=stop))
    assert sorted(seeking.sought) == [(TPA, 5), (tpb, 7)]
    assert consumer.delivery.rewinding(TPA) and consumer.delivery.rewinding(tpb)
