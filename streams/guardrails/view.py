"""Every process's view of the cluster's spend and guardrail state, rebuilt from Kafka.

A group-less consumer reads the compacted spend and guardrails topics from the start, so
a new or restarted worker knows the hour's spend, each workflow's spend, the operator's
limits and resumes before it admits a single model call (``caught_up``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas.codec import DecodeError, decode
from schemas.models import GuardrailEvent, SpendSnapshot
from streams.guardrails.ledger import Lease
from streams.guardrails.money import hour_window, nanos_to_usd, usd_to_nanos
from streams.tail import TopicTail
from topologies.config import Settings
from topologies.topics import topology_of

log = logging.getLogger(__name__)


LEDGER = "ledger"  # the hour scope whose total and leases the hour's lease records keep


@dataclass(frozen=True, slots=True)
class PartTotal:
    nanos: int
    last_offset: int
    partition: int = 0
    leases: dict[str, Lease] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class WorkflowTotal:
    nanos: int
    partition: int
    last_offset: int
    # When the cost role published it (epoch seconds): how long the workflow has been idle.
    updated_at: float = field(default=0.0, compare=False)
    leases: dict[str, Lease] = field(default_factory=dict, compare=False)
    opened: frozenset[str] = field(default=frozenset(), compare=False)


class GuardrailView:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = topology_of(settings)
        guard = settings.cost_guardrails
        self.hour_limit = usd_to_nanos(guard.max_cost_per_hour_usd)
        self.workflow_limit = usd_to_nanos(guard.max_cost_per_workflow_usd)
        self.alert_threshold = usd_to_nanos(guard.alert_threshold_usd)
        # (window_start, scope, partition) -> total; only the newest windows are kept
        self.hours: dict[tuple[int, str, int], PartTotal] = {}
        self.workflows: dict[str, WorkflowTotal] = {}
        self.openings: dict[int, PartTotal] = {}  # costs partition -> its openings (streams.guardrails.ledger)
        self.resumed_windows: set[int] = set()
        # hour window -> the limit it was reached at: the spend left no room for a call
        # (it stays below the limit when every call is admitted under a lease)
        self.limit_reached: dict[int, int] = {}
        self.costs_applied: dict[int, int] = {}  # costs partition -> last offset counted
        self._tail = TopicTail(settings, [self.topology.spend.name, self.topology.guardrails.name], self.apply)
        self.caught_up = self._tail.caught_up
        self.listeners: list[Callable[[], None]] = self._tail.listeners
        self._logged: asyncio.Task[None] | None = None
        # More to show on /ready (the budget leases this process holds)
        self.reporters: list[Callable[[], dict[str, object]]] = []

    # ------------------------------------------------------------------ state
    def apply(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        try:
            if topic == self.topology.spend.name:
                self._apply_spend(decode(value, SpendSnapshot))
            else:
                self._apply_guardrail(decode(value, GuardrailEvent))
        except DecodeError as exc:
            log.warning("ignoring an undecodable message on %s: %s", topic, exc.reason)

    def _apply_spend(self, snap: SpendSnapshot) -> None:
        # Every snapshot says the last costs offset its total includes; the cost role's
        # snapshots of one partition are written in offset order.
        self.costs_applied[snap.partition] = max(self.costs_applied.get(snap.partition, -1), snap.last_offset)
        leases = {k: Lease(v.granted_nanos, v.spent_nanos, v.renewed_at) for k, v in snap.leases.items()}
        if snap.kind == "hour" and snap.window_start is not None:
            window = int(snap.window_start.timestamp())
            self.hours[(window, snap.scope, snap.partition)] = PartTotal(
                snap.spent_nanos, snap.last_offset, snap.partition, leases
            )
            self._forget_old_windows(window)
        elif snap.kind == "workflow":
            self.workflows[snap.scope] = WorkflowTotal(
                snap.spent_nanos, snap.partition, snap.last_offset, snap.updated_at.timestamp(), leases,
                frozenset(snap.opened),
            )
        elif snap.kind == "openings":
            self.openings[snap.partition] = PartTotal(snap.spent_nanos, snap.last_offset, snap.partition, leases)

    def _forget_old_windows(self, newest: int) -> None:
        if len(self.hours) > 512:
            self.hours = {k: v for k, v in self.hours.items() if k[0] >= newest - 7200}

    def _apply_guardrail(self, event: GuardrailEvent) -> None:
        if event.kind == "limit_set" and event.scope == "limit:hour":
            self.hour_limit = usd_to_nanos(event.limit_usd)
        elif event.kind == "limit_set" and event.scope == "limit:workflow":
            self.workflow_limit = usd_to_nanos(event.limit_usd)
        elif event.kind == "limit_set" and event.scope == "limit:alert":
            self.alert_threshold = usd_to_nanos(event.limit_usd)
        elif event.scope == "resume:hour" and event.window_start is not None:
            self.resumed_windows.add(int(event.window_start.timestamp()))
        elif event.scope == "hour" and event.kind == "limit_reached" and event.window_start is not None:
            window = int(event.window_start.timestamp())
            self.limit_reached[window] = max(self.limit_reached.get(window, 0), usd_to_nanos(event.limit_usd))

    # ---------------------------------------------------------------- queries
    def hour_spend(self, window: int, scope: str = "global") -> int:
        return sum(t.nanos for (w, s, _), t in self.hours.items() if w == window and s == scope)

    def hour_part(self, window: int, partition: int, scope: str = "global") -> PartTotal | None:
        return self.hours.get((window, scope, partition))

    def hour_ledger(self, window: int) -> PartTotal | None:
        """The hour's lease ledger: the spend of calls made under hourly leases, and the
        leases outstanding (kept by the partition the key ``hour`` goes to)."""
        found = [t for (w, s, _), t in self.hours.items() if w == window and s == LEDGER]
        return max(found, key=lambda t: t.last_offset) if found else None

    def workflow_spend(self, workflow_id: str) -> WorkflowTotal | None:
        return self.workflows.get(workflow_id)

    def alerting(self, now: float | None = None) -> bool:
        """The hour's spend has reached the alert threshold."""
        return self.hour_spend(hour_window(time.time() if now is None else now)) >= self.alert_threshold

    def hour_paused(self, now: float | None = None) -> bool:
        window = hour_window(time.time() if now is None else now)
        if window in self.resumed_windows:
            return False
        return self.hour_spend(window) >= self.hour_limit or self.limit_reached.get(window, -1) >= self.hour_limit

    def summary(self, now: float | None = None) -> dict[str, object]:
        """The hour's state, bounded in size (no workflow ids): what ``/ready`` shows."""
        now = time.time() if now is None else now
        window = hour_window(now)
        spent = self.hour_spend(window)
        return {
            "window_start": window,
            "hour_spent_usd": nanos_to_usd(spent),
            "hour_limit_usd": nanos_to_usd(self.hour_limit),
            "alert_threshold_usd": nanos_to_usd(self.alert_threshold),
            "alerting": spent >= self.alert_threshold,
            "paused": self.hour_paused(now),
            "resumed_by_operator": window in self.resumed_windows,
            "caught_up": self.caught_up.is_set(),
            **{k: v for report in self.reporters for k, v in report().items()},
        }

    def status(self, now: float | None = None) -> dict[str, object]:
        """The summary and the workflows out of budget: what ``guardrail status`` prints."""
        blocked = sorted(w for w, t in self.workflows.items() if t.nanos >= self.workflow_limit)
        return {
            **self.summary(now),
            "workflow_limit_usd": nanos_to_usd(self.workflow_limit),
            "blocked_workflows": blocked,
            "leases": self.leases_by_holder(now),
        }

    def leases_by_holder(self, now: float | None = None) -> dict[str, dict[str, float | int]]:
        """The outstanding budget leases, per holder: the hour's (this window), the
        workflows' (how many, and what is granted and not yet spent), and its openings'
        (what each holds of every workflow of its partition)."""
        now = time.time() if now is None else now
        holders: dict[str, dict[str, float | int]] = {}

        ttl = self.settings.cost_guardrails.lease_seconds

        def add(lease_id: str, lease: Lease, kind: str) -> None:
            if now - lease.renewed > ttl:
                return  # expired: free again at the scope's next record
            entry = holders.setdefault(lease_id.rpartition("#")[0] or lease_id, {
                "hour_outstanding_usd": 0.0, "workflow_leases": 0, "workflow_outstanding_usd": 0.0,
                "opening_outstanding_usd": 0.0,
            })
            entry[f"{kind}_outstanding_usd"] = round(
                float(entry[f"{kind}_outstanding_usd"]) + nanos_to_usd(lease.outstanding()), 9
            )
            if kind == "workflow":
                entry["workflow_leases"] = int(entry["workflow_leases"]) + 1

        ledger = self.hour_ledger(hour_window(now))
        for lease_id, lease in (ledger.leases if ledger else {}).items():
            add(lease_id, lease, "hour")
        for total in list(self.workflows.values()):
            for lease_id, lease in total.leases.items():
                add(lease_id, lease, "workflow")
        for openings in list(self.openings.values()):
            for lease_id, lease in openings.leases.items():
                add(lease_id, lease, "opening")
        return holders

    # ------------------------------------------------------------- consuming
    async def start(self) -> None:
        await self._tail.start()
        self._logged = asyncio.create_task(self._log_caught_up())

    async def _log_caught_up(self) -> None:
        await self.caught_up.wait()
        log.info("guardrail state read from Kafka (%d messages): %s", self._tail.read, self.status())

    async def stop(self) -> None:
        await self._tail.stop()
