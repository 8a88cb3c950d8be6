"""Unit tests of the cost guardrails without a broker: money, ledger totals, the view, the gate.

The view is fed encoded messages through ``apply`` exactly as its consumer would, and its
listeners are called by hand afterwards (as ``TopicTail._run`` does after a batch).
The gate's clock is pinned to a fixed instant so no test depends on the wall-clock hour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest

from schemas.codec import encode
from schemas.models import GuardrailEvent, SpendSnapshot
from streams.guardrails import budget as budget_mod
from streams.guardrails.budget import BudgetExceeded, BudgetGate, Reservation
from streams.guardrails.ledger import Total, expired, hour_key
from streams.guardrails.money import HOUR_SECONDS, hour_window, nanos_to_usd, usd_to_nanos
from streams.guardrails.view import GuardrailView, PartTotal, WorkflowTotal
from tests.support import wait_until
from topologies.config import load_settings
from topologies.topics import Topology

NOW = 1_700_000_000.0 + 1234.5  # a fixed instant, well inside its hour
WINDOW = hour_window(NOW)
OTHER_WINDOW = WINDOW - HOUR_SECONDS
USD = 1_000_000_000  # nanos


# --------------------------------------------------------------------------- helpers
def make_view(
    hour_usd: str = "1.0", workflow_usd: str = "1.0", alert_usd: str = "0.5"
) -> GuardrailView:
    settings = load_settings(
        environ={
            "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": hour_usd,
            "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD": workflow_usd,
            "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": alert_usd,
        }
    )
    return GuardrailView(settings)


def spend_topic(view: GuardrailView) -> str:
    return Topology(view.settings).spend.name


def guard_topic(view: GuardrailView) -> str:
    return Topology(view.settings).guardrails.name


def hour_snap(nanos: int, partition: int, offset: int, window: int = WINDOW, scope: str = "global") -> bytes:
    return encode(SpendSnapshot(
        kind="hour", scope=scope, partition=partition, spent_nanos=nanos, last_offset=offset,
        window_start=datetime.fromtimestamp(window, UTC),
    ))


def wf_snap(workflow_id: str, nanos: int, partition: int, offset: int) -> bytes:
    return encode(SpendSnapshot(
        kind="workflow", scope=workflow_id, partition=partition, spent_nanos=nanos, last_offset=offset,
    ))


def limit_set(name: str, usd: float) -> bytes:
    return encode(GuardrailEvent(
        scope=f"limit:{name}", kind="limit_set", action="set_limit", spent_usd=0.0,
        limit_usd=usd, reason="test",
    ))


def resume(window: int) -> bytes:
    return encode(GuardrailEvent(
        scope="resume:hour", kind="cleared", action="resume", spent_usd=0.0, limit_usd=0.0,
        window_start=datetime.fromtimestamp(window, UTC),
        window_end=datetime.fromtimestamp(window + HOUR_SECONDS, UTC), reason="test",
    ))


def feed(view: GuardrailView, topic: str, *values: bytes) -> None:
    """Apply messages, then call the listeners, as the view's consumer loop does."""
    for value in values:
        view.apply(topic, value)
    for listener in view.listeners:
        listener()


async def blocked_in_admit(gate: BudgetGate, task: asyncio.Task[Reservation], waiters: int = 1) -> None:
    """Wait until ``task`` is parked inside admit's re-check loop (or has finished)."""
    await wait_until(lambda: task.done() or gate.waiting >= waiters, 5, "admit to wait", interval=0)
    assert not task.done(), "admit returned (or raised) instead of waiting"


def count_attempts(gate: BudgetGate) -> list[int]:
    """Count the gate's admission checks, to know a waiter has re-checked (and still waits)."""
    attempts = [0]
    original = gate._try_reserve

    def counted(*args: object) -> Reservation | None:
        attempts[0] += 1
        return original(*args)  # type: ignore[arg-type]

    gate._try_reserve = counted  # type: ignore[method-assign]
    return attempts


async def rechecked_and_still_waiting(
    gate: BudgetGate, task: asyncio.Task[Reservation], attempts: list[int], before: int
) -> None:
    await wait_until(lambda: task.done() or (attempts[0] > before and gate.waiting >= 1), 5, "admit to check again",
                     interval=0)
    assert not task.done(), "the waiter was admitted (or raised) on re-check"


@pytest.fixture
def pinned_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Only the gate's module sees the fixed clock; asyncio keeps its monotonic clock.
    monkeypatch.setattr(budget_mod, "time", SimpleNamespace(time=lambda: NOW))
    yield


@pytest.fixture
def no_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the periodic re-check too slow to matter: a waiter proceeds only when notified."""
    monkeypatch.setattr(budget_mod, "RECHECK_SECONDS", 3600.0)


def ready_gate(view: GuardrailView) -> BudgetGate:
    view.caught_up.set()
    return BudgetGate(view)


# ----------------------------------------------------------------------------- money
@pytest.mark.parametrize(
    ("usd", "nanos"),
    [
        (0.000123456, 123_456),
        (0.000000001, 1),
        (1.23e-07, 123),
        (0.1, 100_000_000),
        (0.3, 300_000_000),
        (12.345678901, 12_345_678_901),
        (2.01, 2_010_000_000),  # 2.01 * 1e9 is 2009999999.9999998 in floats
        (8.2, 8_200_000_000),
        (50.0, 50_000_000_000),
        (0.0, 0),
    ],
)
def test_usd_to_nanos_is_exact_for_prices_quantized_to_a_nano(usd: float, nanos: int) -> None:
    assert usd_to_nanos(usd) == nanos
    assert usd_to_nanos(Decimal(str(usd))) == nanos
    assert nanos_to_usd(nanos) == pytest.approx(usd, abs=0, rel=1e-15)
    assert usd_to_nanos(nanos_to_usd(nanos)) == nanos


def test_nanos_sum_is_exact_where_float_sum_drifts() -> None:
    # 0.1 + 0.2 != 0.3 in floats; in nanos the sum is exact.
    assert usd_to_nanos(0.1) + usd_to_nanos(0.2) == usd_to_nanos(0.3)
    assert sum(usd_to_nanos(0.000123456) for _ in range(1000)) == 123_456_000


def test_hour_window_boundaries() -> None:
    assert HOUR_SECONDS == 3600
    assert hour_window(0) == 0
    assert hour_window(3599.999) == 0
    assert hour_window(3600) == 3600
    assert hour_window(3600.0001) == 3600
    assert hour_window(7199.5) == 3600
    assert hour_window(7200) == 7200
    assert hour_window(1_700_000_000.0) == 1_699_999_200
    assert hour_window(1_700_001_234.5) == 1_699_999_200
    assert WINDOW == 1_699_999_200 and NOW - WINDOW == 2034.5
    assert isinstance(hour_window(3600.5), int)


# ---------------------------------------------------------------------------- ledger
def test_total_add_accumulates() -> None:
    t = Total()
    assert (t.nanos, t.last_offset, t.last_seen) == (0, -1, 0.0)
    t1 = t.add(100, 0, 10.0)
    assert t1 == Total(100, 0, 10.0)
    t2 = t1.add(250, 5, 20.0)
    assert t2 == Total(350, 5, 20.0)
    # an out-of-order timestamp does not move last_seen back
    t3 = t2.add(1, 6, 15.0)
    assert t3 == Total(351, 6, 20.0)
    assert t == Total()  # frozen: add returns a new total


def test_total_add_skips_offsets_already_included() -> None:
    t = Total().add(100, 7, 1.0)
    assert t is not None
    assert t.add(100, 7, 2.0) is None  # the same event replayed
    assert t.add(100, 3, 2.0) is None  # an older one
    assert t.add(0, 8, 2.0) == Total(100, 8, 2.0)
    # offset 0 is new to a fresh total
    assert Total().add(5, 0, 1.0) == Total(5, 0, 1.0)


def test_total_replay_of_a_sequence_keeps_the_sum_exact() -> None:
    events = [(usd_to_nanos(0.000123456), offset, 100.0 + offset) for offset in range(10)]
    t = Total()
    for nanos, offset, seen in events + events[:6]:  # crash after 6, re-read from the start
        updated = t.add(nanos, offset, seen)
        if updated is not None:
            t = updated
    assert t == Total(1_234_560, 9, 109.0)


def test_total_list_round_trip() -> None:
    t = Total(123_456_789, 42, 1_700_000_123.25)
    assert t.to_list() == [123_456_789, 42, 1_700_000_123.25]
    assert Total.from_list(t.to_list()) == t
    assert Total.from_list(Total().to_list()) == Total()
    assert Total.from_list([]) == Total()
    assert Total.from_list(None) == Total()
    # the older two-field form, and values that came back from JSON as floats
    assert Total.from_list([5, 3]) == Total(5, 3, 0.0)
    restored = Total.from_list([5.0, 3.0, 7])
    assert restored == Total(5, 3, 7.0)
    assert type(restored.nanos) is int and type(restored.last_offset) is int


def test_expired() -> None:
    assert not expired(Total(), now=1e12, idle_seconds=1)  # never seen
    t = Total(10, 1, 1000.0)
    assert not expired(t, now=1000.0, idle_seconds=60)
    assert not expired(t, now=1060.0, idle_seconds=60)  # exactly the idle time: not yet
    assert expired(t, now=1060.5, idle_seconds=60)


def test_hour_key() -> None:
    assert hour_key("global", 3) == "global|p3"
    assert hour_key("tier:nano", 0) == "tier:nano|p0"


# ------------------------------------------------------------------------------ view
def test_view_limits_come_from_settings() -> None:
    view = make_view(hour_usd="2.5", workflow_usd="0.75", alert_usd="2.000000001")
    assert view.hour_limit == 2_500_000_000
    assert view.workflow_limit == 750_000_000
    assert view.alert_threshold == 2_000_000_001
    assert not view.caught_up.is_set()
    assert view.hours == {} and view.workflows == {} and view.resumed_windows == set()


def test_view_sums_hour_partitions_per_window_and_scope() -> None:
    view = make_view()
    topic = spend_topic(view)
    for value in (
        hour_snap(100, partition=0, offset=5),
        hour_snap(200, partition=1, offset=9),
        hour_snap(40, partition=5, offset=1),
        hour_snap(7, partition=0, offset=2, scope="tier:nano"),
        hour_snap(11, partition=3, offset=4, scope="tier:nano"),
        hour_snap(1000, partition=0, offset=1, window=OTHER_WINDOW),
    ):
        view.apply(topic, value)
    assert view.hour_spend(WINDOW) == 340
    assert view.hour_spend(WINDOW, "global") == 340
    assert view.hour_spend(WINDOW, "tier:nano") == 18
    assert view.hour_spend(WINDOW, "tier:premium") == 0
    assert view.hour_spend(OTHER_WINDOW) == 1000
    assert view.hour_spend(WINDOW + HOUR_SECONDS) == 0
    assert view.hour_part(WINDOW, 1) == PartTotal(200, 9)
    assert view.hour_part(WINDOW, 3, "tier:nano") == PartTotal(11, 4)
    assert view.hour_part(WINDOW, 2) is None


def test_view_later_snapshot_replaces_earlier_for_same_key() -> None:
    view = make_view()
    topic = spend_topic(view)
    view.apply(topic, hour_snap(100, partition=2, offset=5))
    view.apply(topic, hour_snap(170, partition=2, offset=8))
    view.apply(topic, hour_snap(30, partition=3, offset=1))
    assert view.hour_spend(WINDOW) == 200  # 170 + 30, not 100 + 170 + 30
    assert view.hour_part(WINDOW, 2) == PartTotal(170, 8)
    view.apply(topic, wf_snap("wf-a", 10, partition=4, offset=3))
    view.apply(topic, wf_snap("wf-a", 25, partition=4, offset=6))
    assert view.workflow_spend("wf-a") == WorkflowTotal(25, 4, 6)


def test_view_workflow_totals() -> None:
    view = make_view()
    topic = spend_topic(view)
    view.apply(topic, wf_snap("wf-a", 123_456, partition=1, offset=10))
    view.apply(topic, wf_snap("wf-b", 7, partition=4, offset=0))
    assert view.workflow_spend("wf-a") == WorkflowTotal(123_456, 1, 10)
    assert view.workflow_spend("wf-b") == WorkflowTotal(7, 4, 0)
    assert view.workflow_spend("wf-c") is None
    # workflow totals are not hour totals
    assert view.hour_spend(WINDOW) == 0


def test_view_hour_paused_exactly_at_the_limit() -> None:
    view = make_view(hour_usd="1.0")
    topic = spend_topic(view)
    assert not view.hour_paused(NOW)
    view.apply(topic, hour_snap(600_000_000, partition=0, offset=1))
    view.apply(topic, hour_snap(399_999_999, partition=1, offset=1))
    assert view.hour_spend(WINDOW) == USD - 1
    assert not view.hour_paused(NOW)
    view.apply(topic, hour_snap(400_000_000, partition=1, offset=2))
    assert view.hour_spend(WINDOW) == USD
    assert view.hour_paused(NOW)
    assert view.hour_paused(WINDOW)  # any instant of the same window
    assert view.hour_paused(WINDOW + HOUR_SECONDS - 0.001)
    assert not view.hour_paused(WINDOW + HOUR_SECONDS)  # the next hour starts fresh
    # tier scopes do not pause the hour
    other = make_view(hour_usd="1.0")
    other.apply(topic, hour_snap(5 * USD, partition=0, offset=1, scope="tier:premium"))
    assert not other.hour_paused(NOW)


def test_view_limit_set_events_change_limits() -> None:
    view = make_view(hour_usd="1.0", workflow_usd="1.0", alert_usd="0.5")
    topic = guard_topic(view)
    view.apply(spend_topic(view), hour_snap(USD, partition=0, offset=1))
    assert view.hour_paused(NOW)
    view.apply(topic, limit_set("hour", 2.5))
    assert view.hour_limit == 2_500_000_000
    assert not view.hour_paused(NOW)
    view.apply(topic, limit_set("workflow", 0.000123456))
    assert view.workflow_limit == 123_456
    view.apply(topic, limit_set("alert", 0.25))
    assert view.alert_threshold == 250_000_000
    assert view.hour_limit == 2_500_000_000  # unchanged by the other two
    # lowering the hour limit below the spend pauses again
    view.apply(topic, limit_set("hour", 0.999999999))
    assert view.hour_limit == 999_999_999
    assert view.hour_paused(NOW)


def test_view_ignores_guardrail_events_that_are_not_limit_changes() -> None:
    view = make_view(hour_usd="1.0")
    event = encode(GuardrailEvent(
        scope="hour", kind="limit_reached", action="pause", spent_usd=1.0, limit_usd=7.0,
        window_start=datetime.fromtimestamp(WINDOW, UTC), reason="test",
    ))
    view.apply(guard_topic(view), event)
    assert (view.hour_limit, view.resumed_windows) == (USD, set())


def test_view_resume_for_current_window_unpauses() -> None:
    view = make_view(hour_usd="1.0")
    view.apply(spend_topic(view), hour_snap(2 * USD, partition=0, offset=3))
    assert view.hour_paused(NOW)
    view.apply(guard_topic(view), resume(OTHER_WINDOW))
    assert view.resumed_windows == {OTHER_WINDOW}
    assert view.hour_paused(NOW)  # a resume of another hour does not apply
    view.apply(guard_topic(view), resume(WINDOW))
    assert view.resumed_windows == {OTHER_WINDOW, WINDOW}
    assert not view.hour_paused(NOW)
    # the next window is not resumed
    view.apply(spend_topic(view), hour_snap(2 * USD, partition=0, offset=9, window=WINDOW + HOUR_SECONDS))
    assert view.hour_paused(WINDOW + HOUR_SECONDS + 1)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"kind": "hour"}',
        b'{"schema_version": 2, "kind": "workflow", "scope": "x", "partition": 0, '
        b'"spent_nanos": 1, "last_offset": 0}',
        b'{"kind": "workflow", "scope": "x", "partition": -1, "spent_nanos": 1, "last_offset": 0}',
        b'{"kind": "workflow", "scope": "x", "partition": 0, "spent_nanos": 1, "last_offset": 0, "extra": 1}',
    ],
)
def test_view_ignores_undecodable_spend(value: bytes) -> None:
    view = make_view()
    view.apply(spend_topic(view), wf_snap("wf-a", 5, 0, 0))
    view.apply(spend_topic(view), value)
    assert view.workflows == {"wf-a": WorkflowTotal(5, 0, 0)}
    assert view.hours == {}


def test_view_ignores_undecodable_guardrails_and_tombstones() -> None:
    view = make_view(hour_usd="1.0")
    before = (view.hour_limit, view.workflow_limit, view.alert_threshold)
    for value in (
        b"garbage",
        b'{"scope": "limit:hour", "kind": "limit_set", "action": "set_limit", "limit_usd": 9}',
        b'{"scope": "limit:hour", "kind": "limit_set", "action": "set_limit", "spent_usd": 0, '
        b'"limit_usd": -1, "reason": "negative"}',
        wf_snap("wf-a", 1, 0, 0),  # a spend snapshot is not a guardrail event
        None,
    ):
        view.apply(guard_topic(view), value)
    view.apply(spend_topic(view), None)
    assert (view.hour_limit, view.workflow_limit, view.alert_threshold) == before
    assert view.resumed_windows == set() and view.workflows == {} and view.hours == {}


def test_view_status() -> None:
    view = make_view(hour_usd="1.0", workflow_usd="0.5", alert_usd="0.25")
    spend = spend_topic(view)
    view.apply(spend, hour_snap(200_000_000, partition=0, offset=1))
    view.apply(spend, hour_snap(5 * USD, partition=0, offset=1, window=OTHER_WINDOW))
    view.apply(spend, wf_snap("wf-b", 500_000_000, 1, 1))
    view.apply(spend, wf_snap("wf-a", 700_000_000, 2, 1))
    view.apply(spend, wf_snap("wf-c", 499_999_999, 3, 1))
    assert view.status(NOW) == {
        "window_start": WINDOW,
        "hour_spent_usd": 0.2,
        "hour_limit_usd": 1.0,
        "alert_threshold_usd": 0.25,
        "alerting": False,
        "paused": False,
        "resumed_by_operator": False,
        "caught_up": False,  # made here, never started: nothing read from Kafka yet
        "workflow_limit_usd": 0.5,
        "blocked_workflows": ["wf-a", "wf-b"],
    }
    summary = view.summary(NOW)  # what /ready shows: the same, without workflow ids
    assert summary == {k: v for k, v in view.status(NOW).items() if k not in ("workflow_limit_usd", "blocked_workflows")}
    view.apply(spend, hour_snap(50_000_000, partition=1, offset=1))
    status = view.status(NOW)
    assert (status["hour_spent_usd"], status["alerting"], status["paused"]) == (0.25, True, False)
    view.apply(spend, hour_snap(750_000_000, partition=1, offset=2))
    status = view.status(NOW)
    assert (status["hour_spent_usd"], status["alerting"], status["paused"]) == (0.95, True, False)
    view.apply(spend, hour_snap(800_000_000, partition=1, offset=3))
    assert view.status(NOW)["paused"] is True
    view.apply(guard_topic(view), resume(WINDOW))
    status = view.status(NOW)
    assert (status["paused"], status["resumed_by_operator"], status["hour_spent_usd"]) == (False, True, 1.0)


# ------------------------------------------------------------------------------ gate
async def test_gate_workflow_admits_while_worst_case_fits(pinned_clock: None) -> None:
    gate = ready_gate(make_view(hour_usd="100", workflow_usd="1.0", alert_usd="1"))
    r1 = await gate.admit("wf-a", 400_000_000)
    r2 = await gate.admit("wf-a", 600_000_000)  # exactly fills the budget
    assert (r1.workflow_id, r1.window, r1.worst_nanos) == ("wf-a", WINDOW, 400_000_000)
    assert gate.workflow_committed("wf-a") == (0, USD)
    assert gate.in_flight_nanos() == USD
    assert gate.hour_committed(WINDOW) == USD
    # another workflow has its own budget
    r3 = await gate.admit("wf-b", USD)
    assert gate.workflow_committed("wf-b") == (0, USD)
    for r in (r1, r2, r3):
        gate.release(r)


async def test_gate_raises_when_spent_plus_worst_exceeds_budget(pinned_clock: None) -> None:
    view = make_view(hour_usd="100", workflow_usd="1.0", alert_usd="1")
    gate = ready_gate(view)
    with pytest.raises(BudgetExceeded):
        await gate.admit("wf-a", USD + 1)  # can never fit
    view.apply(spend_topic(view), wf_snap("wf-a", 700_000_000, partition=0, offset=4))
    with pytest.raises(BudgetExceeded):
        await gate.admit("wf-a", 300_000_001)
    r = await gate.admit("wf-a", 300_000_000)
    assert gate.workflow_committed("wf-a") == (700_000_000, 300_000_000)
    assert gate.waiting == 0
    gate.release(r)


async def test_gate_waits_not_raises_when_spent_plus_worst_exactly_fills_budget(
    pinned_clock: None, no_recheck: None
) -> None:
    view = make_view(hour_usd="100", workflow_usd="1.0", alert_usd="1")
    gate = ready_gate(view)
    view.apply(spend_topic(view), wf_snap("wf-a", 700_000_000, partition=0, offset=4))
    r1 = await gate.admit("wf-a", 100_000_000)
    # 700M + 100M + 300M > 1e9, but 700M + 300M fits once the call in flight settles
    waiter = asyncio.create_task(gate.admit("wf-a", 300_000_000))
    await blocked_in_admit(gate, waiter)
    gate.release(r1)
    r2 = await asyncio.wait_for(waiter, 5)
    assert gate.workflow_committed("wf-a") == (700_000_000, 300_000_000)
    gate.release(r2)


async def test_gate_waits_on_in_flight_then_proceeds_after_cheaper_settle(
    pinned_clock: None, no_recheck: None
) -> None:
    gate = ready_gate(make_view(hour_usd="100", workflow_usd="1.0", alert_usd="1"))
    r1 = await gate.admit("wf-a", 400_000_000)
    r2 = await gate.admit("wf-a", 400_000_000)
    # 0 spent + 800M reserved + 400M > 1e9, but 0 spent + 400M fits: wait, do not raise
    third = asyncio.create_task(gate.admit("wf-a", 400_000_000))
    await blocked_in_admit(gate, third)
    assert gate.in_flight_nanos() == 800_000_000
    gate.settle(r1, 100_000_000)
    r3 = await asyncio.wait_for(third, 5)
    assert r3.worst_nanos == 400_000_000
    assert gate.workflow_committed("wf-a") == (100_000_000, 800_000_000)
    assert gate.waiting == 0
    gate.release(r2)
    gate.release(r3)


async def test_gate_waiter_raises_once_settled_spend_leaves_no_room(
    pinned_clock: None, no_recheck: None
) -> None:
    gate = ready_gate(make_view(hour_usd="100", workflow_usd="1.0", alert_usd="1"))
    r1 = await gate.admit("wf-a", 800_000_000)
    waiter = asyncio.create_task(gate.admit("wf-a", 300_000_000))
    await blocked_in_admit(gate, waiter)
    gate.settle(r1, 750_000_000)  # 750M + 300M > 1e9: it can never fit now
    with pytest.raises(BudgetExceeded):
        await asyncio.wait_for(waiter, 5)
    assert gate.workflow_committed("wf-a") == (750_000_000, 0)
    assert gate.waiting == 0


async def test_gate_release_returns_the_reservation(pinned_clock: None, no_recheck: None) -> None:
    gate = ready_gate(make_view(hour_usd="100", workflow_usd="1.0", alert_usd="1"))
    r1 = await gate.admit("wf-a", 700_000_000)
    waiter = asyncio.create_task(gate.admit("wf-a", 700_000_000))
    await blocked_in_admit(gate, waiter)
    gate.release(r1)
    assert gate.workflow_committed("wf-a") == (0, 0)
    assert gate.in_flight_nanos() == 0
    r2 = await asyncio.wait_for(waiter, 5)
    assert gate.workflow_committed("wf-a") == (0, 700_000_000)
    assert gate.hour_committed(WINDOW) == 700_000_000
    gate.release(r2)
    assert gate.in_flight_nanos() == 0
    assert gate.hour_committed(WINDOW) == 0
    assert gate.workflow_committed("wf-a") == (0, 0)


async def test_gate_hour_admits_below_limit_and_holds_at_it(
    pinned_clock: None, no_recheck: None
) -> None:
    view = make_view(hour_usd="1.0", workflow_usd="100", alert_usd="0.5")
    gate = ready_gate(view)
    view.apply(spend_topic(view), hour_snap(600_000_000, partition=0, offset=3))
    r1 = await gate.admit("wf-a", 300_000_000)  # committed 600M < 1e9
    r2 = await gate.admit("wf-b", 300_000_000)  # committed 900M < 1e9: admitted, may overshoot
    assert gate.hour_committed(WINDOW) == 1_200_000_000
    attempts = count_attempts(gate)
    held = asyncio.create_task(gate.admit("wf-c", 1))
    await blocked_in_admit(gate, held)
    # settling below the worst case brings committed to exactly the limit: still held
    before = attempts[0]
    gate.settle(r1, 100_000_000)
    gate.settle(r2, 300_000_000)
    assert gate.hour_committed(WINDOW) == USD
    await rechecked_and_still_waiting(gate, held, attempts, before)
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert gate.waiting == 0


async def test_gate_hour_holds_when_view_spend_is_at_limit(pinned_clock: None) -> None:
    view = make_view(hour_usd="1.0", workflow_usd="100", alert_usd="0.5")
    gate = ready_gate(view)
    view.apply(spend_topic(view), hour_snap(USD - 1, partition=0, offset=3))
    r = await gate.admit("wf-a", 5 * USD)  # one nano below the limit still admits
    gate.release(r)
    view.apply(spend_topic(view), hour_snap(USD, partition=0, offset=4))
    held = asyncio.create_task(gate.admit("wf-a", 1))
    await blocked_in_admit(gate, held)
    assert gate.in_flight_nanos() == 0
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held


async def test_gate_hour_wait_ends_when_limit_is_raised(pinned_clock: None, no_recheck: None) -> None:
    view = make_view(hour_usd="1.0", workflow_usd="100", alert_usd="0.5")
    gate = ready_gate(view)
    feed(view, spend_topic(view), hour_snap(USD, partition=0, offset=3))
    held = asyncio.create_task(gate.admit("wf-a", 200_000_000))
    await blocked_in_admit(gate, held)
    view.apply(guard_topic(view), limit_set("hour", 2.0))  # applied, listeners not yet called
    assert view.hour_limit == 2 * USD
    feed(view, guard_topic(view))  # the listeners, as after a consumed batch
    r = await asyncio.wait_for(held, 5)
    assert (r.workflow_id, r.worst_nanos, r.window) == ("wf-a", 200_000_000, WINDOW)
    assert gate.hour_committed(WINDOW) == 1_200_000_000
    gate.release(r)


async def test_gate_hour_wait_ends_when_operator_resumes_this_hour(
    pinned_clock: None, no_recheck: None
) -> None:
    view = make_view(hour_usd="1.0", workflow_usd="100", alert_usd="0.5")
    gate = ready_gate(view)
    feed(view, spend_topic(view), hour_snap(3 * USD, partition=0, offset=3))
    attempts = count_attempts(gate)
    held = asyncio.create_task(gate.admit("wf-a", 200_000_000))
    await blocked_in_admit(gate, held)
    before = attempts[0]
    feed(view, guard_topic(view), resume(OTHER_WINDOW))
    await rechecked_and_still_waiting(gate, held, attempts, before)
    feed(view, guard_topic(view), resume(WINDOW))
    r = await asyncio.wait_for(held, 5)
    assert r.window == WINDOW
    gate.release(r)


async def test_gate_unreflected_spend_counts_until_the_view_includes_it(pinned_clock: None) -> None:
    view = make_view(hour_usd="10", workflow_usd="1.0", alert_usd="5")
    gate = ready_gate(view)
    spend = spend_topic(view)
    # the view already knows 100M of wf-a from earlier events on costs partition 2
    feed(view, spend, hour_snap(100_000_000, partition=2, offset=9), wf_snap("wf-a", 100_000_000, 2, 9))
    r = await gate.admit("wf-a", 800_000_000)
    gate.settle(r, 600_000_000)
    assert r.settled and r.actual_nanos == 600_000_000
    assert gate.workflow_committed("wf-a") == (700_000_000, 0)
    assert gate.hour_committed(WINDOW) == 700_000_000
    gate.delivered(r, partition=2, offset=12)
    assert (r.cost_partition, r.cost_offset) == (2, 12)
    assert gate.workflow_committed("wf-a") == (700_000_000, 0)

    # a snapshot that stops short of the delivered offset: still unreflected
    feed(view, spend, wf_snap("wf-a", 100_000_000, 2, 11))
    assert gate.workflow_committed("wf-a") == (700_000_000, 0)
    # a snapshot from another costs partition at a higher offset does not prove inclusion
    feed(view, spend, wf_snap("wf-a", 100_000_000, 3, 50))
    assert gate.workflow_committed("wf-a") == (700_000_000, 0)
    with pytest.raises(BudgetExceeded):
        await gate.admit("wf-a", 300_000_001)

    # the cost role has counted it: the view's total carries it, the gate stops adding it
    feed(
        view, spend,
        hour_snap(700_000_000, partition=2, offset=12),
        wf_snap("wf-a", 700_000_000, 2, 12),
    )
    assert gate.workflow_committed("wf-a") == (700_000_000, 0)
    assert gate.hour_committed(WINDOW) == 700_000_000
    r2 = await gate.admit("wf-a", 300_000_000)  # exactly fits: no double count
    gate.release(r2)


async def test_gate_delivered_after_the_view_already_includes_it(pinned_clock: None) -> None:
    view = make_view(hour_usd="10", workflow_usd="1.0", alert_usd="5")
    gate = ready_gate(view)
    r = await gate.admit("wf-a", 500_000_000)
    gate.settle(r, 400_000_000)
    # the cost role was quicker than the producer's acknowledgement
    feed(view, spend_topic(view), hour_snap(400_000_000, 1, 20), wf_snap("wf-a", 400_000_000, 1, 20))
    assert gate.workflow_committed("wf-a") == (800_000_000, 0)  # not known to be the same yet
    gate.delivered(r, partition=1, offset=20)
    assert gate.workflow_committed("wf-a") == (400_000_000, 0)
    assert gate.hour_committed(WINDOW) == 400_000_000


async def test_gate_unreflected_sums_match_a_rescan_of_every_settled_call(pinned_clock: None) -> None:
    """The gate keeps unreflected spend as running sums (a rescan per call was quadratic in
    a burst); after every step of a random run they equal a rescan of all settled calls."""
    import random

    rng = random.Random(11)
    view = make_view(hour_usd="1000", workflow_usd="1000", alert_usd="999")
    gate = ready_gate(view)
    spend = spend_topic(view)
    home = {"wf-a": 0, "wf-b": 1, "wf-c": 1}  # each workflow's costs partition
    next_offset = {0: 0, 1: 0, 2: 0}
    settled: list[Reservation] = []  # every settled call, reflected or not
    reflected: set[int] = set()  # ids of calls a snapshot has shown included, once and for all

    def rescan(workflow_id: str | None) -> int:
        for r in settled:
            total = view.workflow_spend(r.workflow_id)
            if (
                r.cost_offset is not None and total is not None
                and total.partition == r.cost_partition and total.last_offset >= r.cost_offset
            ):
                reflected.add(id(r))
        return sum(
            r.actual_nanos for r in settled
            if id(r) not in reflected and workflow_id in (None, r.workflow_id)
        )

    for _ in range(600):
        step = rng.random()
        undelivered = [r for r in settled if r.cost_offset is None]
        if step < 0.45:
            wf = rng.choice(list(home))
            r = await gate.admit(wf, 1_000)
            gate.settle(r, rng.randrange(1_000) if rng.random() < 0.7 else 0)  # some calls cost nothing
            settled.append(r)
        elif step < 0.8 and undelivered:
            r = rng.choice(undelivered)
            p = home[r.workflow_id]
            gate.delivered(r, p, next_offset[p])
            next_offset[p] += 1
        else:  # the cost role reports a workflow's total, now and then from a stray partition
            wf = rng.choice(list(home))
            p = home[wf] if rng.random() < 0.9 else 2
            if next_offset[p]:
                feed(view, spend, wf_snap(wf, rng.randrange(10**6), p, rng.randrange(next_offset[p])))
        for wf in home:
            known = view.workflow_spend(wf)
            assert gate.workflow_committed(wf) == ((known.nanos if known else 0) + rescan(wf), 0)
        assert gate.hour_committed(WINDOW) == view.hour_spend(WINDOW) + rescan(None)
    assert reflected and len(reflected) < len(settled), "the run covered both cases"


async def test_gate_calls_that_cost_nothing_leave_no_trace(pinned_clock: None) -> None:
    view = make_view(hour_usd="10", workflow_usd="1.0", alert_usd="5")
    gate = ready_gate(view)
    free = [await gate.admit("wf-a", 100) for _ in range(2)]
    for offset, r in enumerate(free):
        gate.settle(r, 0)
        gate.delivered(r, partition=0, offset=offset)
    feed(view, spend_topic(view), wf_snap("wf-a", 0, 0, 1))  # includes both
    assert gate.workflow_committed("wf-a") == (0, 0) and gate.hour_committed(WINDOW) == 0
    assert not gate._unreflected and not gate._unreflected_hour


async def test_gate_admit_waits_for_view_caught_up(pinned_clock: None) -> None:
    view = make_view(hour_usd="100", workflow_usd="1.0", alert_usd="1")
    gate = BudgetGate(view)
    assert view.listeners == [gate._on_view_update]
    task = asyncio.create_task(gate.admit("wf-a", 100))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()
    assert gate.waiting == 0 and gate.in_flight_nanos() == 0
    # the state read before catching up is what the admission sees afterwards
    view.apply(spend_topic(view), wf_snap("wf-a", USD, 0, 5))
    view.caught_up.set()
    with pytest.raises(BudgetExceeded):
        await asyncio.wait_for(task, 5)
    task2 = asyncio.create_task(gate.admit("wf-b", 100))
    r = await asyncio.wait_for(task2, 5)
    assert r.worst_nanos == 100
    gate.release(r)


def test_a_published_workflow_total_keeps_its_idle_clock() -> None:
    """A workflow whose table entry was dropped as idle (or lost in a restart) comes back
    from its published total with the time it was last active, so it still expires."""
    from streams.guardrails.ledger import Total, expired
    from streams.guardrails.view import PartTotal, WorkflowTotal
    from streams.roles.cost import _newest

    published = WorkflowTotal(500, 2, 9, updated_at=1_000.0)
    restored = _newest(Total(), published)
    assert restored == Total(500, 9, 1_000.0)
    assert expired(restored, 1_000.0 + 3_601, 3_600) and not expired(restored, 1_000.0 + 3_599, 3_600)
    # the table wins when it includes as much; hour totals carry no idle clock
    assert _newest(Total(700, 9, 5.0), published) == Total(700, 9, 5.0)
    assert _newest(Total(), PartTotal(40, 3)) == Total(40, 3, 0.0)


# ------------------------------------------------------------- cost offsets


def test_cost_offsets_resume_after_the_published_totals() -> None:
    from streams.roles.cost import CostOffsets

    view = GuardrailView(load_settings(environ={}))
    view.costs_applied[0] = 9  # the published totals include offsets up to 9
    offsets = CostOffsets(view)
    assert offsets.order.expected(0) == 10 and offsets.order.expected(1) == 0
    offsets.order.admit(0, 10)
    assert offsets.order.expected(0) == 11
    offsets.on_assigned()
    assert offsets.order.expected(0) == 10, "after an assignment, the published totals decide again"


class _Positions:
    """A consumer for CostOffsets.admit; ``rebalance_while_asked`` makes a rebalance
    complete while the log start is being asked for (the assignment signal included)."""

    def __init__(self, offsets: object, rebalance_while_asked: bool = False, owned: bool = True) -> None:
        self.offsets = offsets
        self.rebalance_while_asked = rebalance_while_asked
        self.owned = owned
        self.generation_id = 1
        self.sought: list[tuple[int, int]] = []

    def generation(self) -> int:
        return self.generation_id

    def owns(self, topic: str, partition: int) -> bool:
        return self.owned

    async def log_start(self, topic: str, partition: int) -> int:
        if self.rebalance_while_asked:
            self.generation_id += 1
            self.offsets.on_assigned()  # type: ignore[attr-defined]
        return 0

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        self.sought.append((partition, offset))


def _cost_source(partition: int, offset: int) -> object:
    from streams.envelope import Source

    return Source("costs", partition, offset, None, b"{}", 0.0)


async def test_cost_offsets_send_the_consumer_back_to_skipped_events() -> None:
    from streams.roles.cost import CostOffsets, Rewound

    view = GuardrailView(load_settings(environ={}))
    view.costs_applied[0] = 9
    offsets = CostOffsets(view)
    consumer = _Positions(offsets)
    await offsets.admit(_cost_source(0, 10), 1, consumer)  # in order: no exception
    await offsets.admit(_cost_source(0, 3), 1, consumer)  # a replay: counted, the totals know it
    with pytest.raises(Rewound):
        await offsets.admit(_cost_source(0, 14), 1, consumer)
    assert consumer.sought == [(0, 11)] and offsets.order.rewinding(0)
    with pytest.raises(Rewound):
        await offsets.admit(_cost_source(0, 15), 1, consumer)  # fetched before the rewind
    assert consumer.sought == [(0, 11)], "one seek per rewind"
    await offsets.admit(_cost_source(0, 11), 1, consumer)
    assert not offsets.order.rewinding(0)


async def test_cost_offsets_pass_over_events_gone_by_retention() -> None:
    from streams.roles.cost import CostOffsets

    view = GuardrailView(load_settings(environ={}))
    offsets = CostOffsets(view)
    consumer = _Positions(offsets)

    async def log_start(topic: str, partition: int) -> int:
        return 40

    consumer.log_start = log_start  # type: ignore[method-assign]
    await offsets.admit(_cost_source(0, 40), 1, consumer)  # 0-39 no longer exist
    assert consumer.sought == [] and offsets.order.expected(0) == 41


async def test_a_rewind_still_unanswered_after_its_patience_is_repeated() -> None:
    """A partition that waits for a seek that was lost or overtaken would count nothing
    again: the seek is repeated once ``patience`` seconds pass without the event."""
    from streams.roles.cost import CostOffsets

    view = GuardrailView(load_settings(environ={}))
    offsets = CostOffsets(view, patience=5.0)
    consumer = _Positions(offsets)
    offsets.order.rewind(0, 10, now=100.0)
    offsets.order.rewind(1, 20, now=103.0)
    await offsets.repeat_overdue("costs", consumer, now=104.9)
    assert consumer.sought == []
    await offsets.repeat_overdue("costs", consumer, now=105.0)
    assert consumer.sought == [(0, 10)], "only the partition waiting 5 s"
    await offsets.repeat_overdue("costs", consumer, now=108.0)
    assert consumer.sought == [(0, 10), (1, 20)], "partition 0's clock restarted with its seek"
    offsets.order.admit(0, 10)
    offsets.order.admit(1, 20)
    await offsets.repeat_overdue("costs", consumer, now=200.0)
    assert consumer.sought == [(0, 10), (1, 20)], "nothing is waiting once the events came"
    offsets.order.rewind(2, 5, now=300.0)
    consumer.owned = False
    await offsets.repeat_overdue("costs", consumer, now=400.0)
    assert consumer.sought == [(0, 10), (1, 20)], "no seek on a partition this consumer no longer owns"


async def test_cost_offsets_decide_nothing_across_a_rebalance() -> None:
    """A rebalance that completes while the log start is asked for clears what the cost
    role knew and seeks to the committed offsets itself: a rewind decided from the old
    state would stall the partition (every later event taken for one fetched before it)."""
    from streams.roles.cost import CostOffsets, Rewound

    view = GuardrailView(load_settings(environ={}))
    view.costs_applied[0] = 9
    offsets = CostOffsets(view)
    consumer = _Positions(offsets, rebalance_while_asked=True)
    with pytest.raises(Rewound):
        await offsets.admit(_cost_source(0, 14), consumer.generation(), consumer)
    assert consumer.sought == [] and not offsets.order.rewinding(0)
    # The new assignment starts at its committed offset, here above the stale rewind
    # target: the event is counted once the published totals say it is next.
    view.costs_applied[0] = 19
    await offsets.admit(_cost_source(0, 20), consumer.generation(), consumer)

    revoked = _Positions(CostOffsets(view), owned=False)
    with pytest.raises(Rewound):
        await revoked.offsets.admit(_cost_source(0, 25), revoked.generation(), revoked)  # type: ignore[attr-defined]
    assert revoked.sought == [], "no seek on a partition this consumer no longer owns"


def test_a_spend_batch_publishes_the_latest_snapshot_per_key_hours_first() -> None:
    from streams.envelope import Outgoing
    from streams.roles.cost import SpendBatch

    built: list[tuple[str, str, int, int]] = []

    def build(kind: str, scope: str, p: int, total: Total, window: int | None) -> Outgoing:
        built.append((kind, scope, p, total.nanos))
        return Outgoing("spend", f"{kind}|{scope}|p{p}".encode(), str(total.nanos).encode())

    def other(topic: str, value: str) -> Outgoing:
        return Outgoing(topic, b"k", value.encode())

    batch = SpendBatch(build)
    batch.snapshot("hour", "global", 0, Total(1), 0)
    batch.snapshot("workflow", "a", 0, Total(10), None)
    batch.add([other("guardrails", "alert")])
    batch.snapshot("hour", "global", 0, Total(2), 0)
    batch.snapshot("hour", "global", 1, Total(5), 0)
    batch.snapshot("workflow", "b", 1, Total(20), None)
    batch.add([])
    batch.snapshot("workflow", "a", 0, Total(11), None)
    batch.add([other("dlq", "bad")])
    assert len(batch) == 3 and built == [], "nothing is built before the batch is taken"
    assert [o.value.decode() for o in batch.take()] == ["2", "5", "11", "20", "alert", "bad"]
    assert len(built) == 4, "one snapshot built per key"
    assert (len(batch), batch.take()) == (0, [])


class _RecordingTables:
    """Stand-ins for the cost role's two tables that record each write with its partition."""

    def __init__(self) -> None:
        self.hours: dict[tuple[str, int], list[float | int]] = {}
        self.workflows: dict[str, list[float | int]] = {}
        self.writes: list[tuple[str, object, int]] = []

    # the hourly table
    def get(self, key: str, at: float) -> list[float | int]:
        return self.hours.get((key, hour_window(at)), [])

    def set(self, key: str, value: list[float | int], at: float, partition: int) -> None:
        self.hours[(key, hour_window(at))] = value
        self.writes.append(("hour", key, partition))


class _RecordingWorkflows(dict):  # type: ignore[type-arg]
    def __init__(self, log: list[tuple[str, object, int]]) -> None:
        super().__init__()
        self.log = log

    def get(self, key: str) -> list[float | int]:  # type: ignore[override]
        return super().get(key) or []

    def set(self, key: str, value: list[float | int], partition: int) -> None:
        self.log.append(("workflow", key, partition))
        self[key] = value

    def delete(self, key: str, partition: int) -> None:
        self.log.append(("delete", key, partition))
        self.pop(key, None)


def test_pending_writes_reach_each_table_once_per_batch_in_their_partitions() -> None:
    from streams.roles.cost import PendingWrites

    hourly = _RecordingTables()
    workflows = _RecordingWorkflows(hourly.writes)
    dict.__setitem__(workflows, "old", Total(5, 1, 10.0).to_list())  # restored, not written
    pending = PendingWrites(hourly, workflows)
    ts, window = 7200.0 + 30, 7200
    key0, key1 = hour_key("global", 0), hour_key("global", 1)

    # Three events' updates of two hour keys and a workflow: reads see the latest.
    pending.set_hour(key0, window, Total(10, 0, ts), 0, ts)
    pending.set_hour(key0, window, Total(25, 1, ts), 0, ts)
    pending.set_hour(key1, window, Total(7, 0, ts), 1, ts)
    pending.set_workflow("wf", Total(25, 1, ts), 0)
    pending.forget_workflow("old", 1)
    assert pending.hour(key0, window) == Total(25, 1, ts)
    assert pending.workflow("wf") == Total(25, 1, ts)
    assert pending.workflow("old") == Total(), "forgotten, though still in the table"
    assert hourly.writes == [] and len(pending) == 4

    pending.write()
    assert sorted(hourly.writes) == sorted([
        ("hour", key0, 0), ("hour", key1, 1), ("workflow", "wf", 0), ("delete", "old", 1),
    ]), "one write per key, in the partition of the events that made it"
    assert hourly.hours[(key0, window)] == [25, 1, ts] and "old" not in workflows
    assert len(pending) == 0 and pending.hour(key0, window) == Total(25, 1, ts), "read back from the table"
    pending.write()
    assert len(hourly.writes) == 4, "nothing pending, nothing written"


def test_idle_workflows_are_forgotten_with_one_watch_each_and_announce_again() -> None:
    """Each workflow is watched once, however many events it has (the watch list grew by
    one entry per event before, for a day's worth of events), and one forgotten as idle
    starts a new budget that can reach its limit, and be announced, again."""
    from benchmarks.baseline import HourWindows, Workflows
    from schemas.models import CostEvent, Tier
    from streams.envelope import Source
    from streams.roles.cost import CostAccountant

    settings = load_settings(environ={}, overrides={"cost_guardrails": {
        "max_cost_per_workflow_usd": 0.05, "workflow_idle_expiry_seconds": 60,
    }})
    topology = Topology(settings)
    hourly, workflows = HourWindows(), Workflows()
    accountant = CostAccountant(settings, topology, hourly, workflows, GuardrailView(settings))
    offsets = iter(range(1_000))

    def spend(wf: str, usd: float, at: float) -> list[str]:
        event = CostEvent(
            request_id=f"r{at}", workflow_id=wf, agent_type="researcher", tier=Tier.NANO,
            provider="openai", model="gpt-5-nano", attempt=1, input_tokens=1, output_tokens=1,
            cost_usd=usd,
        )
        source = Source(topology.costs.name, 0, next(offsets), wf.encode(), encode(event), at)
        out = accountant.apply(source, at)
        accountant.tables.write()
        accountant.batch.take()
        return [GuardrailEvent.model_validate_json(o.value).kind for o in out
                if o.topic == topology.guardrails.name and o.value and b'"workflow:' in o.value]

    t0 = 7_200.0
    kinds = [k for i in range(30) for k in spend("wf-a", 0.01, t0 + i)]  # 30 events in 30 s
    assert kinds == ["limit_reached"], "announced once"
    spend("wf-b", 0.001, t0 + 30)
    assert sum(len(heap) for heap in accountant._idle.values()) == 2, "one watch per workflow"

    spend("wf-b", 0.001, t0 + 75)  # wf-a, last seen at t0+29, is idle from t0+89
    assert "wf-a" in workflows, "not idle yet: watched again from its last event"
    spend("wf-b", 0.001, t0 + 100)
    assert "wf-a" not in workflows and "wf-b" in workflows
    assert sum(len(heap) for heap in accountant._idle.values()) == 1

    again = [k for i in range(6) for k in spend("wf-a", 0.01, t0 + 200 + i)]
    assert again == ["limit_reached"], "a new budget period reaches its limit and says so"
