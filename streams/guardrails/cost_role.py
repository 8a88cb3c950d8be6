"""The cost role: windowed spend tables fed by the costs topic, and guardrail events.

Tables (Faust, changelog-backed, so they survive restarts and move with partitions):
hourly spend, a tumbling one-hour window keyed ``<scope>|p<partition>`` for the global and
per-tier scopes, and per-workflow spend keyed by workflow_id, written once per key and
batch of cost events (:class:`PendingWrites`). The totals are published per batch
(:class:`SpendBatch`, which :meth:`CostAccountant.apply` fills) to the compacted spend
topic, from which every worker derives its pauses (see :mod:`streams.guardrails.view`);
threshold crossings are published as GuardrailEvents for people and alerting. Nothing
here depends on window-close callbacks, which Faust fires late or not at all for windows
restored from the changelog.
"""

from __future__ import annotations

import functools
import heapq
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Protocol

import faust
from faust.types import TP

from schemas.codec import DecodeError, decode, encode
from schemas.models import CostEvent, GuardrailEvent, SpendSnapshot
from streams.envelope import Outgoing, Source, dead_letter_for
from streams.guardrails.ledger import Total, expired, hour_key
from streams.guardrails.money import HOUR_SECONDS, hour_window, nanos_to_usd, usd_to_nanos
from streams.guardrails.view import GuardrailView, PartTotal, WorkflowTotal
from topologies.config import Settings
from topologies.topics import COST_ROLE, Topology

log = logging.getLogger(__name__)


class Rewound(Exception):  # noqa: N818 - a control-flow signal, not an error
    """This cost event is not counted now: it is read again (after a seek back to events
    that were skipped, or from the committed offset of a new assignment)."""


class Positions(Protocol):
    """What :meth:`CostOffsets.admit` needs of the consumer."""

    def generation(self) -> int: ...

    def owns(self, tp: TP) -> bool:
        """``tp`` is assigned to this consumer and no rebalance is under way."""
        ...

    async def log_start(self, tp: TP) -> int: ...

    async def seek(self, tp: TP, offset: int) -> None: ...


class FaustPositions:
    """:class:`Positions` of a Faust app's consumer."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    def generation(self) -> int:
        return self.app.consumer_generation_id

    def owns(self, tp: TP) -> bool:
        return not self.app.rebalancing and tp in self.app.consumer.assignment()

    async def log_start(self, tp: TP) -> int:
        return (await self.app.consumer.earliest_offsets(tp))[tp]

    async def seek(self, tp: TP, offset: int) -> None:
        await self.app.consumer.seek(tp, offset)


class CostOffsets:
    """Checks that the cost role counts every offset of a costs partition, in order.

    A skipped cost event would make the totals short for good. Faust can commit past
    records its stream skipped around a rebalance (see streams.faust_transport), so the
    cost role does not rely on it: after an assignment, a partition must resume right
    after the last offset the published totals include, and continue without holes
    (the costs topic has no control records: its producers are not transactional).
    When a hole shows, the consumer is sent back to its start and every event after the
    hole is ignored (not acked) until the first missing one arrives; if it has not come
    ``patience`` seconds after the seek, the seek is repeated (:meth:`repeat_overdue`):
    Faust calls aiokafka's ``seek`` from outside the thread the consumer runs in, so
    nothing orders it against a fetch under way, and a partition waiting for a seek that
    was lost or overtaken would count nothing again.
    """

    def __init__(self, view: GuardrailView, patience: float = 5.0) -> None:
        self.view = view
        self.patience = patience
        self._next: dict[int, int] = {}
        self._waiting_for: dict[int, int] = {}
        self._rewound_at: dict[int, float] = {}

    def on_assigned(self) -> None:
        self._next.clear()
        self._waiting_for.clear()
        self._rewound_at.clear()

    def expected(self, partition: int, log_start: int = 0) -> int:
        found = self._next.get(partition)
        if found is None:
            found = self.view.costs_applied.get(partition, -1) + 1
        return max(found, log_start)

    def in_order(self, partition: int, offset: int) -> bool:
        """False if events before ``offset`` were skipped (or are being read again)."""
        waiting = self._waiting_for.get(partition)
        if waiting is not None:
            if offset > waiting:
                return False  # fetched before the rewind: ignored, it comes again
            del self._waiting_for[partition]
            self._rewound_at.pop(partition, None)
            return True
        return offset <= self.expected(partition)  # below: a replay the totals recognise

    def waiting(self, partition: int) -> bool:
        return partition in self._waiting_for

    def rewound(self, partition: int, to: int, now: float | None = None) -> None:
        self._waiting_for[partition] = to
        self._rewound_at[partition] = time.monotonic() if now is None else now

    async def repeat_overdue(self, topic: str, consumer: Positions, now: float | None = None) -> None:
        """Seek again every partition still waiting ``patience`` seconds after its rewind."""
        now = time.monotonic() if now is None else now
        for p, at in list(self._rewound_at.items()):
            to = self._waiting_for.get(p)
            tp = TP(topic, p)
            if to is None or now - at < self.patience or not consumer.owns(tp):
                continue
            log.warning("cost event %d of partition %d has not come %.0f s after the seek back to it: "
                        "seeking again", to, p, now - at)
            self._rewound_at[p] = now
            await consumer.seek(tp, to)

    def counted(self, partition: int, offset: int) -> None:
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    async def admit(self, source: Source, generation: int, consumer: Positions) -> None:
        """Return if ``source`` (handed over in consumer generation ``generation``) is
        to be counted now; raise :class:`Rewound` if not, after sending the consumer back
        to the first skipped event when that is why.

        A rebalance can complete while this waits for the log start: the new assignment
        then cleared what this knew (:meth:`on_assigned`) and seeks to the committed
        offsets itself. A rewind decided from the old state would be recorded after that
        clearing, and if the committed offset lay above it every later event would be
        taken for one fetched before the rewind: the partition would stall for good. So
        nothing is decided across a rebalance; the event is read again in the new one.
        """
        p = source.partition
        if self.in_order(p, source.offset):
            return
        if self.waiting(p):
            raise Rewound  # fetched before the rewind: it comes again
        tp = TP(source.topic, p)
        log_start = await consumer.log_start(tp)
        if consumer.generation() != generation or not consumer.owns(tp):
            raise Rewound
        back_to = self.expected(p, log_start)
        if back_to >= source.offset:
            return  # the events before it no longer exist (retention)
        log.warning("cost events %d-%d of partition %d were skipped: reading them again",
                    back_to, source.offset - 1, p)
        self.rewound(p, back_to)
        await consumer.seek(tp, back_to)
        raise Rewound


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _limit_tag(workflow_id: str) -> str:
    """What ``CostAccountant._announced`` holds once a workflow's limit was announced."""
    return f"wf|{workflow_id}"


def _newest(table: Total, published: PartTotal | WorkflowTotal | None) -> Total:
    """The table's total, or the one last published to the spend topic if that includes
    more. The spend topic is written before each offset commit; a table's changelog is
    written through Faust's send buffer and was seen to lose its tail on SIGKILL, so the
    published totals are what makes a restarted cost role exact."""
    if published is not None and published.last_offset > table.last_offset:
        # A workflow's published total also says when it was last active, so one whose
        # table entry was dropped as idle (or lost) still expires instead of coming back.
        seen = published.updated_at if isinstance(published, WorkflowTotal) else 0.0
        return Total(published.nanos, published.last_offset, max(table.last_seen, seen))
    return table


class PendingWrites:
    """The cost role's table updates, written to the tables once per key and batch.

    Each cost event updates three totals (its partition's hour, global and per tier, and
    its workflow's); written at once, that was three table writes, so three changelog
    records, per event: about half of the cost role's CPU (a 5,000-request run: 3.5 s
    with them, 1.7 s without). Updates wait here, where reads find them, until the batch
    they belong to is published (:meth:`write`); the spend snapshots of the same batch
    carry the same totals and are sent after them, before any offset is committed. A
    worker killed before that loses the batch's table updates and its commits alike: the
    events are read again.
    """

    def __init__(self, hourly: faust.Table, workflows: faust.Table) -> None:
        self.hourly = hourly  # tumbling windows: written relative to an event's timestamp
        self.workflows = workflows
        # (hour key, window) -> (total, costs partition, timestamp of its last event)
        self._hours: dict[tuple[str, int], tuple[Total, int, float]] = {}
        # workflow -> (total, or None to delete it; costs partition)
        self._workflows: dict[str, tuple[Total | None, int]] = {}

    def __len__(self) -> int:
        return len(self._hours) + len(self._workflows)

    def hour(self, key: str, window: int) -> Total:
        """The total of ``key`` in the hour ``window`` (that of the event being applied)."""
        pending = self._hours.get((key, window))
        return pending[0] if pending is not None else Total.from_list(self.hourly[key].current())

    def set_hour(self, key: str, window: int, total: Total, partition: int, timestamp: float) -> None:
        self._hours[(key, window)] = (total, partition, timestamp)

    def workflow(self, wf: str) -> Total:
        pending = self._workflows.get(wf)
        if pending is None:
            return Total.from_list(self.workflows.get(wf))
        return pending[0] or Total()

    def set_workflow(self, wf: str, total: Total, partition: int) -> None:
        self._workflows[wf] = (total, partition)

    def forget_workflow(self, wf: str, partition: int) -> None:
        self._workflows[wf] = (None, partition)

    def write(self, as_event_of: Callable[[int], AbstractContextManager[object]]) -> None:
        """Write what is pending. ``as_event_of(partition)``: a context in which a table
        write goes to that partition's changelog (Faust takes it from the current event)."""
        by_partition: dict[int, list[Callable[[], None]]] = {}
        for (key, _window), (total, p, timestamp) in self._hours.items():
            by_partition.setdefault(p, []).append(functools.partial(
                self.hourly.relative_to(timestamp).__setitem__, key, total.to_list()
            ))
        for wf, (maybe_total, p) in self._workflows.items():
            if maybe_total is not None:
                write = functools.partial(self.workflows.__setitem__, wf, maybe_total.to_list())
            else:
                write = functools.partial(self._delete_workflow, wf)
            by_partition.setdefault(p, []).append(write)
        self._hours.clear()
        self._workflows.clear()
        for p, writes in by_partition.items():
            with as_event_of(p):
                for write in writes:
                    write()

    def _delete_workflow(self, wf: str) -> None:
        if wf in self.workflows:
            del self.workflows[wf]


class CostAccountant:
    """Applies one cost event to the tables (:attr:`tables`) and its totals to the batch of
    snapshots (:attr:`batch`); returns the rest to publish (guardrail events, dead letters)."""

    def __init__(
        self, settings: Settings, topology: Topology, hourly: faust.Table, workflows: faust.Table,
        view: GuardrailView,
    ) -> None:
        self.topology = topology
        self.tables = PendingWrites(hourly, workflows)
        self.batch = SpendBatch(self._snapshot)  # the snapshots, per batch of events
        self.view = view
        self.idle_seconds = settings.cost_guardrails.workflow_idle_expiry_seconds
        # Idle workflows are forgotten: per costs partition, a heap of (when to look again,
        # workflow_id) with one entry per workflow; its table total says when it was last seen.
        self._idle: dict[int, list[tuple[float, str]]] = {}
        self._watched: set[str] = set()
        self._announced: set[str] = set()

    def apply(self, source: Source, timestamp: float) -> list[Outgoing]:
        try:
            event = decode(source.value, CostEvent)
        except DecodeError as exc:
            return [dead_letter_for(self.topology.dead_letters.name, source, exc, COST_ROLE)]
        nanos = usd_to_nanos(event.cost_usd)
        p, offset = source.partition, source.offset
        window = hour_window(timestamp)
        out: list[Outgoing] = []
        for scope in ("global", f"tier:{event.tier.value}"):
            key = hour_key(scope, p)
            current = _newest(self.tables.hour(key, window), self.view.hour_part(window, p, scope))
            updated = current.add(nanos, offset, timestamp)
            if updated is not None:
                self.tables.set_hour(key, window, updated, p, timestamp)
                current = updated
            self.batch.snapshot("hour", scope, p, current, window)

        wf = event.workflow_id
        total = _newest(self.tables.workflow(wf), self.view.workflow_spend(wf))
        if expired(total, timestamp, self.idle_seconds):
            total = Total(last_offset=total.last_offset)  # a new budget period
            self._announced.discard(_limit_tag(wf))
        updated = total.add(nanos, offset, timestamp)
        if updated is not None:
            self.tables.set_workflow(wf, updated, p)
            total = updated
            if wf not in self._watched:
                self._watched.add(wf)
                heapq.heappush(self._idle.setdefault(p, []), (timestamp, wf))
        # Written after the hour snapshots, on the same spend partition: a reader that has
        # seen this workflow total has seen the hour totals of the same event.
        self.batch.snapshot("workflow", wf, p, total, None)
        out.extend(self._guardrail_events(event, total, window, p, timestamp))
        self._forget_idle(p, timestamp)
        return out

    def _snapshot(self, kind: str, scope: str, p: int, total: Total, window: int | None) -> Outgoing:
        key = f"hour|{window}|{scope}|p{p}" if kind == "hour" else f"workflow|{scope}"
        snap = SpendSnapshot(
            kind=kind, scope=scope, partition=p, spent_nanos=total.nanos,
            last_offset=max(total.last_offset, 0),
            window_start=_utc(window) if window is not None else None,
        )
        return Outgoing(self.topology.spend.name, key.encode(), encode(snap))

    def _guardrail_events(
        self, event: CostEvent, wf_total: Total, window: int, p: int, now: float
    ) -> list[Outgoing]:
        view = self.view
        out = []
        wf_tag = _limit_tag(event.workflow_id)
        if wf_total.nanos >= view.workflow_limit and wf_tag not in self._announced:
            self._announced.add(wf_tag)
            out.append(self._event(
                f"workflow:{event.workflow_id}", "limit_reached", "block_workflow",
                wf_total.nanos, view.workflow_limit, None,
                f"workflow {event.workflow_id} spent ${nanos_to_usd(wf_total.nanos):.6f} of "
                f"its ${nanos_to_usd(view.workflow_limit):.2f} budget; further requests end as budget_exceeded",
                workflow_id=event.workflow_id,
            ))
        # This process knows its own partitions first-hand and the others through the view.
        own = self.tables.hour(hour_key("global", p), window).nanos
        seen = view.hour_part(window, p)
        hour_total = view.hour_spend(window) - (seen.nanos if seen else 0) + own
        for threshold, kind, action, label in (
            (view.alert_threshold, "alert", "none", "alert threshold"),
            (view.hour_limit, "limit_reached", "pause", "hourly limit"),
        ):
            tag = f"hour|{window}|{kind}"
            if hour_total >= threshold and tag not in self._announced:
                self._announced.add(tag)
                out.append(self._event(
                    "hour", kind, action, hour_total, threshold, window,
                    f"spend this hour ${nanos_to_usd(hour_total):.4f} reached the {label} "
                    f"${nanos_to_usd(threshold):.2f}",
                ))
        return out

    def _event(
        self, scope: str, kind: str, action: str, spent: int, limit: int, window: int | None,
        reason: str, workflow_id: str | None = None,
    ) -> Outgoing:
        event = GuardrailEvent(
            scope=scope, kind=kind, action=action, spent_usd=nanos_to_usd(spent),  # type: ignore[arg-type]
            limit_usd=nanos_to_usd(limit), reason=reason, workflow_id=workflow_id,
            window_start=_utc(window) if window is not None else None,
            window_end=_utc(window + HOUR_SECONDS) if window is not None else None,
        )
        return Outgoing(self.topology.guardrails.name, scope.encode(), encode(event))

    def _forget_idle(self, p: int, now: float) -> None:
        heap = self._idle.get(p)
        while heap and now - heap[0][0] > self.idle_seconds:
            _, wf = heapq.heappop(heap)
            total = self.tables.workflow(wf)
            if total.last_seen and not expired(total, now, self.idle_seconds):
                heapq.heappush(heap, (total.last_seen, wf))  # seen since: look again later
                continue
            self._watched.discard(wf)
            self._announced.discard(_limit_tag(wf))
            if total.last_seen:
                self.tables.forget_workflow(wf, p)


def cost_tables(app: faust.App, topology: Topology) -> tuple[faust.Table, faust.Table]:
    partitions = topology.costs.partitions
    hourly = app.Table(
        "spend-hourly", default=list, partitions=partitions,
        help="Spend per hour, per scope and costs partition: [nanos, last_offset, last_seen].",
    ).tumbling(timedelta(seconds=HOUR_SECONDS), expires=timedelta(hours=3))
    workflows = app.Table(
        "spend-workflows", default=list, partitions=partitions,
        help="Spend per workflow: [nanos, last_offset, last_seen].",
    )
    return hourly, workflows





class SpendBatch:
    """The cost role's output for several cost events, published together.

    Each cost event updates three running totals (its partition's hour, global and per
    tier, and its workflow's), and each update used to be published as a snapshot: three
    records on the spend topic per call, each read back by every worker's view. A batch
    publishes the latest snapshot of each key once, and builds only those (building one
    per update was 9 % of the cost role's samples). The totals are cumulative, so the
    latest snapshot says everything the earlier ones did; every hour snapshot goes before
    every workflow snapshot (one spend partition), so a reader that has seen a workflow
    total has seen the hour totals of the same events. Guardrail events and dead letters
    are kept, in order, after the snapshots.
    """

    def __init__(self, build: Callable[[str, str, int, Total, int | None], Outgoing]) -> None:
        self._build = build  # (kind, scope, partition, total, window) -> the snapshot message
        Args = tuple[str, str, int, Total, int | None]
        self._hours: dict[tuple[int | None, str, int], Args] = {}
        self._workflows: dict[str, Args] = {}
        self._others: list[Outgoing] = []
        self.events = 0

    def __len__(self) -> int:
        return self.events

    def snapshot(self, kind: str, scope: str, p: int, total: Total, window: int | None) -> None:
        """The running total of a key (an hour scope of a partition, or a workflow)."""
        if kind == "hour":
            self._hours[(window, scope, p)] = (kind, scope, p, total, window)
        else:
            self._workflows[scope] = (kind, scope, p, total, window)

    def add(self, outgoing: list[Outgoing]) -> None:
        """The rest of one cost event's output, in order."""
        self.events += 1
        self._others.extend(outgoing)

    def take(self) -> list[Outgoing]:
        """What to publish for every event added since the last take, and start anew."""
        out = [self._build(*args) for args in (*self._hours.values(), *self._workflows.values())]
        out.extend(self._others)
        self._hours, self._workflows, self._others, self.events = {}, {}, [], 0
        return out
