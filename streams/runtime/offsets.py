"""One offset state machine: the next offset each partition must see, so that none is skipped.

Two readers rely on it. The consumer's fetch loop (:mod:`streams.runtime.transport`)
decides which fetched records reach the streams; the cost role decides which cost events
it counts, starting where the published totals end. Both face the same cases: the record
expected next, a replay below it, and a hole above it, after which the reader seeks back
and must ignore what was fetched before that seek until the first missing offset arrives.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)  # a partition: a TP in the transport, a number in the cost role


class Verdict(enum.Enum):
    DELIVER = "deliver"  # the offset expected next
    GONE = "gone"  # deliver: the records before it no longer exist (retention)
    REPLAY = "replay"  # below the expected offset: seen already
    HOLE = "hole"  # above it: records were skipped; the reader is to seek back (rewind)
    REWINDING = "rewinding"  # fetched before the seek back: it comes again


@dataclass(slots=True)
class _Rewind:
    to: int
    fetch: int | None
    at: float


class OffsetOrder(Generic[K]):
    """Where each partition is to be read next.

    ``start(key)`` gives the position of a partition nothing was said of (None: take its
    first record). After a :attr:`Verdict.HOLE` the reader calls :meth:`rewind` and seeks
    back. Until the first missing offset arrives, records above it were fetched before the
    seek and are ignored; readers that number their fetches say so, and then the first
    record of a later fetch is where the seek landed (above the target only if the records
    between are gone). Readers that cannot tell repeat a seek that has not been answered
    (:meth:`overdue`): a seek made from outside the consumer's own task can be overtaken by
    a fetch under way.
    """

    def __init__(self, start: Callable[[K], int | None] | None = None) -> None:
        self._start = start
        self._next: dict[K, int] = {}
        self._rewinds: dict[K, _Rewind] = {}

    def reset(self, positions: Mapping[K, int | None]) -> None:
        """The reader now reads these partitions from these offsets (None: unknown)."""
        for key, offset in positions.items():
            self._rewinds.pop(key, None)
            if offset is None:
                self._next.pop(key, None)
            else:
                self._next[key] = offset

    def forget(self, keys: Iterable[K]) -> None:
        self.reset(dict.fromkeys(keys))

    def clear(self) -> None:
        self._next.clear()
        self._rewinds.clear()

    def expected(self, key: K) -> int | None:
        found = self._next.get(key)
        if found is None and self._start is not None:
            return self._start(key)
        return found

    def rewinding(self, key: K) -> bool:
        return key in self._rewinds

    def admit(self, key: K, offset: int, fetch: int | None = None) -> Verdict:
        """What to do with the record at ``offset`` (in fetch number ``fetch``, if the
        reader numbers them); DELIVER and GONE move the position past it."""
        rewind = self._rewinds.get(key)
        if rewind is not None:
            if offset < rewind.to:
                return Verdict.REPLAY
            if offset > rewind.to and (rewind.fetch is None or fetch == rewind.fetch):
                return Verdict.REWINDING
            del self._rewinds[key]
            self._next[key] = offset + 1
            return Verdict.DELIVER if offset == rewind.to else Verdict.GONE
        expected = self.expected(key)
        if expected is None or offset == expected:
            self._next[key] = offset + 1
            return Verdict.DELIVER
        return Verdict.REPLAY if offset < expected else Verdict.HOLE

    def passed(self, key: K, offset: int) -> None:
        """Records up to ``offset`` need not come (they no longer exist)."""
        self._rewinds.pop(key, None)
        self._next[key] = max(self._next.get(key, 0), offset + 1)

    def rewind(self, key: K, to: int, fetch: int | None = None, now: float | None = None) -> None:
        """The reader seeks ``key`` back to ``to``; ``fetch``: the number of the fetch that
        showed the hole."""
        self._rewinds[key] = _Rewind(to, fetch, time.monotonic() if now is None else now)

    def overdue(self, patience: float, now: float | None = None) -> list[tuple[K, int]]:
        """The rewinds still unanswered ``patience`` seconds after their seek, as
        (partition, offset) to seek again; their clocks restart."""
        now = time.monotonic() if now is None else now
        due = []
        for key, rewind in self._rewinds.items():
            if now - rewind.at >= patience:
                rewind.at = now
                due.append((key, rewind.to))
        return due
