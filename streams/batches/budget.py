"""A batch's worst case, reserved against its workflows' budgets and the hour before the
batch is recorded, and settled once its items are answered.

A provider's batch may take hours, but what it costs is committed when it is sent. So
the batch role admits a batch through a :class:`~streams.guardrails.budget.BudgetGate`,
as a tier worker admits a call, with long reservations: one per workflow in the batch
(the sum of its items' worst cases at the batch price), held until each of those items
is answered, failed, or answered by another process. A workflow whose budget has no room
for an item ends that item as ``budget_exceeded``; a reached hourly limit makes the batch
wait, as it makes calls wait.

A batch item's cost counts in the hour its reservation was made (its cost event says so,
``window_start``): that hour's limit is what its worst case was taken from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from schemas.models import TieredRequest
from streams.guardrails.budget import BudgetExceeded, BudgetGate, Reservation
from streams.guardrails.money import usd_to_nanos
from streams.pricing import PriceBook
from streams.tokens import estimate_input_tokens

log = logging.getLogger(__name__)

# Once one workflow of a batch is reserved, how long the others may still take before the
# batch goes without them (they wait for a later one): the hour's room may be held by this
# batch's own reservations, which only its answers free.
ADMISSION_PATIENCE_SECONDS = 5.0
RECHECK_SECONDS = 1.0


class Rebalanced(Exception):
    """A rebalance began while a batch waited (for budget, or room in the provider's queue)."""


@dataclass(eq=False, slots=True)
class _Held:
    """One workflow's reservation for some of a batch's items."""

    reservation: Reservation
    pending: set[str]  # request ids not answered yet
    actual: int = 0


@dataclass(slots=True)
class Admission:
    admitted: list[TieredRequest] = field(default_factory=list)
    exceeded: list[TieredRequest] = field(default_factory=list)  # their workflow's budget has no room
    waiting: list[TieredRequest] = field(default_factory=list)  # not reserved yet: ask again

    def in_order_of(self, requests: list[TieredRequest]) -> None:
        """Put each list in the order of ``requests``: reservations complete in any order,
        and a batch keeps the order its requests arrived in."""
        position = {id(r): n for n, r in enumerate(requests)}
        for members in (self.admitted, self.exceeded, self.waiting):
            members.sort(key=lambda r: position[id(r)])


class BatchBudget:
    """What the batch role holds of the budgets: a reservation per workflow of each batch,
    until its items are answered."""

    def __init__(self, gate: BudgetGate, prices: PriceBook, price_factor: float,
                 patience: float = ADMISSION_PATIENCE_SECONDS) -> None:
        self.gate = gate
        self.prices = prices
        self.price_factor = Decimal(str(price_factor))
        self.patience = patience
        self._held: dict[str, _Held] = {}  # request_id -> its workflow's reservation

    def worst(self, request: TieredRequest, provider: str, model: str) -> int:
        worst = self.prices.worst_case(provider, model, estimate_input_tokens(request), request.max_output_tokens)
        return usd_to_nanos(worst * self.price_factor)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    async def reserve(
        self, requests: Iterable[TieredRequest], provider: str, model: str,
        rebalanced: Callable[[], bool], give_up: float | None = None,
    ) -> Admission:
        """Reserve the worst case of ``requests``, one reservation per workflow. Returns when
        every workflow was reserved or refused, ``patience`` seconds after the first was
        reserved, or after ``give_up`` seconds, whichever comes first; raises
        :class:`Rebalanced` (having released what it reserved) if ``rebalanced()`` says so
        while it waits."""
        result = Admission()
        requests = list(requests)
        groups: dict[str, list[TieredRequest]] = {}
        for request in requests:
            groups.setdefault(request.workflow_id, []).append(request)
        tasks: dict[asyncio.Task[Reservation], list[TieredRequest]] = {}
        for workflow_id, members in groups.items():
            room, total, fits = self.gate.workflow_room(workflow_id), 0, []
            for request in members:  # in order, each that still fits
                worst = self.worst(request, provider, model)
                if total + worst <= room:
                    fits.append(request)
                    total += worst
                else:
                    result.exceeded.append(request)
            if fits:
                tasks[asyncio.create_task(self.gate.admit(workflow_id, total))] = fits
        clock = self.gate.clock  # the gate's time: patience is counted as its leases are
        deadline = None if give_up is None else clock() + give_up
        pending = set(tasks)
        try:
            while pending:
                timeout = RECHECK_SECONDS if deadline is None else min(RECHECK_SECONDS, deadline - clock())
                done, pending = await asyncio.wait(
                    pending, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED)
                self._take(done, tasks, result)
                if rebalanced():
                    raise Rebalanced
                if result.admitted and deadline is None:
                    deadline = clock() + self.patience
                if deadline is not None and clock() >= deadline:
                    break
            self._take(await _cancelled(pending), tasks, result)
        except BaseException:
            self._take(await _cancelled(pending), tasks, result)
            self.answered(dict.fromkeys((r.request_id for r in result.admitted), 0))
            raise
        result.in_order_of(requests)
        return result

    def _take(
        self, done: Iterable[asyncio.Task[Reservation]], tasks: dict[asyncio.Task[Reservation], list[TieredRequest]],
        result: Admission,
    ) -> None:
        for task in done:
            members = tasks[task]
            if task.cancelled():
                result.waiting.extend(members)
            elif isinstance(task.exception(), BudgetExceeded):
                result.waiting.extend(members)  # its spend grew meanwhile: sized again next time
            else:
                self._hold(task.result(), members)
                result.admitted.extend(members)

    def _hold(self, reservation: Reservation, members: list[TieredRequest]) -> None:
        held = _Held(reservation, {r.request_id for r in members})
        for request in members:
            self._held[request.request_id] = held

    def cost_fields(self, request_id: str, created_at: datetime) -> dict[str, object]:
        """What a batch item's cost event says of its reservation: the workflow lease it was
        admitted under, and the hour it counts in (its job's, when this process holds none:
        it was reserved by a process that stopped since)."""
        held = self._held.get(request_id)
        if held is None:
            hour = created_at.replace(minute=0, second=0, microsecond=0)
            return {"window_start": hour}
        r = held.reservation
        return {"lease_id": r.workflow_lease.lease_id, "window_start": datetime.fromtimestamp(r.window, UTC)}

    def answered(self, costs: dict[str, int]) -> None:
        """Items answered (``request_id`` -> what it cost, 0 for a failed one): a workflow's
        reservation is settled once all its items are (its items' cost events, written
        already, name its workflow lease; the hour's ledger is told by the gate's tick)."""
        for request_id, nanos in costs.items():
            held = self._held.pop(request_id, None)
            if held is None:
                continue
            held.pending.discard(request_id)
            held.actual += nanos
            if held.pending:
                continue
            if held.actual == 0:
                self.gate.release(held.reservation)
            else:
                self.gate.settle(held.reservation, held.actual)
                self.gate.delivered(held.reservation)

    def forget(self, still_open: Callable[[str], bool]) -> None:
        """Settle what this process holds for items no open batch carries any more (another
        process answered them after a rebalance): they were counted without a lease."""
        gone = [request_id for request_id in self._held if not still_open(request_id)]
        self.answered(dict.fromkeys(gone, 0))


async def _cancelled(tasks: set[asyncio.Task[Reservation]]) -> set[asyncio.Task[Reservation]]:
    """``tasks``, cancelled and ended; one may have made its reservation meanwhile."""
    for task in tasks:
        task.cancel()  # an admission cancelled while it waits has reserved nothing
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    return tasks


__all__ = ["ADMISSION_PATIENCE_SECONDS", "Admission", "BatchBudget", "Rebalanced"]
