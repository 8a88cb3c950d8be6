"""Idempotent running totals, updated from the costs topic at least once, and the budget
leases granted against them.

Each total remembers the last costs-topic offset it includes, and every total is fed by
a single partition (hour totals are kept per partition; a workflow's events all share
its key's partition; an hour's lease records all share the key ``hour``). Reading an
event twice, after a crash between the table update and the offset commit, is then
recognised and skipped: totals stay exact.

A scope's leases live in its total, so they are granted, spent, renewed, returned and
expired in the order of the scope's partition, and published with its total
(:func:`apply_budget`). What is outstanding, granted but not yet spent, is reserved:

    room = limit - spent - sum(granted - spent of each outstanding lease)

A lease is granted only out of the room, so the spend of every holder together stays
within the limit as long as each spends only what it holds; an overdraft (see
:func:`grant_size`) lets it pass the limit by at most one call's worst case.

Openings are leases of a costs partition (scope :data:`OPENINGS_SCOPE`): each holds its
share of every workflow of the partition, so a worker can make the first call of a
workflow it holds nothing of without waiting for a grant. A workflow's room counts every
opening not yet turned into a lease of it (``open``, :meth:`Total.open`); an opening is
granted only when every workflow of the partition has room for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Lease(NamedTuple):
    granted: int
    spent: int
    renewed: float  # epoch seconds: the timestamp of its request or last renewal

    def outstanding(self) -> int:
        return max(self.granted - self.spent, 0)


@dataclass(frozen=True, slots=True)
class Total:
    nanos: int = 0
    last_offset: int = -1
    last_seen: float = 0.0
    leases: dict[str, Lease] = field(default_factory=dict)
    # The openings turned into leases of this workflow: they hold nothing more of it.
    opened: frozenset[str] = frozenset()

    def add(self, nanos: int, offset: int, seen: float, lease_id: str | None = None) -> Total | None:
        """The new total, or None if ``offset`` is already included. ``lease_id``: the
        lease the spend was admitted under, which it also counts against."""
        if offset <= self.last_offset:
            return None
        leases = self.leases
        lease = leases.get(lease_id) if lease_id is not None else None
        if lease is not None:
            leases = {**leases, lease_id: lease._replace(spent=lease.spent + nanos)}  # type: ignore[dict-item]
        return Total(self.nanos + nanos, offset, max(seen, self.last_seen), leases, self.opened)

    def outstanding(self) -> int:
        return sum(lease.outstanding() for lease in self.leases.values())

    def room(self, limit: int) -> int:
        return limit - self.nanos - self.outstanding()

    def open(self, lease_id: str, opening_id: str, granted: int, offset: int, at: float) -> Total | None:
        """The total once ``opening_id``'s share of this workflow is the lease ``lease_id``:
        what the opening held of the room, the lease now holds. None if ``offset`` is
        already included."""
        if offset <= self.last_offset:
            return None
        leases = self.leases
        if opening_id not in self.opened:
            leases = {**leases, lease_id: Lease(granted, 0, at)}
        return Total(self.nanos, offset, max(self.last_seen, at), leases, self.opened | {opening_id})

    def to_list(self) -> list[Any]:
        value: list[Any] = [self.nanos, self.last_offset, self.last_seen]
        if self.leases or self.opened:
            value.append({k: list(v) for k, v in self.leases.items()})
        if self.opened:
            value.append(sorted(self.opened))
        return value

    @classmethod
    def from_list(cls, raw: list[Any] | None) -> Total:
        if not raw:
            return cls()
        nanos, offset, *rest = raw
        leases = {k: Lease(int(g), int(s), float(r)) for k, (g, s, r) in rest[1].items()} if len(rest) > 1 else {}
        opened = frozenset(rest[2]) if len(rest) > 2 else frozenset()
        return cls(int(nanos), int(offset), float(rest[0]) if rest else 0.0, leases, opened)


def grant_size(want: int, least: int, room: int, overdraft: bool = False) -> int:
    """What a request is granted: at most half the room unless that is less than
    ``least`` (so the holders of one scope share it, and a scope can be spent to its last
    worst-case call), and nothing when not even ``least`` fits.

    An ``overdraft`` request (one call's worst case as ``least``) is granted ``least``
    when the room is above zero but below it. The grant takes the room below zero, so no
    other is made until spend or returns bring it back above: what the scope's holders
    spend stays within its limit plus one call's worst case, and the last of the room
    is spent instead of left unusable."""
    if least <= 0:
        return 0
    if room < least:
        return least if overdraft and room > 0 else 0
    return min(want, max(least, room // 2))


def apply_budget(
    total: Total, op: str, lease_id: str, offset: int, at: float, *,
    limit: int, lease_seconds: float, want: int = 0, least: int = 0, spent: int = 0, overdraft: bool = False,
) -> Total | None:
    """``total`` after one budget record at ``offset`` and timestamp ``at``; None if the
    offset is already included. Leases not renewed within ``lease_seconds`` of ``at``
    expire first: their holder stopped (a SIGKILL), and what they did not spend is free
    again. Every record of the holder precedes them in the partition, so what they
    spent is counted."""
    if offset <= total.last_offset:
        return None
    leases = {k: v for k, v in total.leases.items() if at - v.renewed <= lease_seconds}
    nanos = total.nanos
    lease = leases.get(lease_id)
    if op == "request" and lease is None:
        current = Total(nanos, offset, total.last_seen, leases, total.opened)
        # A call larger than the whole limit could never fit: it is not overdrawn either.
        granted = grant_size(want, least, current.room(limit), overdraft and least <= limit)
        if granted:
            leases[lease_id] = Lease(granted, 0, at)
    elif op == "renew" and lease is not None:
        leases[lease_id] = lease._replace(renewed=max(lease.renewed, at))
    elif op == "return":
        leases.pop(lease_id, None)
    elif op == "spend":
        nanos += spent
        if lease is not None:
            leases[lease_id] = lease._replace(spent=lease.spent + spent)
    return Total(nanos, offset, max(total.last_seen, at), leases, total.opened)


OPENINGS_SCOPE = "~openings"  # not a workflow_id: those begin with a letter or a digit


def openings_key(partition: int) -> str:
    """The cost role's key for the openings of one costs partition."""
    return f"{OPENINGS_SCOPE}|p{partition}"


def openings_limit(workflow_limit: int, opening_share: float) -> int:
    """The most the openings of one costs partition hold together: their share of the
    workflow budget (the cost role grants no more; a gate asks for no more)."""
    return int(workflow_limit * opening_share)


def openings_held(openings: dict[str, Lease], opened: frozenset[str], at: float, lease_seconds: float) -> int:
    """What a partition's openings hold of one of its workflows at ``at``: each opening
    neither turned into a lease of it (``opened``) nor expired."""
    return sum(
        lease.outstanding() for lease_id, lease in openings.items()
        if lease_id not in opened and at - lease.renewed <= lease_seconds
    )


def hour_key(scope: str, partition: int) -> str:
    return f"{scope}|p{partition}"


def expired(total: Total, now: float, idle_seconds: float) -> bool:
    return total.last_seen > 0 and now - total.last_seen > idle_seconds
