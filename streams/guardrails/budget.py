"""Reserve a call's worst-case cost before it is made; reconcile with its real cost after.

What a process counts as committed: the spend the cost role has reported, plus what this
process has spent that the cost role has not counted yet, plus its reservations in flight.

- A workflow admits a call only if committed + the call's worst case fits its budget;
  otherwise the request ends as ``budget_exceeded`` (no call). One process alone never
  overspends a workflow budget.
- The hour admits calls while committed is below the hourly limit, then holds them until
  the next window or an operator. The hour's overspend is what was reserved in flight.

Across processes, each one sees the others only through the cost role's totals, so the
cluster can overspend by what the *other* processes had reserved or not yet reported
(see docs/guardrails.md, "The overspend bound").
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field

from streams.guardrails.money import hour_window
from streams.guardrails.view import GuardrailView

RECHECK_SECONDS = 1.0


@dataclass(eq=False, slots=True)
class Reservation:
    workflow_id: str
    window: int
    worst_nanos: int
    # set once the call is settled and its cost event delivered
    actual_nanos: int = 0
    cost_partition: int | None = None
    cost_offset: int | None = None
    settled: bool = False


@dataclass(slots=True)
class _Book:
    reserved: int = 0
    calls: int = 0


@dataclass(slots=True)
class _Unreflected:
    """One workflow's spend settled here that the view's total does not include yet. The
    view includes a delivered cost event once the workflow's total, from the same costs
    partition, reaches its offset: per partition, a heap by offset finds those."""

    nanos: int = 0
    calls: int = 0
    delivered: dict[int, list[tuple[int, int, Reservation]]] = field(default_factory=dict)


class BudgetExceeded(Exception):
    """The workflow's remaining budget cannot cover this call's worst case."""


class BudgetGate:
    def __init__(self, view: GuardrailView) -> None:
        self.view = view
        self._reserved_hour: dict[int, int] = {}
        self._workflows: dict[str, _Book] = {}
        # spent by this process, not yet included in the view's totals: per workflow, and
        # summed per hour window (kept as sums: a burst can leave thousands unreflected)
        self._unreflected: dict[str, _Unreflected] = {}
        self._unreflected_hour: dict[int, int] = {}
        self._order = itertools.count()  # ties in a heap never compare reservations
        # Replaced on every change: waiters hold the one that was current when they looked.
        # (No Condition: on Python 3.11, wait_for() timing out a Condition.wait() can leave
        # its lock released, and the next wait fails.)
        self._changed = asyncio.Event()
        view.listeners.append(self._on_view_update)
        self.waiting = 0

    def _on_view_update(self) -> None:
        for workflow_id in list(self._unreflected):
            self._prune_reflected(workflow_id)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _prune_reflected(self, workflow_id: str) -> None:
        entry = self._unreflected.get(workflow_id)
        total = self.view.workflow_spend(workflow_id)
        if entry is None or total is None:
            return
        # hour and workflow snapshots of one event are written in that order to one partition
        heap = entry.delivered.get(total.partition)
        while heap and heap[0][0] <= total.last_offset:
            r = heapq.heappop(heap)[2]
            entry.nanos -= r.actual_nanos
            entry.calls -= 1
            left = self._unreflected_hour.get(r.window, 0) - r.actual_nanos
            if left:
                self._unreflected_hour[r.window] = left
            else:  # (calls that cost nothing may still be in it: they add nothing)
                self._unreflected_hour.pop(r.window, None)
        if heap is not None and not heap:
            del entry.delivered[total.partition]
        if not entry.calls:
            del self._unreflected[workflow_id]

    def hour_committed(self, window: int) -> int:
        unreflected = self._unreflected_hour.get(window, 0)
        return self.view.hour_spend(window) + unreflected + self._reserved_hour.get(window, 0)

    def workflow_committed(self, workflow_id: str) -> tuple[int, int]:
        """(spent as far as known, reserved in flight here) for a workflow."""
        known = self.view.workflow_spend(workflow_id)
        entry = self._unreflected.get(workflow_id)
        book = self._workflows.get(workflow_id)
        spent = (known.nanos if known else 0) + (entry.nanos if entry else 0)
        return spent, book.reserved if book else 0

    def _try_reserve(self, workflow_id: str, worst: int, now: float) -> Reservation | None:
        view = self.view
        window = hour_window(now)
        spent, reserved = self.workflow_committed(workflow_id)
        if spent + reserved + worst > view.workflow_limit:
            if spent + worst > view.workflow_limit:
                raise BudgetExceeded(workflow_id)
            return None  # may fit once the calls in flight settle below their worst case
        # The hour admits calls until what is spent or reserved reaches the limit, so the
        # limit is reached and the hour pauses; overspend is what was in flight then.
        if window not in view.resumed_windows and self.hour_committed(window) >= view.hour_limit:
            return None  # the hour is spent: wait for the next window or an operator
        reservation = Reservation(workflow_id, window, worst)
        self._reserved_hour[window] = self._reserved_hour.get(window, 0) + worst
        book = self._workflows.setdefault(workflow_id, _Book())
        book.reserved += worst
        book.calls += 1
        return reservation

    async def admit(self, workflow_id: str, worst_nanos: int) -> Reservation:
        """Wait until the call fits; raise :class:`BudgetExceeded` if it never can."""
        await self.view.caught_up.wait()
        self.waiting += 1
        try:
            while True:
                # Checking and reserving do not await: no other task runs in between.
                reservation = self._try_reserve(workflow_id, worst_nanos, time.time())
                if reservation is not None:
                    return reservation
                try:  # re-check at least every second: the hour may roll over
                    await asyncio.wait_for(self._changed.wait(), RECHECK_SECONDS)
                except TimeoutError:
                    pass
        finally:
            self.waiting -= 1

    def _unreserve(self, r: Reservation) -> None:
        self._reserved_hour[r.window] = self._reserved_hour.get(r.window, 0) - r.worst_nanos
        if self._reserved_hour[r.window] <= 0:
            del self._reserved_hour[r.window]
        book = self._workflows[r.workflow_id]
        book.reserved -= r.worst_nanos
        book.calls -= 1
        if not book.calls:
            del self._workflows[r.workflow_id]

    def release(self, r: Reservation) -> None:
        """The call failed and cost nothing."""
        self._unreserve(r)
        self._notify()

    def settle(self, r: Reservation, actual_nanos: int) -> None:
        """The call cost ``actual_nanos``; it counts until the cost role has included it."""
        self._unreserve(r)
        r.actual_nanos = actual_nanos
        r.settled = True
        entry = self._unreflected.setdefault(r.workflow_id, _Unreflected())
        entry.nanos += actual_nanos
        entry.calls += 1
        self._unreflected_hour[r.window] = self._unreflected_hour.get(r.window, 0) + actual_nanos
        self._notify()

    def delivered(self, r: Reservation, partition: int, offset: int) -> None:
        """The call's cost event is in the costs topic at ``partition``/``offset``."""
        r.cost_partition, r.cost_offset = partition, offset
        entry = self._unreflected.get(r.workflow_id)
        if entry is not None:  # (always: settled before its cost event is sent)
            heapq.heappush(entry.delivered.setdefault(partition, []), (offset, next(self._order), r))
            self._prune_reflected(r.workflow_id)
        self._notify()

    def in_flight_nanos(self) -> int:
        return sum(self._reserved_hour.values())
