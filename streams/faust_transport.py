"""Faust's aiokafka transport, with three fixes.

Idempotent producers. Faust turns idempotence on only in exactly-once mode; without it a
produce request that the broker wrote but could not acknowledge (a broker restart) is
retried and written twice: the broker-restart test saw 8 results and 12 cost events
doubled out of 1,500 requests. Every role's producer is idempotent.

Seeking. A partition without a committed offset is rewound to its beginning whenever
Faust seeks to the committed offsets.

Acks. Faust's stream acks the events it skips (fetched in an earlier generation, or read
while a rebalance suspends the flow), so the next commit can move past records nobody
processed: a 5,000-request kill loop came out 3.4 % short in the cost totals with the cost
role's lag at 0. Only messages the agent marks as handled are acked here; a skipped one
is read again after the seek.

Faust drops records it has already fetched when its flow stops mid-batch (a rebalance
starting) and relies on "seek to committed" to read them again. aiokafka's
``seek_to_committed`` only moves partitions whose committed offset is above zero, so on
a partition that has none (a new consumer group, or one whose first commit has not
happened yet) the dropped records are skipped for good, and the next commit moves past
them. Found by the SIGKILL test of the cost role: a restarted cost worker began every
partition about twenty events in, and the spend totals came out 17 % short.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import Message


async def seek_to_committed_or_beginning(
    consumer: AIOKafkaConsumer, skip_topics: Collection[str] = ()
) -> Mapping[TopicPartition, int | None]:
    """Seek every assigned partition to its committed offset, and those that have none
    (or zero, which aiokafka leaves alone) to their beginning, except ``skip_topics``
    (table changelogs, whose positions Faust's recovery manages itself)."""
    committed = await consumer.seek_to_committed()
    rewind = [tp for tp, offset in committed.items() if not offset and tp.topic not in skip_topics]
    if rewind:
        await consumer.seek_to_beginning(*rewind)
    return committed


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
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

    def mark_handled(self, message: Message) -> None:
        """The agent is done with ``message``: its ack may now count towards a commit."""
        self._handled.add(message)

    def ack(self, message: Message) -> bool:
        if message not in self._handled:
            return False  # skipped by the stream, never processed: keep it uncommitted
        self._handled.discard(message)
        return super().ack(message)

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Producer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, object]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class Transport(faust_aiokafka.Transport):
    Consumer = _Consumer
    Producer = _Producer
