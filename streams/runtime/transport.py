"""Faust's aiokafka transport with the delivery rules tierstream relies on.

Faust's consumer was written for at-most-once streams with table gaps in mind; these
overrides make every record of a tracked topic reach its agent before its offset can be
committed (docs/architecture.md, "Faust pitfalls the design answers").

* Idempotent producers, in every role: Faust enables idempotence only for exactly-once
  processing, and a produce request retried after a broker restart would otherwise be
  written twice.
* Seeking: a partition without a committed offset is rewound to its beginning whenever
  Faust seeks to the committed offsets (aiokafka's ``seek_to_committed`` leaves a
  partition whose committed offset is none or zero where it is, so records Faust dropped
  when its flow stopped mid-batch would be skipped for good).
* Acks: Faust's stream acks the events it skips (fetched in an earlier generation, or read
  while a rebalance suspends the flow); only messages an agent marks as handled are acked
  here, so a skipped one is read again after the seek.
* Delivery order: Faust fills offset gaps it sees as if they were processed and drops any
  record below its read offset; a record fetched before a rebalance but drained after the
  seek back would make the records between look like a gap (faust-streaming #221, #606).
  Here a record of an earlier generation never moves the position, a record ahead of it
  sends the consumer back (:class:`streams.runtime.offsets.OffsetOrder`), and a commit
  never moves past an offset that was not acked (``_Consumer._new_offset``). The tracked
  topics have no gaps of their own: not compacted, no transactional producers.
* The seek window: after an assignment Faust resumes the stream partitions and then seeks
  to the committed offsets, which take a moment to come back; records fetched meanwhile
  would be handed on before their positions are known. They are held back and their
  partitions sought again once the positions are known (``_Consumer.perform_seek``); the
  window lasts until Faust resumes the flow, which empties every stream queue.
* Giving back: with ``stream_wait_empty`` a rebalance waits until every message handed to
  an agent is acked; a message an agent leaves to be read again after a seek is taken off
  that list (``_Consumer.release``), or the rebalance would wait out its timeout.
* Gathering: a role may let the broker hold its fetches to gather a batch
  (``RoleSpec.fetch_wait_seconds``); Faust fixes the consumer's fetch wait and minimum.
* The hand-over: Faust hands each fetched record to its streams in a race against a flow
  stop (four tasks and two turns of the event loop per record); a record that cannot block
  (flow on, no full stream queue of its partition, read from the conductor's private
  ``_tp_index``) is handed over inline (``_Consumer._delivers_at_once``).

Every Faust member used here is pinned by tests/test_runtime_boundary.py.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust import streams as faust_streams
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT, Message
from faust.utils.functional import consecutive_numbers

from streams.runtime.offsets import OffsetOrder, Verdict

log = logging.getLogger(__name__)


async def seek_to_committed_or_beginning(
    consumer: AIOKafkaConsumer, skip_topics: Collection[str] = ()
) -> Mapping[TopicPartition, int | None]:
    """Seek every assigned partition to its committed offset, and those that have none
    (or zero, which aiokafka leaves alone) to their beginning, except ``skip_topics``
    (table changelogs, whose positions Faust's recovery manages itself). Returns where
    each partition is read from next (``skip_topics``: their committed offset or None)."""
    committed = await consumer.seek_to_committed()
    rewind = [tp for tp, offset in committed.items() if not offset and tp.topic not in skip_topics]
    if not rewind:
        return committed
    await consumer.seek_to_beginning(*rewind)
    return {**committed, **await consumer.beginning_offsets(rewind)}


FETCH_GATHER_BYTES = 64 * 1024  # what a gathering role's fetch waits for (RoleSpec.fetch_wait_seconds)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        wait = getattr(transport, "fetch_wait_seconds", 0.0)
        if wait:  # Faust passes neither; aiokafka hands both to its fetcher when it starts
            consumer._fetch_min_bytes = FETCH_GATHER_BYTES
            consumer._fetch_max_wait_ms = round(wait * 1000)
        return consumer

    async def seek_to_committed(self) -> Mapping[TopicPartition, int | None]:
        return await self.call_thread(self._seek_to_committed_or_beginning)

    async def _seek_to_committed_or_beginning(self) -> Mapping[TopicPartition, int | None]:
        return await seek_to_committed_or_beginning(
            self._ensure_consumer(), self.app.tables.changelog_topics
        )


class _Consumer(faust_aiokafka.Consumer):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._handled: weakref.WeakSet[Message] = weakref.WeakSet()
        self.delivery: OffsetOrder[TP] = OffsetOrder()
        self._fetches = 0
        # From a seek to the committed offsets until the flow resumes, records of the new
        # positions are held back and read again afterwards (the seek window).
        self._seeking = False
        self._fetched_while_seeking: set[TP] = set()
        self._seeks = 0  # numbers each seek window
        self._seek_positions: Mapping[TP, int | None] | None = None  # None: not yet known
        self._resumed_since_seek = False

    def mark_handled(self, message: Message) -> None:
        """The agent is done with ``message``: its ack may now count towards a commit."""
        self._handled.add(message)

    def release(self, message: Message) -> None:
        """The agent will not handle ``message`` now: it is read again after a seek. It no
        longer counts as in progress, so a rebalance does not wait for it: with
        ``stream_wait_empty`` Faust waits until every message its streams handed over is
        acked, and the agent still holds the last one it was given."""
        self._unacked_messages.discard(message)

    def ack(self, message: Message) -> bool:
        if message not in self._handled:
            return False  # skipped by the stream, never processed: keep it uncommitted
        self._handled.discard(message)
        return super().ack(message)

    def _new_offset(self, tp: TP) -> int | None:
        # Faust's version also commits through the gaps it recorded and, off by one,
        # past a missing first offset; offsets here are committed only when acked.
        acked = self._acked[tp]
        if not acked:
            return None
        acked.sort()
        committed = self._committed_offset[tp]
        if committed is not None:
            below = [o for o in acked if o < committed]
            if below:
                del acked[: len(below)]
                self._acked_index[tp].difference_update(below)
            if not acked or acked[0] > committed:
                return None  # the next offset to commit has not been acked yet
        batch = next(consecutive_numbers(acked))
        del acked[: len(batch)]
        self._acked_index[tp].difference_update(batch)
        return batch[-1] + 1

    async def perform_seek(self) -> None:
        # Records fetched from here until the flow resumes are held back by the fetch loop
        # and read again then (the seek window, see the module docstring).
        self._seeks += 1
        window = self._seeks
        self._seeking, self._seek_positions, self._resumed_since_seek = True, None, False
        self._fetched_while_seeking.clear()
        try:
            positions = await self.seek_to_committed()
        except BaseException:
            self._seeking = False
            raise
        self._read_offset.update({tp: o if o is not None and o >= 0 else None for tp, o in positions.items()})
        self._committed_offset.update({tp: o for tp, o in positions.items() if o is not None})
        self.delivery.reset(positions)
        self._seek_positions = positions
        if self._resumed_since_seek:
            await self._read_held_back_again(window)

    def resume_flow(self) -> None:
        # Faust resumes its flow control (which empties every stream queue) just before
        # this: records handed on between the seek and here would have been dropped.
        super().resume_flow()
        if self._seeking:
            self._resumed_since_seek = True
            if self._seek_positions is not None:
                self.add_future(self._read_held_back_again(self._seeks))

    async def _read_held_back_again(self, window: int) -> None:
        if window != self._seeks or not self._seeking or self._seek_positions is None:
            return  # a later seek window, or this one already ended
        positions = self._seek_positions
        try:
            while window == self._seeks and self._fetched_while_seeking:  # (more may come meanwhile)
                tp = self._fetched_while_seeking.pop()
                offset = positions.get(tp)
                if offset is not None and tp in self.assignment():
                    log.info("%s: records fetched during the seek: reading them again from %d", tp, offset)
                    await super().seek(tp, offset)
        finally:
            if window == self._seeks:
                self._seeking = False

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self.delivery.reset({partition: offset})

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.delivery.forget(revoked)
        await super().on_partitions_revoked(revoked)

    async def _drain_messages(self, fetcher: Any) -> None:
        # faust.transport.consumer.Consumer._drain_messages (faust-streaming 0.15), with
        # the read offset and gap handling replaced by OffsetOrder.
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                records = self.getmany(timeout=1.0)
                self._fetches += 1
                fetch = self._fetches
                await self.sleep(0)
                if not self.should_stop:
                    try:
                        async for tp, message in records:
                            since_yield += 1
                            if since_yield > 100:
                                await asyncio.sleep(0)
                                since_yield = 0
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            tracked = acks_enabled_for(message.topic)
                            if tracked:
                                if self._seeking:
                                    self._fetched_while_seeking.add(tp)
                                    continue  # read again once the seek has set the positions
                                if message.generation_id != self.app.consumer_generation_id:
                                    continue  # fetched before a rebalance, whose seek reads it again
                                if not await self._admit(tp, message.offset, fetch):
                                    continue
                            else:  # table changelogs: Faust's own rule
                                read = self._read_offset[tp]
                                if read is not None and message.offset < read:
                                    continue
                                self._read_offset[tp] = message.offset
                            if self._delivers_at_once(tp):
                                await callback(message)
                                continue
                            delivering = callback(message)
                            waited = await self.wait_first(delivering, self.suspend_flow.wait())
                            if (
                                tracked and delivering not in waited.done
                                and message.generation_id == self.app.consumer_generation_id
                            ):
                                self.delivery.reset({tp: message.offset})  # not delivered: read again
                    except KeyError as exc:
                        if not raised_in_aiokafka_fetcher(exc):
                            raise
                        # aiokafka's fetched_records can find a partition's buffer gone when
                        # an assignment or a seek clears it mid-iteration (aio-libs/aiokafka,
                        # robinhood/aiokafka#19), after moving the positions of the partitions
                        # it drained: those are sought back to what their streams expect next.
                        log.warning("the fetch raced with a seek or rebalance (%r): fetching again", exc)
                        await self._read_again_where_delivery_stopped(fetch)
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _read_again_where_delivery_stopped(self, fetch: int) -> None:
        """After a fetch that raised: aiokafka advanced its position past each partition it
        had drained before the error, and none of those records reached the streams. If no
        later record of such a partition arrives, no hole is ever seen and its lag stays.
        So every tracked partition is read again from the record it expects next."""
        if self._seeking:
            return  # the seek under way sets every position
        acks_enabled_for = self.app.topics.acks_enabled_for
        for tp in self.assignment():
            expected = self.delivery.expected(tp)
            if expected is None or not acks_enabled_for(tp.topic) or self.delivery.rewinding(tp):
                continue
            self.delivery.rewind(tp, expected, fetch)
            await super().seek(tp, expected)

    def _delivers_at_once(self, tp: TP) -> bool:
        """Whether handing a record of ``tp`` to its streams cannot block: the flow is on
        and no stream queue of the partition is full. Such a record is handed over inline;
        racing the hand-over against a flow stop (Faust's way, kept for the rest) costs
        four tasks and at least two turns of the event loop per record, and with a few
        hundred model calls in flight a turn takes milliseconds: fetched records waited
        up to a second in a busy tier worker (docs/benchmarks.md)."""
        if self.suspend_flow.is_set() or not self.app.flow_control.is_active():
            return False
        channels = self.app.topics._tp_index.get(tp)
        return bool(channels) and not any(channel.queue.full() for channel in channels)

    async def _admit(self, tp: TP, offset: int, fetch: int) -> bool:
        expected = self.delivery.expected(tp)
        verdict = self.delivery.admit(tp, offset, fetch)
        if verdict is Verdict.HOLE and expected is not None:
            log.warning("%s: records %d-%d were not delivered: reading them again", tp, expected, offset - 1)
            self.delivery.rewind(tp, expected, fetch)
            await super().seek(tp, expected)
            return False
        if verdict is Verdict.GONE:
            log.warning("%s: records %s-%d no longer exist (retention): continuing", tp, expected, offset - 1)
        return verdict in (Verdict.DELIVER, Verdict.GONE)

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Producer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, object]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class Transport(faust_aiokafka.Transport):
    Consumer = _Consumer
    Producer = _Producer
    fetch_wait_seconds = 0.0  # the role's, set by the worker before the consumer is created


@contextmanager
def as_current_event(event: EventT) -> Iterator[None]:
    """Run as if the agent were handling ``event``. Faust takes a table write's changelog
    partition from the task-local event its stream set; writes made for a batch of events,
    outside the handling of any one of them, name theirs this way.
    ``faust.streams._current_event`` is the variable Faust sets per event."""
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


def raised_in_aiokafka_fetcher(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside aiokafka's fetcher, not by the loop's own code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("aiokafka/consumer/fetcher.py")
