"""The cost role: windowed spend tables fed by the costs topic, and guardrail events.

Consumes the costs topic; produces spend snapshots, guardrail events and dead letters.
Tables (changelog-backed, so they survive restarts and move with partitions):
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

import heapq
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from schemas.codec import DecodeError, decode_cost_record, encode
from schemas.models import BudgetRecord, CostEvent, GuardrailEvent, LeaseState, SpendSnapshot
from streams.envelope import DeadLetters, Outgoing, Source
from streams.guardrails.ledger import (
    OPENINGS_SCOPE,
    Lease,
    Total,
    apply_budget,
    expired,
    hour_key,
    openings_held,
    openings_key,
    openings_limit,
)
from streams.guardrails.money import HOUR_SECONDS, hour_window, nanos_to_usd, usd_to_nanos
from streams.guardrails.view import LEDGER, GuardrailView, PartTotal, WorkflowTotal
from streams.runtime.offsets import OffsetOrder, Verdict
from streams.runtime.types import Handled, HourlyTable, KeyedTable, Partitions, RoleSpec, Worker
from topologies.config import Settings
from topologies.topics import COST_ROLE, Topology

log = logging.getLogger(__name__)


class Rewound(Exception):  # a control-flow signal, not an error
    """This cost event is not counted now: it is read again (after a seek back to events
    that were skipped, or from the committed offset of a new assignment)."""


class CostOffsets:
    """Checks that the cost role counts every offset of a costs partition, in order.

    A skipped cost event would make the totals short for good, so the cost role does not
    rely on the consumer alone: after an assignment, a partition must resume right after
    the last offset the published totals include, and continue without holes (the costs
    topic has no control records: its producers are not transactional). When a hole
    shows, the consumer is sent back to its start and every event after the hole is
    ignored (not acked) until the first missing one arrives; if it has not come
    ``patience`` seconds after the seek, the seek is repeated (:meth:`repeat_overdue`):
    the seek is made from outside the consumer's own task, so nothing orders it against a
    fetch under way, and a partition waiting for a seek that was overtaken would count
    nothing again.
    """

    def __init__(self, view: GuardrailView, patience: float = 5.0) -> None:
        self.view = view
        self.patience = patience
        self.order: OffsetOrder[int] = OffsetOrder(start=lambda p: view.costs_applied.get(p, -1) + 1)

    def on_assigned(self, _assigned: object = ()) -> None:
        self.order.clear()  # the published totals decide again where each partition resumes

    async def repeat_overdue(self, topic: str, partitions: Partitions, now: float | None = None) -> None:
        """Seek again every partition still waiting ``patience`` seconds after its rewind."""
        for p, to in self.order.overdue(self.patience, now):
            if partitions.owns(topic, p):
                log.warning("cost event %d of partition %d has not come %.0f s after the seek back to it: "
                            "seeking again", to, p, self.patience)
                await partitions.seek(topic, p, to)

    async def admit(self, source: Source, generation: int, partitions: Partitions) -> None:
        """Return if ``source`` (handed over in consumer generation ``generation``) is
        to be counted now (a replay is: the totals recognise the offsets they include);
        raise :class:`Rewound` if not, after sending the consumer back to the first
        skipped event when that is why.

        A rebalance can complete while this waits for the log start: the new assignment
        then cleared what this knew (:meth:`on_assigned`) and seeks to the committed
        offsets itself. A rewind decided from the old state would be recorded after that
        clearing, and if the committed offset lay above it every later event would be
        taken for one fetched before the rewind: the partition would stall for good. So
        nothing is decided across a rebalance; the event is read again in the new one.
        """
        p, topic = source.partition, source.topic
        verdict = self.order.admit(p, source.offset)
        if verdict is Verdict.REWINDING:
            raise Rewound  # fetched before the rewind: it comes again
        if verdict is not Verdict.HOLE:
            return
        log_start = await partitions.log_start(topic, p)
        if partitions.generation() != generation or not partitions.owns(topic, p):
            raise Rewound
        back_to = max(self.order.expected(p) or 0, log_start)
        if back_to >= source.offset:
            self.order.passed(p, source.offset)  # the events before it no longer exist (retention)
            return
        log.warning("cost events %d-%d of partition %d were skipped: reading them again",
                    back_to, source.offset - 1, p)
        self.order.rewind(p, back_to)
        await partitions.seek(topic, p, back_to)
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
        opened = published.opened if isinstance(published, WorkflowTotal) else frozenset()
        return Total(
            published.nanos, published.last_offset, max(table.last_seen, seen), dict(published.leases), opened
        )
    return table


class PendingWrites:
    """The cost role's table updates, written to the tables once per key and batch.

    Each cost event updates three totals (its partition's hour, global and per tier, and
    its workflow's); written at once, that would be three table writes, so three changelog
    records, per event, the largest part of the cost role's CPU. Updates wait here, where reads find them, until the batch
    they belong to is published (:meth:`write`); the spend snapshots of the same batch
    carry the same totals and are sent after them, before any offset is committed. A
    worker killed before that loses the batch's table updates and its commits alike: the
    events are read again.
    """

    def __init__(self, hourly: HourlyTable, workflows: KeyedTable) -> None:
        self.hourly = hourly
        self.workflows = workflows
        # (hour key, window) -> (total, costs partition, timestamp of its last event)
        self._hours: dict[tuple[str, int], tuple[Total, int]] = {}
        # workflow -> (total, or None to delete it; costs partition)
        self._workflows: dict[str, tuple[Total | None, int]] = {}

    def __len__(self) -> int:
        return len(self._hours) + len(self._workflows)

    def hour(self, key: str, window: int) -> Total:
        """The total of ``key`` in the hour ``window`` (that of the event being applied)."""
        pending = self._hours.get((key, window))
        return pending[0] if pending is not None else Total.from_list(self.hourly.get(key, window))

    def set_hour(self, key: str, window: int, total: Total, partition: int) -> None:
        self._hours[(key, window)] = (total, partition)

    def workflow(self, wf: str) -> Total:
        pending = self._workflows.get(wf)
        if pending is None:
            return Total.from_list(self.workflows.get(wf))
        return pending[0] or Total()

    def set_workflow(self, wf: str, total: Total, partition: int) -> None:
        self._workflows[wf] = (total, partition)

    def forget_workflow(self, wf: str, partition: int) -> None:
        self._workflows[wf] = (None, partition)

    def write(self) -> None:
        """Write what is pending, each update to its costs partition's changelog."""
        for (key, window), (total, p) in self._hours.items():
            self.hourly.set(key, total.to_list(), float(window), p)
        for wf, (maybe_total, p) in self._workflows.items():
            if maybe_total is not None:
                self.workflows.set(wf, maybe_total.to_list(), p)
            else:
                self.workflows.delete(wf, p)
        self._hours.clear()
        self._workflows.clear()


class CostAccountant:
    """Applies one cost event to the tables (:attr:`tables`) and its totals to the batch of
    snapshots (:attr:`batch`); returns the rest to publish (guardrail events, dead letters)."""

    def __init__(
        self, settings: Settings, topology: Topology, hourly: HourlyTable, workflows: KeyedTable,
        view: GuardrailView,
    ) -> None:
        self.topology = topology
        self.dead_letters = DeadLetters(topology.dead_letters.name, COST_ROLE)
        self.tables = PendingWrites(hourly, workflows)
        self.batch = SpendBatch(self._snapshot)  # the snapshots, per batch of events
        self.view = view
        self.idle_seconds = settings.cost_guardrails.workflow_idle_expiry_seconds
        self.lease_seconds = settings.cost_guardrails.lease_seconds
        self.opening_share = settings.cost_guardrails.opening_share
        # Idle workflows are forgotten: per costs partition, a heap of (when to look again,
        # workflow_id) with one entry per workflow; its table total says when it was last seen.
        self._idle: dict[int, list[tuple[float, str]]] = {}
        self._watched: set[str] = set()
        self._announced: set[str] = set()
        # (window, costs partition) -> the hour's global total there as this process last
        # counted it: newer than the view's until this batch's snapshots are read back.
        self._counted_hours: dict[tuple[int, int], Total] = {}

    def apply(self, source: Source, timestamp: float) -> list[Outgoing]:
        try:
            record = decode_cost_record(source.value)
        except DecodeError as exc:
            return [self.dead_letters.undecodable(source, exc)]
        if isinstance(record, BudgetRecord):
            return self._apply_budget(record, source, timestamp)
        event = record
        nanos = usd_to_nanos(event.cost_usd)
        p, offset = source.partition, source.offset
        window = hour_window(event.window_start.timestamp() if event.window_start else timestamp)
        for scope in ("global", f"tier:{event.tier.value}"):
            key = hour_key(scope, p)
            current = _newest(self.tables.hour(key, window), self.view.hour_part(window, p, scope))
            updated = current.add(nanos, offset, timestamp)
            if updated is not None:
                self.tables.set_hour(key, window, updated, p)
                current = updated
            self.batch.snapshot("hour", scope, p, current, window)
            if scope == "global":
                self._count_hour(window, p, current)

        wf = event.workflow_id
        total = self._workflow(wf, timestamp)
        updated = total.add(nanos, offset, timestamp, event.lease_id)
        total = self._set_workflow(wf, updated, p, timestamp) if updated is not None else total
        # Written after the hour snapshots, on the same spend partition: a reader that has
        # seen this workflow total has seen the hour totals of the same event.
        self.batch.snapshot("workflow", wf, p, total, None)
        out = self._guardrail_events(event, total, window, p, timestamp)
        self._forget_idle(p, timestamp)
        return out

    def _workflow(self, wf: str, timestamp: float) -> Total:
        total = _newest(self.tables.workflow(wf), self.view.workflow_spend(wf))
        if expired(total, timestamp, self.idle_seconds):
            self._announced.discard(_limit_tag(wf))
            return Total(last_offset=total.last_offset)  # a new budget period
        return total

    def _set_workflow(self, wf: str, total: Total, p: int, timestamp: float) -> Total:
        self.tables.set_workflow(wf, total, p)
        if wf not in self._watched:
            self._watched.add(wf)
            heapq.heappush(self._idle.setdefault(p, []), (timestamp, wf))
        return total

    def _apply_budget(self, record: BudgetRecord, source: Source, timestamp: float) -> list[Outgoing]:
        """A lease record: granted, renewed, returned or spent against its scope's total,
        in the order of the scope's partition (see :mod:`streams.guardrails.ledger`)."""
        p, view = source.partition, self.view
        rules = {
            "lease_seconds": self.lease_seconds, "want": record.want_nanos,
            "least": record.least_nanos, "spent": record.spent_nanos,
            "overdraft": record.overdraft,
        }
        if record.window_start is not None:  # the hourly limit's ledger
            window = int(record.window_start.timestamp())
            key = hour_key(LEDGER, p)
            current = _newest(self.tables.hour(key, window), view.hour_part(window, p, LEDGER))
            # Spend the ledger did not see (calls not made under a lease) takes room too.
            unleased = max(view.hour_spend(window) - current.nanos, 0)
            updated = apply_budget(
                current, record.budget, record.lease_id, source.offset, timestamp,
                limit=view.hour_limit - unleased, **rules,  # type: ignore[arg-type]
            )
            out = []
            if updated is not None:
                self.tables.set_hour(key, window, updated, p)
                if record.budget == "request" and record.lease_id not in updated.leases:
                    need = 1 if record.overdraft else record.least_nanos
                    out = self._hour_spent(updated, need, view.hour_limit - unleased, window)
                current = updated
            self.batch.snapshot("hour", LEDGER, p, current, window)
            return out
        if record.scope == OPENINGS_SCOPE:
            return self._apply_opening(record, source, timestamp)
        wf = record.scope
        total = self._workflow(wf, timestamp)
        if record.budget == "open" and record.opening_id is not None:
            opening = self._openings(p).leases.get(record.opening_id)
            # An opening already expired here is still counted at what its holder says it held.
            granted = opening.granted if opening is not None else record.want_nanos
            updated = total.open(record.lease_id, record.opening_id, granted, source.offset, timestamp)
        else:  # only a request's grant depends on the limit, and so on the openings
            held = (
                openings_held(self._openings(p).leases, total.opened, timestamp, self.lease_seconds)
                if record.budget == "request" else 0
            )
            updated = apply_budget(
                total, record.budget, record.lease_id, source.offset, timestamp,
                limit=view.workflow_limit - held, **rules,  # type: ignore[arg-type]
            )
        total = self._set_workflow(wf, updated, p, timestamp) if updated is not None else total
        self.batch.snapshot("workflow", wf, p, total, None)
        return []

    def _openings(self, p: int) -> Total:
        return _newest(self.tables.workflow(openings_key(p)), self.view.openings.get(p))

    def _apply_opening(self, record: BudgetRecord, source: Source, timestamp: float) -> list[Outgoing]:
        """A record of one of partition ``p``'s openings. An opening holds its share of
        every workflow of the partition, so it is granted only out of what the one with the
        least room has left, and the openings together hold at most ``opening_share`` of
        the workflow budget."""
        p, key = source.partition, openings_key(source.partition)
        current = self._openings(p)
        limit = 0
        if record.budget == "request":
            unexpired = openings_held(current.leases, frozenset(), timestamp, self.lease_seconds)
            limit = min(
                openings_limit(self.view.workflow_limit, self.opening_share),
                unexpired + self._least_room(p, current.leases, timestamp),
            )
        updated = apply_budget(
            current, record.budget, record.lease_id, source.offset, timestamp, limit=limit,
            lease_seconds=self.lease_seconds, want=record.want_nanos, least=record.least_nanos,
        )
        if updated is not None:
            self.tables.set_workflow(key, updated, p)
            current = updated
        self.batch.snapshot("openings", key, p, current, None)
        return []

    def _least_room(self, p: int, openings: dict[str, Lease], at: float) -> int:
        """The least room of the workflows of costs partition ``p`` (whose openings are
        ``openings``): those published, and those counted since this process started (its
        own snapshots may not be read yet)."""
        names = {wf for wf, t in self.view.workflows.items() if t.partition == p}
        names.update(wf for _, wf in self._idle.get(p, ()))
        least = self.view.workflow_limit - openings_held(openings, frozenset(), at, self.lease_seconds)  # one not seen yet
        for wf in names:
            total = self._workflow(wf, at)
            held = openings_held(openings, total.opened, at, self.lease_seconds)
            least = min(least, total.room(self.view.workflow_limit) - held)
        return least

    def _hour_spent(self, ledger: Total, least: int, limit: int, window: int) -> list[Outgoing]:
        """A call's hourly lease was denied: if the hour's spend alone leaves less than
        ``least`` (the call's worst case; one nanodollar for a call that may overdraw),
        the hour's limit is reached (every worker then says it is paused)."""
        tag = f"hour|{window}|limit_reached|{self.view.hour_limit}"
        if limit - ledger.nanos >= least or tag in self._announced:
            return []
        self._announced.add(tag)
        spent = self.view.hour_limit - limit + ledger.nanos
        reached = f"leaves less than a call's worst case (${nanos_to_usd(least):.6f}) of" if least > 1 else "reached"
        return [self._event(
            "hour", "limit_reached", "pause", spent, self.view.hour_limit, window,
            f"spend this hour ${nanos_to_usd(spent):.4f} {reached} the hourly limit "
            f"${nanos_to_usd(self.view.hour_limit):.2f}; model calls wait for the next hour or an operator",
        )]

    def _snapshot(self, kind: str, scope: str, p: int, total: Total, window: int | None) -> Outgoing:
        key = f"hour|{window}|{scope}|p{p}" if kind == "hour" else f"{kind}|{scope}"
        snap = SpendSnapshot(
            kind=kind, scope=scope, partition=p, spent_nanos=total.nanos,
            last_offset=max(total.last_offset, 0),
            window_start=_utc(window) if window is not None else None,
            # when the scope was last active (the time of its last record), which the idle
            # expiry of a workflow's budget counts from
            updated_at=_utc(total.last_seen) if total.last_seen else datetime.now(UTC),
            leases={
                lease_id: LeaseState(granted_nanos=lease.granted, spent_nanos=lease.spent, renewed_at=lease.renewed)
                for lease_id, lease in total.leases.items()
            },
            opened=sorted(total.opened),
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
        hour_total = self._hour_total(window)
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

    def _count_hour(self, window: int, p: int, total: Total) -> None:
        counted = self._counted_hours
        if (window, p) not in counted:
            for old in [k for k in counted if k[0] < window - HOUR_SECONDS]:
                del counted[old]  # late events of the previous hour may still come
        counted[window, p] = total

    def _hour_total(self, window: int) -> int:
        """The hour's spend over every costs partition: for each, the newest of what this
        process counted and what the spend topic says. The view alone would miss the
        partitions counted since its last read (this batch's snapshots, not yet sent), and
        a spend that reaches the limit across two partitions would go unannounced."""
        counted = {p: t for (w, p), t in self._counted_hours.items() if w == window}
        total = 0
        for (w, scope, p), part in self.view.hours.items():
            if w == window and scope == "global":
                mine = counted.pop(p, None)
                total += mine.nanos if mine is not None and mine.last_offset > part.last_offset else part.nanos
        return total + sum(t.nanos for t in counted.values())

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


COST_BATCH_EVENTS = 500  # cost events per batch of tables writes and snapshots
# How often a busy cost role publishes: each batch writes one spend snapshot and one
# changelog record per key it touched (an hour scope of a partition, a workflow), which at
# a few hundred calls per second is more than the cost events it reads. A lease request
# waits for its batch, up to this long (grants are asked for ahead of need, docs/guardrails.md).
COST_BATCH_SECONDS = 0.1
# How long the broker may hold the role's fetches to gather its input. Idle, the role
# fetches this often; busy, a fetch brings what came meanwhile instead of one producer
# batch (at 500 calls/s those fetches took half the role's CPU). A lease request can wait
# this much longer.
COST_FETCH_WAIT_SECONDS = 0.05


def cost_tables(worker: Worker) -> tuple[HourlyTable, KeyedTable]:
    partitions = worker.topology.costs.partitions
    hourly = worker.hourly_table(
        "spend-hourly", "Spend per hour, per scope and costs partition: [nanos, last_offset, last_seen].",
        partitions, expires_hours=3,
    )
    workflows = worker.table("spend-workflows", "Spend per workflow: [nanos, last_offset, last_seen].", partitions)
    return hourly, workflows


class SpendBatch:
    """The cost role's output for several cost events, published together.

    Each cost event updates three running totals (its partition's hour, global and per
    tier, and its workflow's); publishing each update would put three records on the
    spend topic per call, each read back by every worker's view. A batch publishes the
    latest snapshot of each key once, and builds only those. The totals are cumulative, so the
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


class CostRole:
    """Counts a batch of cost events: each applied in offset order, then the batch's
    table updates written and its snapshots published (:class:`SpendBatch`). The batch's
    output goes with its first counted event; the runtime acks a batch's events together
    once all of it is with the producer, and Faust flushes the producer before it
    commits, so a snapshot is in Kafka before the offsets it includes are committed."""

    def __init__(self, worker: Worker) -> None:
        self.view = GuardrailView(worker.settings)
        hourly, workflows = cost_tables(worker)
        self.accountant = CostAccountant(worker.settings, worker.topology, hourly, workflows, self.view)
        self.offsets = CostOffsets(self.view)
        self.partitions = worker.partitions
        self.topic = worker.topology.costs.name

    async def handle_batch(self, sources: Sequence[Source]) -> list[Handled]:
        generation = self.partitions.generation()
        # The published totals must be read before the first event is counted.
        await self.view.caught_up.wait()
        handled: list[Handled] = []
        for source in sources:
            try:
                await self.offsets.admit(source, generation, self.partitions)
            except Rewound:
                handled.append(None)  # not handled: read again (see Rewound)
                continue
            self.accountant.batch.add(self.accountant.apply(source, source.timestamp))
            handled.append([])
        first = next((i for i, out in enumerate(handled) if out is not None), None)
        if first is not None:
            self.accountant.tables.write()  # the batch's table updates, then its snapshots
            handled[first] = self.accountant.batch.take()
        return handled

    async def repeat_overdue_rewinds(self) -> None:
        await self.offsets.repeat_overdue(self.topic, self.partitions)


def build(worker: Worker) -> RoleSpec:
    topology = worker.topology
    role = CostRole(worker)
    return RoleSpec(
        consumes=topology.costs,
        produces=(topology.spend, topology.guardrails, topology.dead_letters),
        handle_batch=role.handle_batch,
        batch_size=COST_BATCH_EVENTS,  # one agent: tables are updated in offset order
        batch_wait_seconds=COST_BATCH_SECONDS,
        fetch_wait_seconds=COST_FETCH_WAIT_SECONDS,
        view=role.view,
        timers=[(role.offsets.patience, role.repeat_overdue_rewinds)],
        on_assigned=[role.offsets.on_assigned],
    )
