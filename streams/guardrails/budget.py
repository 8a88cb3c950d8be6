"""Cluster-wide budgets: a call spends only what its process holds of a lease.

The cost role grants leases (:mod:`streams.guardrails.ledger`): a share of a workflow's
budget, or of the hour's limit, which the cost role counts as taken until its holder
spends it, returns what is left, or stops renewing it. A tier worker asks for leases on
the costs topic (a :class:`~schemas.models.BudgetRecord` keyed by the scope, so it is
ordered with the scope's spend) and learns what was granted from the spend snapshots
that every worker reads (:class:`~streams.guardrails.view.GuardrailView`).

- A call is admitted only if its worst case fits in what this process holds of a lease
  of the workflow and of a lease of the hour, both; the worst case is reserved, and
  replaced by the real cost once the call is settled. No process ever spends more than
  it was granted, and the cost role never grants more than the limit leaves (but for
  one overdraft, below), so the cluster's spend stays within each limit plus at most one
  call (to the precision of the worst-case estimate).
- A request that cannot be granted is answered with nothing: the call waits, and asks
  again when the scope's total changes (another holder returned or spent) or after a
  second. A workflow whose counted spend leaves no room for the call ends the request as
  ``budget_exceeded`` instead.
- The last call of a limit: with ``cost_guardrails.overdraft``, a request is granted one
  call's worst case when the scope has room left, but less than that
  (:func:`~streams.guardrails.ledger.grant_size`), so a limit can be spent to its end and
  is passed by at most one call; without it, a call fits in the room or is not made.
- Leases are sized to the calls this process admitted in the scope over the last second
  (``lease_seconds / 2`` of them, at least four worst cases), and the next one is asked
  for when what the leases in hand have left falls below half of the newest (a used-up
  lease stays in hand while its calls last) or below two of the largest calls admitted
  lately, so a steady flow of calls does not wait for grants unless the cost role is
  further behind than that.
  The cost role grants at most half of what is left, so several holders share a scope
  and the last worst-case call of a budget can still be granted.
- Unused leases go back: returned after ``lease_seconds / 2`` without a call (the newest
  of a scope, asked for ahead, counts as used while the scope is), and
  renewed every ``lease_seconds / 3`` while used. A holder that stops (SIGKILL) stops
  renewing, and its lease expires after ``lease_seconds``; this process stops using a
  lease at 80 % of that, counted from when it sent the request or renewal (earlier than
  the cost role's clock, which stamps the record once written).
- The first call of a workflow this process holds nothing of is admitted at once under
  an opening of the workflow's costs partition: a lease that holds its share of every
  workflow there, granted ahead of need (:data:`~streams.guardrails.ledger.OPENINGS_SCOPE`).
  The call's reservation turns the opening's share of that workflow into a lease of it
  (an ``open`` record, ahead of the call's cost event in the workflow's partition), which
  this process then renews, spends and returns like any other; an opening is used once
  per workflow. Openings are asked for at start (and again, of a call's size, when too
  small), and kept while this process runs (a renewal per partition every
  ``lease_seconds / 3``).
- A lease is returned only once the cost records of its calls are in Kafka: a workflow's
  cost events are in its partition before the return, so the cost role has counted them
  when it frees the rest. What an hourly lease spent is told to the hour's ledger in one
  spend record per tick (not one per call, which would double the records the cost role
  reads), and always before the lease's return. Until then the ledger counts that spend
  as held by the lease, and the hour's total counts it too once its cost events are
  read: the room is underestimated for a tick, never overestimated. A holder killed
  before telling loses nothing either: its lease expires, and its calls' cost events are
  spend the ledger did not see, which takes room (``unleased`` in the cost role).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from schemas.codec import encode
from schemas.models import AgentResult, BudgetRecord, Tier, TieredRequest, Timings
from streams.guardrails.ledger import OPENINGS_SCOPE, Lease, Total, openings_held, openings_key, openings_limit
from streams.guardrails.money import hour_window, nanos_to_usd
from streams.guardrails.view import GuardrailView, WorkflowTotal
from topologies.topics import partition_of

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0
TICK_SECONDS = 0.25  # how often a gate's leases in use are renewed and the others returned (BudgetGate.tick)
HOUR_SCOPE = "hour"  # the key of every hourly lease record: one partition keeps the hour's ledger
# Where a lease's record is written: (key, value) -> (partition, offset) once acknowledged.
SendRecord = Callable[[bytes, bytes], Awaitable[tuple[int, int]]]
# The workflows one opening is used for before it is given back for a new one: what this
# process remembers of it, since it must never use it twice for a workflow.
OPENED_LIMIT = 4096


def holder_name(role: str) -> str:
    """Names this process in its lease ids (no secret, unique per start)."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(eq=False, slots=True)
class HeldLease:
    """What this process holds of one granted lease."""

    lease_id: str
    scope: str
    window: int | None
    granted: int
    deadline: float  # no new reservation after this (local clock)
    renew_at: float
    spent: int = 0
    reserved: int = 0
    calls: int = 0  # admitted calls whose cost records are not in Kafka yet
    last_used: float = 0.0
    unreported: int = 0  # spent, and not yet told to the hour's ledger (hourly leases)
    writing: asyncio.Task[None] | None = None  # its last record being written: the next waits for it
    opened: set[str] | None = None  # an opening: the workflows it was turned into leases of

    def room(self) -> int:
        return self.granted - self.spent - self.reserved


@dataclass(slots=True)
class _Request:
    lease_id: str
    sent_at: float
    where: tuple[int, int] | None = None  # (partition, offset) once acknowledged


@dataclass(eq=False, slots=True)
class Allowance:
    """This process's share of one scope: a workflow, one hour window, or the openings of
    one costs partition (``partition`` set, its records keyed ``key``)."""

    scope: str
    window: int | None
    partition: int | None = None
    key: bytes = b""
    leases: list[HeldLease] = field(default_factory=list)
    request: _Request | None = None
    denied_at: float = 0.0
    denied_room: int = 0  # the scope's room, as published, when a request was denied
    admitted: deque[float] = field(default_factory=deque)  # when calls were admitted, last second

    def record_key(self) -> bytes:
        return self.key or self.scope.encode()

    def record_scope(self) -> str:
        return OPENINGS_SCOPE if self.partition is not None else self.scope

    def usable(self, worst: int, now: float) -> HeldLease | None:
        for lease in self.leases:
            if now < lease.deadline and lease.room() >= worst:
                return lease
        return None

    def room(self, now: float) -> int:
        """What the leases in hand have left for new calls (one used up can stay in hand
        for as long as its calls last)."""
        return sum(max(lease.room(), 0) for lease in self.leases if now < lease.deadline)

    def rate(self, now: float) -> int:
        while self.admitted and now - self.admitted[0] > 1.0:
            self.admitted.popleft()
        return len(self.admitted)


@dataclass(eq=False, slots=True)
class Reservation:
    workflow_id: str
    window: int
    worst_nanos: int
    workflow_lease: HeldLease
    hour_lease: HeldLease | None  # None: the operator resumed this hour past its limit


class BudgetExceeded(Exception):
    """The workflow's remaining budget cannot cover this call's worst case."""


def exceeded_result(
    gate: BudgetGate, request: TieredRequest, tier: Tier, provider: str, model: str,
) -> AgentResult:
    """The answer of a request whose workflow is out of budget: no model call was made."""
    now = datetime.now(UTC)
    spent, _ = gate.workflow_committed(request.workflow_id)
    return AgentResult(
        request_id=request.request_id, workflow_id=request.workflow_id, agent_type=request.agent_type,
        status="budget_exceeded", tier=tier, routed_by=request.routed_by, provider=provider, model=model,
        attempts=0,
        timings=Timings(
            created_at=request.created_at, classified_at=request.classified_at,
            started_at=now, finished_at=now, model_latency_ms=0,
        ),
        error=(
            f"workflow budget exhausted: spent ${nanos_to_usd(spent):.6f} of "
            f"${nanos_to_usd(gate.view.workflow_limit):.2f}, no room for this request"
        ),
        metadata=request.metadata,
    )


class BudgetGate:
    """Admits a tier worker's calls under the leases it holds; asks for, renews and
    returns them (:meth:`tick`, every few hundred milliseconds)."""

    def __init__(
        self, view: GuardrailView, send: SendRecord | None = None, holder: str = "holder",
        lease_seconds: float | None = None, clock: Callable[[], float] = time.time,
        long_reservations: bool = False, partitioner: tuple[int, Callable[[bytes], int]] | None = None,
    ) -> None:
        self.view = view
        # Reservations held for hours (the batch role's, until a provider's batch ends): a
        # lease is asked for exactly the reservation's worst case, since what a lease holds
        # beyond it would be locked as long; and a workflow whose counted spend plus what
        # this process has reserved leaves no room is over budget, since waiting would
        # wait for this process's own reservations.
        self.long_reservations = long_reservations
        self._demand: dict[object, int] = {}  # the worst case of each admission waiting
        self.send = send
        self.holder = holder
        self.lease_seconds = lease_seconds or view.settings.cost_guardrails.lease_seconds
        self.idle_seconds = view.settings.cost_guardrails.workflow_idle_expiry_seconds
        self.clock = clock
        self._allowances: dict[tuple[str, int | None], Allowance] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        # Replaced on every change: waiters hold the one that was current when they looked.
        self._changed = asyncio.Event()
        view.listeners.append(self._on_view_update)
        view.reporters.append(self.summary)
        self._limits: tuple[int, int, int] = (view.hour_limit, view.workflow_limit, len(view.resumed_windows))
        self._window = 0
        self.waiting = 0
        self.observe_wait: Callable[[float], None] = lambda _seconds: None  # admission time, for metrics
        self.granted = 0  # leases granted to this process, for metrics and tests
        self.denied = 0
        self.opened = 0  # calls admitted under an opening, without waiting for a grant
        # Openings: none for long reservations, which would hold them for a batch's hours.
        guard = view.settings.cost_guardrails
        self.opening_share = 0.0 if long_reservations else guard.opening_share
        # A long reservation's worst case is many calls': it never overdraws a limit.
        self.overdraft = guard.overdraft and not long_reservations
        partitions = view.topology.costs.partitions
        self.partitions, self.partition_of = partitioner or (partitions, lambda key: partition_of(key, partitions))
        self._opening_keys: dict[int, bytes] = {}  # costs partition -> a key that goes there
        self._largest: tuple[float, int] = (0.0, 0)  # (since, the largest worst case admitted)

    # ------------------------------------------------------------------ admission
    async def admit(self, workflow_id: str, worst_nanos: int) -> Reservation:
        """Wait until the call fits in leases held here; raise :class:`BudgetExceeded`
        if the workflow's counted spend leaves no room for it."""
        await self.view.caught_up.wait()
        self.waiting += 1
        token = object()
        self._demand[token] = worst_nanos
        started = time.perf_counter()
        try:
            if self.long_reservations:
                await asyncio.sleep(0)  # admissions started together (a batch's workflows) ask for the hour together
            while True:
                changed = self._changed
                # Checking and reserving do not await: no other task runs in between.
                reservation = self._try_reserve(workflow_id, worst_nanos, self.clock())
                if reservation is not None:
                    self.observe_wait(time.perf_counter() - started)
                    return reservation
                try:  # ask again at least every second: the hour may roll over
                    await asyncio.wait_for(changed.wait(), RECHECK_SECONDS)
                except TimeoutError:
                    pass
        finally:
            self.waiting -= 1
            del self._demand[token]

    def _allowance(self, scope: str, window: int | None) -> Allowance:
        key = (scope, window)
        allowance = self._allowances.get(key)
        if allowance is None:
            allowance = self._allowances[key] = Allowance(scope, window)
        return allowance

    def _try_reserve(self, workflow_id: str, worst: int, now: float) -> Reservation | None:
        view = self.view
        room = self.workflow_room(workflow_id, now)
        if room <= 0 or (worst > room and not self.overdraft) or worst > view.workflow_limit:
            raise BudgetExceeded(workflow_id)
        window = hour_window(now)
        flow = self._allowance(workflow_id, None)
        flow_lease = flow.usable(worst, now)
        hour: Allowance | None = None
        hour_lease: HeldLease | None = None
        if window not in view.resumed_windows:
            hour = self._allowance(HOUR_SCOPE, window)
            hour_lease = hour.usable(worst, now)
            if hour_lease is None:
                self._ask(hour, worst, now)
        if self.opening_share and worst > self._openings_limit():
            self._give_up_openings()
        if flow_lease is None and self.opening_share:
            if not flow.leases and flow.request is None:
                if hour is not None and hour_lease is None:
                    if self._opening(self._openings(self.partition_of(workflow_id.encode())), worst, now, workflow_id):
                        return None  # the hour's lease is asked for; an opening serves the workflow once it comes
                else:
                    flow_lease = self._open(flow, worst, now)
            if flow_lease is None:
                self._want_openings(worst, now)  # for the next workflows' first calls
        if flow_lease is None:
            self._ask(flow, worst, now)
        if flow_lease is None or (hour is not None and hour_lease is None):
            return None
        reservation = Reservation(workflow_id, window, worst, flow_lease, hour_lease)
        largest = self._largest_call(worst, now)
        for lease, allowance in ((flow_lease, flow), (hour_lease, hour)):
            if lease is not None and allowance is not None:
                lease.reserved += worst
                lease.calls += 1
                lease.last_used = now
                allowance.admitted.append(now)
                # The next lease before what is held runs out: once half the newest grant
                # is used, or sooner when two of the largest calls seen lately would not
                # fit (calls vary in size, and a lease made of an opening holds a few).
                if not self.long_reservations and allowance.room(now) < max(lease.granted // 2, 2 * largest):
                    self._ask(allowance, worst, now)
        return reservation

    def _largest_call(self, worst: int, now: float) -> int:
        """The largest worst case admitted here in about the last ``lease_seconds``."""
        since, largest = self._largest
        if worst >= largest or now - since > self.lease_seconds:
            self._largest = (now, worst)
            return worst
        return largest

    def _openings(self, partition: int) -> Allowance:
        allowance = self._allowance(openings_key(partition), None)
        if allowance.partition is None:
            if not self._opening_keys:
                for n in itertools.count():  # a key per partition, for its openings' records
                    key = f"openings-{n}".encode()
                    self._opening_keys.setdefault(self.partition_of(key), key)
                    if len(self._opening_keys) == self.partitions:
                        break
            allowance.partition, allowance.key = partition, self._opening_keys[partition]
        return allowance

    @staticmethod
    def _opening(openings: Allowance, worst: int, now: float, workflow_id: str = "") -> HeldLease | None:
        """An opening of ``openings`` that can make a call of ``worst`` (of ``workflow_id``,
        which it must not have been used for)."""
        for lease in openings.leases:
            if (
                now < lease.deadline and lease.granted >= worst and lease.opened is not None
                and workflow_id not in lease.opened and len(lease.opened) < OPENED_LIMIT
            ):
                return lease
        return None

    def _want_openings(self, worst: int, now: float) -> None:
        """Ask for an opening of each partition where this process holds none; after a
        denial (a workflow of the partition is near its budget), not for a while. One too
        small for a call is kept for smaller ones: asking again for each larger call would
        send a return and a request per call."""
        if not 0 < worst <= self._openings_limit():
            return
        for p in range(self.partitions):
            openings = self._openings(p)
            if not openings.leases and (not openings.denied_at or now - openings.denied_at >= self.lease_seconds):
                self._ask(openings, worst, now)

    def _give_up_openings(self) -> None:
        """This process makes calls larger than all the openings of a partition together
        may be: none would serve it, and what it holds is given back for good."""
        self.opening_share = 0.0
        for allowance in [a for a in self._allowances.values() if a.partition is not None]:
            for lease in allowance.leases:
                self._write(allowance, lease, "return")
            allowance.leases = []
        log.info("model calls larger than cost_guardrails.opening_share of a workflow budget: no openings")

    def _open(self, flow: Allowance, worst: int, now: float) -> HeldLease | None:
        """A lease of ``flow``'s workflow made at once of an opening's share of it, or None."""
        key = flow.scope.encode()
        partition = self.partition_of(key)
        opening = self._opening(self._openings(partition), worst, now, flow.scope)
        if opening is None:
            return None
        assert opening.opened is not None
        opening.opened.add(flow.scope)
        lease = HeldLease(
            f"{opening.lease_id}/{flow.scope}", flow.scope, None, opening.granted,
            deadline=now + 0.8 * self.lease_seconds,
            renew_at=now + self.lease_seconds / 3, last_used=now,
        )
        flow.leases.append(lease)
        self.opened += 1
        record = BudgetRecord(
            budget="open", lease_id=lease.lease_id, scope=flow.scope, want_nanos=opening.granted,
            opening_id=opening.lease_id,
        )
        lease.writing = self._spawn(self._send_open(key, record, partition))
        return lease

    async def _send_open(self, key: bytes, record: BudgetRecord, partition: int) -> None:
        assert self.send is not None
        written, _offset = await self.send(key, encode(record))
        if written != partition:  # the producer partitions differently: openings would not hold
            log.error("a workflow's record went to costs partition %d, not %d: openings off", written, partition)
            self.opening_share = 0.0

    def workflow_room(self, workflow_id: str, now: float | None = None) -> int:
        """The most a new reservation of the workflow may be: its budget less its counted
        spend (and, with long reservations, less what this process has reserved)."""
        now = self.clock() if now is None else now
        known = self.view.workflow_spend(workflow_id)
        if known is not None and now - known.updated_at > self.idle_seconds:
            known = None  # idle long enough to start a new budget period (the cost role agrees)
        room = self.view.workflow_limit - (known.nanos if known is not None else 0)
        room -= self._held_by_openings(workflow_id, known, now)
        if self.long_reservations:
            flow = self._allowances.get((workflow_id, None))
            room -= sum(lease.reserved for lease in flow.leases) if flow else 0
        return room

    def release(self, r: Reservation) -> None:
        """The call failed and cost nothing."""
        for lease in (r.workflow_lease, r.hour_lease):
            if lease is not None:
                lease.reserved -= r.worst_nanos
                lease.calls -= 1
        self._notify()

    def settle(self, r: Reservation, actual_nanos: int) -> None:
        """The call cost ``actual_nanos``: its reservation is replaced by that. The
        workflow lease's share is counted from the call's cost event (which names the
        lease); the hourly lease's is told to the hour's ledger at the next tick."""
        for lease in (r.workflow_lease, r.hour_lease):
            if lease is not None:
                lease.reserved -= r.worst_nanos
                lease.spent += actual_nanos
        if r.hour_lease is not None:
            r.hour_lease.unreported += actual_nanos
        self._notify()

    def delivered(self, r: Reservation, _partition: int = 0, _offset: int = 0) -> None:
        """The call's cost event is in Kafka: its leases may go back."""
        for lease in (r.workflow_lease, r.hour_lease):
            if lease is not None:
                lease.calls -= 1

    def workflow_committed(self, workflow_id: str) -> tuple[int, int]:
        """(spent as the cost role counted it, held here and not spent) for a workflow."""
        known = self.view.workflow_spend(workflow_id)
        flow = self._allowances.get((workflow_id, None))
        held = sum(max(lease.room(), 0) for lease in flow.leases) if flow else 0
        return (known.nanos if known else 0), held

    def in_flight_nanos(self) -> int:
        return sum(lease.reserved for a in self._allowances.values() if a.window is None for lease in a.leases)

    # ------------------------------------------------------------------ leases
    def _ask(self, allowance: Allowance, worst: int, now: float) -> None:
        """Ask for a lease of ``allowance``'s scope, unless a request is unanswered or
        was just denied with nothing changed since."""
        for lease in list(allowance.leases):
            if lease.calls == 0 and (lease.room() < worst or now >= lease.deadline):
                allowance.leases.remove(lease)  # too little left for this call: give it back
                self._write(allowance, lease, "return")
        request = allowance.request
        if request is not None and now - request.sent_at < self.lease_seconds:
            return  # still waiting (a dead cost role: ask again after lease_seconds)
        if allowance.denied_at and not self._room_grew(allowance) and (
            now - allowance.denied_at < RECHECK_SECONDS or self._held(allowance, now)
        ):
            return  # nothing was returned, spent less or expired since: it would be denied again
        if self.send is None:
            return
        lease_id = f"{self.holder}#{next(self._ids)}"
        # Sized to the calls of the last second (enough for lease_seconds / 2 of them), and
        # to an eighth of what the scope has left: far from a limit, one lease lasts long
        # and calls do not wait for grants. The cost role grants at most half the room.
        if self.long_reservations:
            want = self._whole_demand(allowance, worst) if allowance.window is not None else worst
        elif allowance.partition is not None:
            want = 4 * worst  # each workflow's first calls: a few, before its own lease comes
        else:
            want = max(worst * max(4, int(allowance.rate(now) * self.lease_seconds / 2)), self._room(allowance) // 8)
        allowance.request = _Request(lease_id, now)
        record = BudgetRecord(
            budget="request", lease_id=lease_id, scope=allowance.record_scope(),
            window_start=_utc(allowance.window) if allowance.window is not None else None,
            want_nanos=want, least_nanos=worst, overdraft=self.overdraft and allowance.partition is None,
        )
        self._spawn(self._send_request(allowance, allowance.request, record))

    def _whole_demand(self, allowance: Allowance, worst: int) -> int:
        """What a long reservation asks of the hour: the admissions waiting (a batch's
        workflows are admitted together), as many whole ones as the grant can be (half the
        room, see ``grant_size``). A lease larger than the reservations it carries would
        hold the rest for the batch's hours, as one cut mid-reservation would."""
        cap = max(worst, self._room(allowance) // 2)
        want = 0
        for waiting in self._demand.values():
            if want + waiting <= cap:
                want += waiting
        return max(want, worst)

    async def _send_request(self, allowance: Allowance, request: _Request, record: BudgetRecord) -> None:
        assert self.send is not None
        request.where = await self.send(allowance.record_key(), encode(record))
        self._on_view_update()  # the answer may already be in

    def _scope_total(self, allowance: Allowance) -> tuple[dict[str, Lease], int, int, int] | None:
        """(leases, last offset, partition, spent) of the scope as last published."""
        if allowance.partition is not None:
            openings = self.view.openings.get(allowance.partition)
            return (openings.leases, openings.last_offset, openings.partition, 0) if openings else None
        if allowance.window is None:
            wf = self.view.workflow_spend(allowance.scope)
            return (wf.leases, wf.last_offset, wf.partition, wf.nanos) if wf else None
        ledger = self.view.hour_ledger(allowance.window)
        return (ledger.leases, ledger.last_offset, ledger.partition, ledger.nanos) if ledger else None

    def _room(self, allowance: Allowance) -> int:
        """What the scope has left to grant, as last published (the cost role's own rules)."""
        if allowance.partition is not None:
            limit = self._openings_limit()
        elif allowance.window is None:
            limit = self.view.workflow_limit
            known = self.view.workflow_spend(allowance.scope)
            limit -= self._held_by_openings(allowance.scope, known, self.clock())
        else:
            limit = self.view.hour_limit
        total = self._scope_total(allowance)
        if total is None:
            return limit
        leases, _offset, _partition, spent = total
        return Total(spent, leases=leases).room(limit)

    def _openings_limit(self) -> int:
        return openings_limit(self.view.workflow_limit, self.opening_share)

    def _held_by_openings(self, workflow_id: str, known: WorkflowTotal | None, now: float) -> int:
        """What the openings of the workflow's partition hold of it: room it cannot use
        as long as they do."""
        if not self.view.openings:
            return 0
        partition = known.partition if known is not None else self.partition_of(workflow_id.encode())
        openings = self.view.openings.get(partition)
        if openings is None:
            return 0
        opened = known.opened if known is not None else frozenset()
        return openings_held(openings.leases, opened, now, self.lease_seconds)

    def _room_grew(self, allowance: Allowance) -> bool:
        return self._room(allowance) > allowance.denied_room

    def _held(self, allowance: Allowance, now: float) -> bool:
        """A denied hourly scope while the hour's limit is reached: asking again helps only
        once its room grows (a lease returned or expired) or a limit changes."""
        return allowance.window is not None and self.view.hour_paused(now)

    def _on_view_update(self) -> None:
        """Look for the answers to this process's requests. Waiters are woken when one came,
        when the room of a scope that denied one grew, or when a limit or an operator's resume
        changed; otherwise their re-check every second is enough (the spend topic changes
        with every batch of the cost role, and waking every waiting call on each would cost
        more than the calls)."""
        now = self.clock()
        view = self.view
        limits = (view.hour_limit, view.workflow_limit, len(view.resumed_windows))
        answered = limits != self._limits
        self._limits = limits
        for allowance in list(self._allowances.values()):
            request = allowance.request
            if request is None:
                if allowance.denied_at and self._room_grew(allowance):
                    answered = True  # a lease came back, or the spend was less than held
                continue
            total = self._scope_total(allowance)
            if total is None:
                continue
            leases, last_offset, partition, _spent = total
            granted = leases.get(request.lease_id)
            if granted is not None:
                answered = True
                allowance.request = None
                self.granted += allowance.partition is None  # openings are counted in `opened`
                allowance.leases.append(HeldLease(
                    request.lease_id, allowance.scope, allowance.window, granted.granted,
                    deadline=request.sent_at + 0.8 * self.lease_seconds,
                    renew_at=request.sent_at + self.lease_seconds / 3, last_used=now,
                    opened=set() if allowance.partition is not None else None,
                ))
            elif request.where is not None and request.where[0] == partition and last_offset >= request.where[1]:
                answered = True
                allowance.request = None  # counted and not granted: no room now
                allowance.denied_at, allowance.denied_room = now, self._room(allowance)
                self.denied += allowance.partition is None
        if answered:
            self._notify()

    async def tick(self) -> None:
        """Renew the leases in use, return the others, forget what is empty; wake the
        waiters once a denial is a second old (another process may have returned what it
        held without the scope having changed yet), and in a new hour."""
        now = self.clock()
        window = hour_window(now)
        wake = window != self._window or any(
            a.denied_at and a.request is None and now - a.denied_at >= RECHECK_SECONDS and not self._held(a, now)
            for a in self._allowances.values()
        )
        self._window = window
        if self.opening_share and not self._opening_keys and self.send is not None and self.view.caught_up.is_set():
            # Openings and the hour's lease from the start, so that a new process's first
            # calls need not wait for grants either: openings sized for calls of up to a
            # sixteenth of what a partition's openings may hold (larger calls give them back
            # and ask for their own size); an hourly lease not used is returned as idle.
            least = self._openings_limit() // 16
            self._want_openings(least, now)
            if least and window not in self.view.resumed_windows:
                self._ask(self._allowance(HOUR_SCOPE, window), least, now)  # and the hour's lease
        for key, allowance in list(self._allowances.items()):
            current_hour = allowance.window is None or allowance.window == window
            # Calls go under the oldest lease with room: the newest, asked for ahead of
            # need, is in use as long as the scope is.
            scope_used = max((lease.last_used for lease in allowance.leases), default=0.0)
            for lease in list(allowance.leases):
                if allowance.partition is not None:  # an opening: kept (renewed) while this process runs
                    lease.last_used = now if self.opening_share else 0.0  # or given back
                    if lease.opened is not None and len(lease.opened) >= OPENED_LIMIT:
                        lease.last_used = 0.0  # used up: give it back, the next is asked for
                last_used = scope_used if lease is allowance.leases[-1] and allowance.partition is None else lease.last_used
                idle = now - last_used > self.lease_seconds / 2
                spent_out = lease.room() <= 0
                if lease.calls == 0 and (idle or spent_out or not current_hour or now >= lease.deadline):
                    allowance.leases.remove(lease)
                    self._write(allowance, lease, "return")
                elif current_hour and now >= lease.renew_at and now < lease.deadline + 0.2 * self.lease_seconds:
                    # A past hour's lease is not renewed: no call is admitted in that hour any
                    # more, and its calls' spend counts there whether the lease lives or not.
                    lease.renew_at = now + self.lease_seconds / 3
                    lease.deadline = now + 0.8 * self.lease_seconds
                    self._write(allowance, lease, "renew")
                elif lease.unreported:
                    self._write(allowance, lease, None)
            if not allowance.leases and allowance.request is None and not (
                allowance.denied_at and (now - allowance.denied_at < RECHECK_SECONDS or self._held(allowance, now))
            ):
                del self._allowances[key]  # a waiter asks afresh
        if wake:
            self._notify()

    def _write(self, allowance: Allowance, lease: HeldLease, op: str | None) -> None:
        """Write ``lease``'s unreported spend, then ``op`` (renew, return; None: only the
        spend), after the lease's previous records: the ledger must count what a lease
        spent before its return frees the rest."""
        spent, lease.unreported = lease.unreported, 0
        if self.send is None or (not spent and op is None):
            return
        scope, key = allowance.record_scope(), allowance.record_key()
        window = _utc(allowance.window) if allowance.window is not None else None
        records = [BudgetRecord(budget="spend", lease_id=lease.lease_id, scope=scope,
                                window_start=window, spent_nanos=spent)] if spent else []
        if op is not None:
            records.append(BudgetRecord(budget=op, lease_id=lease.lease_id, scope=scope,  # type: ignore[arg-type]
                                        window_start=window))
        previous = lease.writing

        async def write() -> None:
            if previous is not None:
                await asyncio.wait([previous])  # its failure is logged by _done
            assert self.send is not None
            for record in records:
                await self.send(key, encode(record))

        lease.writing = self._spawn(write())

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("writing a budget lease record failed: %s", task.exception())

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        """Return the leases not in use (a stopping worker's calls are over)."""
        for allowance in list(self._allowances.values()):
            for lease in allowance.leases:
                if lease.calls == 0:
                    self._write(allowance, lease, "return")
                elif lease.unreported:
                    self._write(allowance, lease, None)
            allowance.leases = [lease for lease in allowance.leases if lease.calls]
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for task in pending:  # the broker is gone: what was not returned expires
                task.cancel()

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, object]:
        """What /ready shows: the leases held, and how long a request has gone unanswered
        (a dead or lagging cost role grants nothing: calls wait)."""
        now = self.clock()
        waits = [now - a.request.sent_at for a in self._allowances.values() if a.request is not None]
        held = [lease for a in self._allowances.values() for lease in a.leases]
        oldest = max(waits, default=0.0)
        return {
            "leases_held": len(held),
            "leases_held_usd": nanos_to_usd(sum(max(lease.room(), 0) for lease in held)),
            "lease_requests_waiting": len(waits),
            "lease_request_oldest_seconds": round(oldest, 3),
            "grants_stalled": oldest > max(5.0, self.lease_seconds / 2),
        }


def _utc(window: int | None) -> datetime:
    return datetime.fromtimestamp(window or 0, UTC)
