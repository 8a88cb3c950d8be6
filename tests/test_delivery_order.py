"""The consumer's delivery rules (streams.faust_transport): no record is skipped and no
commit moves past a record that was not acked, whatever order Faust's fetch loop sees.

The kill loop (tests/test_faults_e2e.py) exercises them against a real broker; these
pin down each case, including the one that lost 96 requests of 20,000: a record fetched
before a rebalance and drained after Faust had seeked back to the committed offset.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable
from types import SimpleNamespace

import pytest
from faust.types import TP
from hypothesis import given
from hypothesis import strategies as st

from streams.faust_transport import DeliveryOrder, Verdict, _Consumer

TPA = TP("requests.tier.standard", 0)


def test_records_in_order_are_delivered() -> None:
    order = DeliveryOrder()
    order.reset({TPA: 953})
    assert [order.admit(TPA, o, fetch=1) for o in (953, 954, 955)] == [Verdict.DELIVER] * 3
    assert order.expected(TPA) == 956


def test_a_record_ahead_of_the_position_is_a_hole_and_its_fetch_is_dropped() -> None:
    order = DeliveryOrder()
    order.reset({TPA: 953})  # Faust's seek to the committed offset, after a rebalance
    # drained after the seek, fetched before it: the 20,000-request kill loop's case
    assert order.admit(TPA, 1059, fetch=7) is Verdict.HOLE
    assert order.admit(TPA, 1060, fetch=7) is Verdict.REWINDING
    assert order.expected(TPA) == 953, "the position stays at the first missing record"
    # the fetch after the seek back starts at the hole
    assert order.admit(TPA, 953, fetch=8) is Verdict.DELIVER
    assert order.admit(TPA, 954, fetch=8) is Verdict.DELIVER


def test_records_gone_for_good_are_passed_over_once_the_seek_lands_above_them() -> None:
    order = DeliveryOrder()
    order.reset({TPA: 10})
    assert order.admit(TPA, 30, fetch=1) is Verdict.HOLE
    # retention deleted 10-24: the seek back lands on the log start, not on 10
    assert order.admit(TPA, 25, fetch=2) is Verdict.GONE
    assert order.admit(TPA, 26, fetch=2) is Verdict.DELIVER


def test_records_below_the_position_are_replays() -> None:
    order = DeliveryOrder()
    order.reset({TPA: 10})
    assert order.admit(TPA, 10, fetch=1) is Verdict.DELIVER
    assert order.admit(TPA, 10, fetch=2) is Verdict.REPLAY
    assert order.admit(TPA, 4, fetch=2) is Verdict.REPLAY


def test_a_partition_without_a_known_position_takes_its_first_record() -> None:
    order = DeliveryOrder()
    assert order.admit(TPA, 42, fetch=1) is Verdict.DELIVER
    assert order.admit(TPA, 44, fetch=1) is Verdict.HOLE


def test_forgotten_partitions_start_over() -> None:
    order = DeliveryOrder()
    order.reset({TPA: 5})
    order.admit(TPA, 9, fetch=1)
    order.forget([TPA])
    assert order.expected(TPA) is None
    assert order.admit(TPA, 9, fetch=2) is Verdict.DELIVER


@given(
    start=st.integers(0, 50),
    fetches=st.lists(st.lists(st.integers(0, 120), max_size=12), max_size=30),
)
def test_whatever_is_fetched_nothing_is_skipped(start: int, fetches: list[list[int]]) -> None:
    """Fetches of arbitrary offsets (stale, replayed, ahead of the position): a record is
    delivered only if it is the next one, or, right after a seek back, if the ones
    before it are gone (the first record of the next fetch)."""
    order = DeliveryOrder()
    order.reset({TPA: start})
    expected, hole_in = start, None
    for fetch, offsets in enumerate(fetches):
        for offset in sorted(offsets):  # a fetch returns a partition's records in order
            verdict = order.admit(TPA, offset, fetch)
            if verdict is Verdict.DELIVER:
                assert offset == expected
            elif verdict is Verdict.GONE:
                assert hole_in is not None and hole_in < fetch and offset > expected
            elif verdict is Verdict.HOLE:
                assert offset > expected
                hole_in = fetch
            else:
                assert offset < expected or hole_in == fetch
            if verdict in (Verdict.DELIVER, Verdict.GONE):
                expected, hole_in = offset + 1, None
            assert order.expected(TPA) == expected


def _commit_offset(acked: list[int], committed: int | None) -> int | None:
    consumer = SimpleNamespace(
        _acked=defaultdict(list, {TPA: list(acked)}),
        _acked_index=defaultdict(set, {TPA: set(acked)}),
        _committed_offset=defaultdict(lambda: None, {TPA: committed}),
    )
    return _Consumer._new_offset(consumer, TPA)  # type: ignore[arg-type]


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
        from faust.transport.drivers import aiokafka as faust_aiokafka

        self.sought: list[tuple[TP, int]] = []
        self.pending: list[Awaitable[None]] = []
        consumer = object.__new__(_Consumer)
        consumer.delivery = DeliveryOrder()
        consumer._seeking, consumer._fetched_while_seeking, consumer._seeks = False, set(), 0
        consumer._read_offset, consumer._committed_offset = defaultdict(lambda: None), defaultdict(lambda: None)
        consumer.assignment = lambda: assignment  # type: ignore[method-assign]
        consumer.flow_active, consumer.can_resume_flow, consumer.suspend_flow = False, asyncio.Event(), asyncio.Event()
        consumer.add_future = self.pending.append  # type: ignore[method-assign,assignment]
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

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
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

    consumer.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    await consumer.perform_seek()
    assert seeking.sought == [(TPA, 3)] and not consumer._seeking


def _inline_consumer(flow_on: bool = True, suspended: bool = False, queues: tuple[int, ...] = (0,)) -> _Consumer:
    import asyncio

    from mode.utils.queues import FlowControlEvent, FlowControlQueue

    flow = FlowControlEvent(initially_suspended=not flow_on)
    class Channel:
        def __init__(self, queue: FlowControlQueue[int]) -> None:
            self.queue = queue

    channels = set()
    for filled in queues:
        queue: FlowControlQueue[int] = FlowControlQueue(maxsize=2, flow_control=flow)
        for i in range(filled):
            queue.put_nowait(i)
        channels.add(Channel(queue))
    suspend_flow = asyncio.Event()
    if suspended:
        suspend_flow.set()
    consumer = object.__new__(_Consumer)
    consumer.suspend_flow = suspend_flow  # type: ignore[assignment]
    consumer.app = SimpleNamespace(  # type: ignore[assignment]
        flow_control=flow, topics=SimpleNamespace(_tp_index=defaultdict(set, {TPA: channels} if queues else {}))
    )
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


async def test_a_message_given_back_does_not_hold_up_a_rebalance() -> None:
    """Faust's own wait_empty (what a rebalance runs with stream_wait_empty) waits while
    a message its stream handed over is unacked and still held, as an agent holds the
    last event it was given; a message given back (read again after a seek) ends it."""
    import weakref

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

    consumer = object.__new__(_Consumer)
    consumer.diag = SimpleNamespace(set_flag=lambda flag: None, unset_flag=lambda flag: None)  # type: ignore[assignment]
    consumer.log = SimpleNamespace(dev=print, info=print, warning=print)  # type: ignore[assignment]
    consumer._stopped, consumer._crashed = asyncio.Event(), asyncio.Event()  # type: ignore[assignment]
    consumer.loop = asyncio.get_running_loop()  # type: ignore[assignment]
    consumer._waiting_for_ack = None
    consumer.commit = consumer.commit_and_end_transactions = commit  # type: ignore[method-assign]
    consumer._unacked_messages = weakref.WeakSet()  # type: ignore[assignment]
    held = Message()
    consumer._unacked_messages.add(held)
    waiting = asyncio.create_task(consumer.wait_empty())
    await asyncio.wait_for(two_rounds.wait(), 10)
    assert not waiting.done(), "a full round passed with the held message unacked"
    consumer.release(held)  # type: ignore[arg-type]
    await asyncio.wait_for(waiting, 10)
    assert not consumer._unacked_messages
