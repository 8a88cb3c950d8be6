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
(see README, "Cost guardrails").
"""

from __future__ import annotations

import asyncio
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


@dataclass
class _Book:
    reserved: int = 0
    entries: list[Reservation] = field(default_factory=list)


class BudgetExceeded(Exception):
    """The workflow's remaining budget cannot cover this call's worst case."""


class BudgetGate:
    def __init__(self, view: GuardrailView) -> None:
        self.view = view
        self._reserved_hour: dict[int, int] = {}
        self._workflows: dict[str, _Book] = {}
        # spent by this process, not yet included in the view's totals
        self._unreflected: list[Reservation] = []
        # Replaced on every change: waiters hold the one that was current when they looked.
        # (No Condition: on Python 3.11, wait_for() timing out a Condition.wait() can leave
        # its lock released, and the next wait fails.)
        self._changed = asyncio.Event()
        view.listeners.append(self._on_view_update)
        self.waiting = 0

    def _on_view_update(self) -> None:
        self._prune_reflected()
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _reflected(self, r: Reservation) -> bool:
        if r.cost_partition is None or r.cost_offset is None:
            return False
        total = self.view.workflow_spend(r.workflow_id)
        # hour and workflow snapshots of one event are written in that order to one partition
        return total is not None and total.partition == r.cost_partition and total.last_offset >= r.cost_offset

    def _prune_reflected(self) -> None:
        self._unreflected = [r for r in self._unreflected if not self._reflected(r)]

    def hour_committed(self, window: int) -> int:
        unreflected = sum(r.actual_nanos for r in self._unreflected if r.window == window)
        return self.view.hour_spend(window) + unreflected + self._reserved_hour.get(window, 0)

    def workflow_committed(self, workflow_id: str) -> tuple[int, int]:
        """(spent as far as known, reserved in flight here) for a workflow."""
        known = self.view.workflow_spend(workflow_id)
        unreflected = sum(r.actual_nanos for r in self._unreflected if r.workflow_id == workflow_id)
        book = self._workflows.get(workflow_id)
        return (known.nanos if known else 0) + unreflected, book.reserved if book else 0

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
        book.entries.append(reservation)
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
        book.entries.remove(r)
        if not book.entries:
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
        self._unreflected.append(r)
        self._notify()

    def delivered(self, r: Reservation, partition: int, offset: int) -> None:
        """The call's cost event is in the costs topic at ``partition``/``offset``."""
        r.cost_partition, r.cost_offset = partition, offset
        self._prune_reflected()
        self._notify()

    def in_flight_nanos(self) -> int:
        return sum(self._reserved_hour.values())
