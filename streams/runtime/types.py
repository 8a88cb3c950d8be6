"""What a role declares, and what it may ask of the worker that runs it.

A role (:mod:`streams.roles`) is built from a :class:`Worker` and returns a
:class:`RoleSpec`: the topic it consumes, the topics it produces, how it handles what it
reads (one event at a time, or in batches), and what it needs (model providers, the
guardrail view, tables, timers). The runtime (:mod:`streams.runtime.worker`) runs every
role with the same agent loop; nothing outside :mod:`streams.runtime` sees Faust.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from streams.envelope import Outgoing, Source
from topologies.config import Settings
from topologies.topics import Role, TopicSpec, Topology

if TYPE_CHECKING:
    from streams.dedupe import AnsweredIndex
    from streams.guardrails.view import GuardrailView
    from streams.providers import ProviderRegistry
    from streams.ratelimit import RateLimiter

# An event's output, or None: not handled now, to be read again (after a seek).
Handled = list[Outgoing] | None
Handler = Callable[[Source], Awaitable[Handled]]
BatchHandler = Callable[[Sequence[Source]], Awaitable[list[Handled]]]
Partition = tuple[str, int]  # (topic, partition)


class Lifecycle(Protocol):
    """Something started with the worker and stopped with it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Partitions(Protocol):
    """The worker's consumer, as roles and probes see it."""

    def generation(self) -> int:
        """Counts the consumer group's rebalances: an event handed over in an earlier
        generation may now belong to another member."""
        ...

    def assigned(self) -> set[Partition]: ...

    def owns(self, topic: str, partition: int) -> bool:
        """Assigned to this worker, and no rebalance under way."""
        ...

    def committed(self, topic: str, partition: int) -> int | None:
        """The next offset the group will read after a restart."""
        ...

    def highwater(self, topic: str, partition: int) -> int | None: ...

    async def log_start(self, topic: str, partition: int) -> int: ...

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read ``partition`` again from ``offset``."""
        ...


class HourlyTable(Protocol):
    """A durable table of one-hour tumbling windows: values move with their partitions
    and survive restarts."""

    def get(self, key: str, at: float) -> list[float | int]:
        """The value of ``key`` in the hour holding ``at`` ([] if none)."""
        ...

    def set(self, key: str, value: list[float | int], at: float, partition: int) -> None: ...


class KeyedTable(Protocol):
    """A durable table: values move with their partitions and survive restarts."""

    def get(self, key: str) -> list[float | int]: ...

    def set(self, key: str, value: list[float | int], partition: int) -> None: ...

    def delete(self, key: str, partition: int) -> None: ...


# Writes one record; returns its (partition, offset) once the broker acknowledged it.
Send = Callable[[bytes | None, bytes], Awaitable[tuple[int, int]]]


class Worker(Protocol):
    """What a role may ask of the worker while it is being built."""

    settings: Settings
    topology: Topology
    role: Role
    partitions: Partitions

    def hourly_table(self, name: str, help: str, partitions: int, expires_hours: float) -> HourlyTable: ...

    def table(self, name: str, help: str, partitions: int) -> KeyedTable: ...

    def sender(self, spec: TopicSpec) -> Send:
        """Writes records to ``spec``'s topic, outside any event's output."""
        ...


@dataclass
class RoleSpec:
    """A role: what it consumes and produces, how it handles events, what it needs."""

    consumes: TopicSpec
    produces: tuple[TopicSpec, ...]
    # One of the two: ``handle`` runs ``concurrency`` events at a time, each acked once its
    # output is with the producer; ``handle_batch`` takes up to ``batch_size`` events (or
    # what came within ``batch_wait_seconds``) in offset order and acks them together.
    handle: Handler | None = None
    handle_batch: BatchHandler | None = None
    concurrency: int = 1
    batch_size: int = 1
    batch_wait_seconds: float = 0.0
    # A rebalance waits until the events in hand are acked. Roles whose calls can be held
    # for long (the budget gate) do not wait: an event held across a rebalance is answered
    # once by whoever owns it then (see ``answered``).
    wait_empty: bool = True
    # How long the broker may hold a fetch of the role's input to gather a batch of it
    # (0: answered as soon as one record is there, as Faust has it). Each fetch costs the
    # role (Faust's consumer thread, the hand-over to the agent) and the broker about the
    # same however few records it brings, so a role off the requests' path gathers.
    fetch_wait_seconds: float = 0.0
    # Answer each request once (tier roles): requests already answered are skipped, and a
    # result whose partition moved while it was made is dropped.
    answered: AnsweredIndex | None = None
    # The topic of a call's cost: written before the rest of an event's output and waited
    # for (a result is never in Kafka without its cost), and written even when the result
    # is dropped (the call was made).
    costs_topic: str | None = None
    providers: ProviderRegistry | None = None  # pools opened, probed and measured by the worker
    limiter: RateLimiter | None = None  # its waits are measured
    view: GuardrailView | None = None  # followed by the worker, reported on /ready
    timers: list[tuple[float, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    lifecycles: list[Lifecycle] = field(default_factory=list)  # started and stopped with the worker
    # Told the full assignment after every rebalance; must not block (start a task instead).
    on_assigned: list[Callable[[Iterable[Partition]], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.handle is None) == (self.handle_batch is None):
            raise ValueError("a role handles events one at a time or in batches: give handle or handle_batch")
