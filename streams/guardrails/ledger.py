"""Idempotent running totals, updated from the costs topic at least once.

Each total remembers the last costs-topic offset it includes, and every total is fed by
a single partition (hour totals are kept per partition; a workflow's events all share
its key's partition). Reading an event twice, after a crash between the table update
and the offset commit, is then recognised and skipped: totals stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Total:
    nanos: int = 0
    last_offset: int = -1
    last_seen: float = 0.0

    def add(self, nanos: int, offset: int, seen: float) -> Total | None:
        """The new total, or None if ``offset`` is already included."""
        if offset <= self.last_offset:
            return None
        return Total(self.nanos + nanos, offset, max(seen, self.last_seen))

    def to_list(self) -> list[float | int]:
        return [self.nanos, self.last_offset, self.last_seen]

    @classmethod
    def from_list(cls, raw: list[float | int] | None) -> Total:
        if not raw:
            return cls()
        nanos, offset, *rest = raw
        return cls(int(nanos), int(offset), float(rest[0]) if rest else 0.0)


def hour_key(scope: str, partition: int) -> str:
    return f"{scope}|p{partition}"


def expired(total: Total, now: float, idle_seconds: float) -> bool:
    return total.last_seen > 0 and now - total.last_seen > idle_seconds
