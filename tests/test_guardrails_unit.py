"""Unit tests of the cost guardrails without a broker: money, ledger totals, the view,
the budget gate and the cost role's leases.

The view is fed encoded messages through ``apply`` exactly as its consumer would, and its
listeners are called by hand afterwards (as ``TopicTail._run`` does after a batch). The
gate's leases come from the in-memory cost role of :mod:`tests.test_leases`, on a clock
the tests move, so no test depends on the wall-clock hour.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from benchmarks.baseline import HourWindows, Workflows
from schemas.codec import decode, decode_cost_record, encode
from schemas.models import BudgetRecord, CostEvent, GuardrailEvent, LeaseState, SpendSnapshot, Tier
from streams.envelope import Source
from streams.guardrails.budget import RECHECK_SECONDS, BudgetExceeded, BudgetGate, Reservation
from streams.guardrails.ledger import OPENINGS_SCOPE, Lease, Total, expired, hour_key
from streams.guardrails.money import HOUR_SECONDS, NANOS_PER_USD, hour_window, nanos_to_usd, usd_to_nanos
from streams.guardrails.view import LEDGER, GuardrailView, PartTotal, WorkflowTotal
from streams.roles.cost import CostAccountant, _newest
from tests.support import wait_until
from tests.test_leases import Cluster, settings_with
from topologies.config import Settings, load_settings
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


def hour_snap(
    nanos: int, partition: int, offset: int, window: int = WINDOW, scope: str = "global",
    leases: dict[str, LeaseState] | None = None,
) -> bytes:
    return encode(SpendSnapshot(
        kind="hour", scope=scope, partition=partition, spent_nanos=nanos, last_offset=offset,
        window_start=datetime.fromtimestamp(window, UTC), leases=leases or {},
    ))


def wf_snap(
    workflow_id: str, nanos: int, partition: int, offset: int, leases: dict[str, LeaseState] | None = None
) -> bytes:
    return encode(SpendSnapshot(
        kind="workflow", scope=workflow_id, partition=partition, spent_nanos=nanos, last_offset=offset,
        leases=leases or {},
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


def test_total_list_round_trip_with_leases() -> None:
    leased = Total(300, 8, 5.0, {"h#1": Lease(100, 40, 4.5), "h#2": Lease(7, 0, 5.0)})
    assert leased.to_list() == [300, 8, 5.0, {"h#1": [100, 40, 4.5], "h#2": [7, 0, 5.0]}]
    # as the table's changelog gives it back: JSON, numbers possibly floats
    assert Total.from_list(orjson.loads(orjson.dumps(leased.to_list()))) == leased
    restored = Total.from_list([300, 8, 5.0, {"h#1": [100.0, 40.0, 4]}])
    assert restored.leases == {"h#1": Lease(100, 40, 4.0)} and type(restored.leases["h#1"].granted) is int
    assert Total(1, 2, 3.0).to_list() == [1, 2, 3.0], "no leases: the three-field form"


def test_total_add_counts_spend_against_the_lease_it_names() -> None:
    t = Total(0, 0, 1.0, {"h#1": Lease(500, 0, 1.0)})
    added = t.add(120, 1, 2.0, "h#1")
    assert added is not None and added.nanos == 120 and added.leases == {"h#1": Lease(500, 120, 1.0)}
    assert added.outstanding() == 380 and added.room(1_000) == 1_000 - 120 - 380
    other = added.add(30, 2, 3.0, "gone#4")  # a lease returned or expired since: the total only
    assert other is not None and other.nanos == 150 and other.leases == added.leases
    assert t.leases == {"h#1": Lease(500, 0, 1.0)}, "frozen: add returns a new total"


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
    assert view.hour_part(WINDOW, 1) == PartTotal(200, 9, 1)
    assert view.hour_part(WINDOW, 3, "tier:nano") == PartTotal(11, 4, 3)
    assert view.hour_part(WINDOW, 2) is None


def test_view_later_snapshot_replaces_earlier_for_same_key() -> None:
    view = make_view()
    topic = spend_topic(view)
    view.apply(topic, hour_snap(100, partition=2, offset=5))
    view.apply(topic, hour_snap(170, partition=2, offset=8))
    view.apply(topic, hour_snap(30, partition=3, offset=1))
    assert view.hour_spend(WINDOW) == 200  # 170 + 30, not 100 + 170 + 30
    assert view.hour_part(WINDOW, 2) == PartTotal(170, 8, 2)
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
        "leases": {},
    }
    summary = view.summary(NOW)  # what /ready shows: the same, without workflow ids
    assert summary == {
        k: v for k, v in view.status(NOW).items() if k not in ("workflow_limit_usd", "blocked_workflows", "leases")
    }
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


def test_view_keeps_the_leases_of_workflows_and_of_the_hour_ledger() -> None:
    view = make_view()
    spend = spend_topic(view)
    view.apply(spend, wf_snap("wf-a", 40, 1, 6, leases={
        "h#1": LeaseState(granted_nanos=100, spent_nanos=40, renewed_at=NOW),
    }))
    view.apply(spend, hour_snap(40, 2, 3, scope=LEDGER, leases={
        "h#2": LeaseState(granted_nanos=500, spent_nanos=40, renewed_at=NOW - 1),
    }))
    view.apply(spend, hour_snap(99, 2, 1, window=OTHER_WINDOW, scope=LEDGER))
    wf = view.workflow_spend("wf-a")
    assert wf is not None and wf.leases == {"h#1": Lease(100, 40, NOW)}
    ledger = view.hour_ledger(WINDOW)
    assert ledger == PartTotal(40, 3, 2) and ledger.leases == {"h#2": Lease(500, 40, NOW - 1)}
    assert view.hour_ledger(OTHER_WINDOW) == PartTotal(99, 1, 2)
    assert view.hour_ledger(WINDOW + HOUR_SECONDS) is None
    assert view.hour_spend(WINDOW) == 0, "the ledger's spend is counted in the hour from the calls' cost events"
    # a lease returned: the next snapshot of its scope no longer has it
    view.apply(spend, wf_snap("wf-a", 40, 1, 7))
    assert view.workflow_spend("wf-a").leases == {}  # type: ignore[union-attr]


def test_view_lists_the_outstanding_leases_by_holder() -> None:
    view = make_view()  # lease_seconds: 10
    assert view.settings.cost_guardrails.lease_seconds == 10.0
    spend = spend_topic(view)
    view.apply(spend, hour_snap(100_000_000, 0, 4, scope=LEDGER, leases={
        "tier-a@x:1:ab#1": LeaseState(granted_nanos=300_000_000, spent_nanos=100_000_000, renewed_at=NOW - 10),
        "tier-b@y:2:cd#5": LeaseState(granted_nanos=200_000_000, spent_nanos=0, renewed_at=NOW - 10.5),  # expired
    }))
    view.apply(spend, hour_snap(0, 0, 1, window=OTHER_WINDOW, scope=LEDGER, leases={
        "tier-c@z:3:ef#1": LeaseState(granted_nanos=5, spent_nanos=0, renewed_at=NOW),  # another hour's
    }))
    view.apply(spend, wf_snap("wf-a", 0, 1, 1, leases={
        "tier-a@x:1:ab#2": LeaseState(granted_nanos=50_000_000, spent_nanos=10_000_000, renewed_at=NOW),
    }))
    view.apply(spend, wf_snap("wf-b", 0, 1, 2, leases={
        "tier-a@x:1:ab#3": LeaseState(granted_nanos=50_000_000, spent_nanos=50_000_000, renewed_at=NOW),
        "tier-d@w:4:gh#9": LeaseState(granted_nanos=1_000, spent_nanos=0, renewed_at=NOW),
    }))
    view.apply(spend, encode(SpendSnapshot(
        kind="openings", scope="~openings|p3", partition=3, spent_nanos=0, last_offset=4,
        leases={"tier-a@x:1:ab#4": LeaseState(granted_nanos=3_000_000, spent_nanos=0, renewed_at=NOW)},
    )))
    expected = {
        "tier-a@x:1:ab": {"hour_outstanding_usd": 0.2, "workflow_leases": 2, "workflow_outstanding_usd": 0.04,
                         "opening_outstanding_usd": 0.003},
        "tier-d@w:4:gh": {"hour_outstanding_usd": 0.0, "workflow_leases": 1, "workflow_outstanding_usd": 0.000001,
                         "opening_outstanding_usd": 0.0},
    }
    assert view.leases_by_holder(NOW) == expected
    assert view.status(NOW)["leases"] == expected


# ------------------------------------------------------------------------------ gate
# The gate gets its leases from a real cost role in memory (tests.test_leases.Cluster):
# its clock is ``cluster.now``, moved by hand here, and its cost role counts what was
# written when a test says so (``answered``), or every turn of ``Cluster.run``.


def lease_records(cluster: Cluster, op: str | None = None) -> list[tuple[BudgetRecord, float]]:
    """The lease records written to the costs topic (of one kind, if ``op``), with when;
    openings' own records aside (tests/test_leases.py covers them)."""
    found = []
    for records in cluster.log.values():
        for _key, value, at in records:
            record = decode_cost_record(value)
            if isinstance(record, BudgetRecord) and op in (None, record.budget) and record.scope != OPENINGS_SCOPE:
                found.append((record, at))
    return sorted(found, key=lambda item: item[1])


async def written(cluster: Cluster) -> None:
    """Every lease record a holder has started to write is in the log."""
    pending = [task for gate in cluster.gates for task in gate._tasks]
    if pending:
        await asyncio.wait(pending)


async def answered(cluster: Cluster) -> None:
    """The cost role has counted everything written, and every view read its totals."""
    await written(cluster)
    cluster.pump()


async def admitting(gate: BudgetGate, workflow_id: str, worst: int) -> asyncio.Task[Reservation]:
    """An admission that has asked for the leases it lacks (or was admitted at once)."""
    before = gate.waiting
    task = asyncio.ensure_future(gate.admit(workflow_id, worst))
    await wait_until(lambda: task.done() or gate.waiting > before, 2, "admit to try", interval=0)
    return task


async def admitted(cluster: Cluster, gate: BudgetGate, workflow_id: str, worst: int) -> Reservation:
    task = await admitting(gate, workflow_id, worst)
    await answered(cluster)
    return await asyncio.wait_for(task, 2)


async def counted_spend(cluster: Cluster, workflow_id: str, nanos: int) -> None:
    """A cost event of a call not made under this test's leases, counted if the cost role is up."""
    event = CostEvent(
        request_id=f"r-{len(cluster.log[0])}-{nanos}", workflow_id=workflow_id, agent_type="researcher",
        tier=Tier.STANDARD, provider="openai", model="gpt-5-mini", attempt=1, input_tokens=1,
        output_tokens=1, cost_usd=nanos_to_usd(nanos),
    )
    await cluster.send(workflow_id.encode(), encode(event))
    cluster.pump()


def operator(cluster: Cluster, value: bytes) -> None:
    """A guardrail event, read by every process (the cost role's view included)."""
    for view in (*cluster.views, cluster.cost_view):
        feed(view, guard_topic(view), value)


async def let_time_pass(cluster: Cluster, seconds: float) -> None:
    """The cluster runs (its cost role counting, its holders ticking) for ``seconds`` of its clock."""
    end = cluster.now + seconds

    async def until_end() -> None:
        while cluster.now < end:
            await asyncio.sleep(0)

    await cluster.run(until_end())


async def test_gate_admit_waits_for_view_caught_up() -> None:
    cluster = Cluster(settings_with(workflow_usd=1.0), holders=1)
    gate, view = cluster.gates[0], cluster.views[0]
    view.caught_up.clear()
    task = asyncio.ensure_future(gate.admit("wf-a", 100))
    for _ in range(20):  # turns enough for an admission to ask for its leases
        await asyncio.sleep(0)
    await written(cluster)
    assert not task.done() and gate.waiting == 0
    assert lease_records(cluster) == [], "nothing is asked before the view has read Kafka"
    # what the view read before catching up is what the admission sees
    feed(view, spend_topic(view), wf_snap("wf-a", USD, 0, 5))
    view.caught_up.set()
    with pytest.raises(BudgetExceeded):
        await asyncio.wait_for(task, 2)
    r = await admitted(cluster, gate, "wf-b", 100)
    assert (r.workflow_id, r.worst_nanos, r.window) == ("wf-b", 100, hour_window(cluster.now))


async def test_gate_raises_when_counted_spend_plus_worst_exceeds_budget() -> None:
    cluster = Cluster(settings_with(workflow_usd=1.0, overdraft=False), holders=1)
    gate = cluster.gates[0]
    with pytest.raises(BudgetExceeded):
        await gate.admit("wf-a", USD + 1)  # can never fit
    await counted_spend(cluster, "wf-a", 700_000_000)
    with pytest.raises(BudgetExceeded):
        await gate.admit("wf-a", 300_000_001)
    await written(cluster)
    assert lease_records(cluster) == [], "no lease is asked for a call that cannot fit"
    r = await admitted(cluster, gate, "wf-a", 300_000_000)  # exactly what is left
    assert r.workflow_lease.granted == 300_000_000
    assert gate.workflow_committed("wf-a") == (700_000_000, 0)
    assert gate.waiting == 0


async def test_with_overdraft_the_last_call_of_a_budget_is_made_and_the_next_is_exceeded() -> None:
    cluster = Cluster(settings_with(workflow_usd=1.0), holders=1)
    gate = cluster.gates[0]
    with pytest.raises(BudgetExceeded):
        await gate.admit("wf-a", USD + 1)  # larger than the whole budget: never made
    await counted_spend(cluster, "wf-a", 700_000_000)
    r = await admitted(cluster, gate, "wf-a", 300_000_001)  # its worst case passes the budget by 1
    assert r.workflow_lease.granted == 300_000_001
    request = next(record for record, _at in lease_records(cluster, "request") if record.scope == "wf-a")
    assert request.overdraft and request.least_nanos == 300_000_001
    gate.settle(r, 300_000_000)
    await counted_spend(cluster, "wf-a", 300_000_000)  # its cost event
    with pytest.raises(BudgetExceeded):
        await gate.admit("wf-a", 1)
    assert gate.waiting == 0


@pytest.mark.parametrize(("overdraft", "others_spent"), [(False, 700_000_000), (True, 1_000_000_000)])
async def test_gate_waiter_raises_once_counted_spend_leaves_no_room(overdraft: bool, others_spent: int) -> None:
    """No room: less than the call's worst case, or with overdraft nothing at all."""
    cluster = Cluster(settings_with(workflow_usd=1.0, overdraft=overdraft), holders=1)
    gate = cluster.gates[0]
    cluster.cost_role_up = False
    waiter = await admitting(gate, "wf-a", 400_000_000)
    await written(cluster)
    # another holder's calls are written after the request, and counted with it
    await counted_spend(cluster, "wf-a", others_spent)
    assert not waiter.done()
    cluster.cost_role_up = True
    await answered(cluster)
    with pytest.raises(BudgetExceeded):
        await asyncio.wait_for(waiter, 2)
    assert gate.waiting == 0


async def hour_spent_and_waiting(cluster: Cluster) -> asyncio.Task[Reservation]:
    """The hour's limit spent by calls counted from their cost events, and an admission
    waiting: its workflow's lease granted, the hour's denied."""
    gate = cluster.gates[0]
    await counted_spend(cluster, "wf-old", cluster.cost_view.hour_limit)
    task = await admitting(gate, "wf-a", 1_000)
    await answered(cluster)
    assert not task.done()
    assert (gate.granted, gate.denied) == (1, 1), "the workflow's lease granted, the hour's denied"
    return task


async def test_gate_hour_waits_while_the_ledger_has_no_room_until_the_operator_resumes_it() -> None:
    cluster = Cluster(settings_with(hour_usd=1.0), holders=1)
    gate = cluster.gates[0]
    window = hour_window(cluster.now)
    task = await hour_spent_and_waiting(cluster)
    since = cluster.now
    await let_time_pass(cluster, 3.0)
    assert not task.done()
    asked = [r for r, at in lease_records(cluster, "request") if r.scope == "hour" and at > since]
    # The hour's spend reached its limit: asking again cannot help until room comes back
    # (a lease returned or expired) or a limit changes, so nothing is asked meanwhile.
    assert asked == [], f"{len(asked)} requests while the hour was spent"
    assert gate.summary()["lease_requests_waiting"] == 0, "denied, not unanswered"
    operator(cluster, resume(window - HOUR_SECONDS))
    await let_time_pass(cluster, 1.0)
    assert not task.done(), "a resume of another hour does not apply"
    operator(cluster, resume(window))
    await cluster.run(task, limit_seconds=0.5)
    r = task.result()
    assert r.hour_lease is None and r.workflow_lease.granted > 0
    gate.settle(r, 500)
    await gate.tick()
    await written(cluster)
    assert lease_records(cluster, "spend") == [], "no hourly lease, no spend record for the hour's ledger"


def count_attempts(gate: BudgetGate) -> list[int]:
    """Counts the gate's admission checks, to know a waiter has checked again."""
    attempts = [0]
    check = gate._try_reserve

    def counted(workflow_id: str, worst: int, now: float) -> Reservation | None:
        attempts[0] += 1
        return check(workflow_id, worst, now)

    gate._try_reserve = counted  # type: ignore[method-assign]
    return attempts


async def test_gate_a_denied_scope_is_asked_again_after_a_second_or_when_its_room_grows() -> None:
    """A workflow's room held by another process's lease: the waiter does not ask again on
    every wake-up, but a second after the denial, or at once when the lease comes back."""
    cluster = Cluster(settings_with(workflow_usd=0.003, overdraft=False), holders=2)
    holder, waiter = cluster.gates
    worst = usd_to_nanos(0.002)
    held = await admitted(cluster, holder, "wf", worst)  # its lease leaves less than a call
    task = await admitting(waiter, "wf", worst)
    await answered(cluster)
    assert waiter.denied >= 1 and not task.done()
    denied_at = cluster.now
    attempts = count_attempts(waiter)

    def requests() -> int:
        return sum(1 for record, _ in lease_records(cluster, "request") if record.lease_id.startswith("h1#"))

    asked = requests()
    cluster.now = denied_at + 0.25
    await waiter.tick()
    before = attempts[0]
    operator(cluster, limit_set("hour", 50.0))  # wakes the waiters; the workflow is unchanged
    await wait_until(lambda: attempts[0] > before, 2, "the waiter to check again", interval=0)
    await written(cluster)
    assert requests() == asked, "denied 0.25 s ago and nothing changed since: not asked again"
    cluster.now = denied_at + RECHECK_SECONDS
    before = attempts[0]
    await waiter.tick()
    await wait_until(lambda: attempts[0] > before, 2, "the tick to wake the waiter", interval=0)
    await written(cluster)
    assert requests() == asked + 1, "asked again a second after the denial"
    await answered(cluster)
    assert not task.done()
    # The holder's call is settled and its lease returned: the room grows, the waiter asks.
    asked = requests()
    holder.settle(held, worst // 2)
    holder.delivered(held)
    cluster.now += 0.1
    for lease in list(holder._allowances[("wf", None)].leases):
        lease.last_used = cluster.now - 3600  # idle: returned at the next tick
    await holder.tick()
    await answered(cluster)
    await cluster.run(task, limit_seconds=0.5)
    assert requests() == asked + 1 and task.result().workflow_lease.granted >= worst


async def test_gate_hour_wait_ends_when_limit_is_raised() -> None:
    cluster = Cluster(settings_with(hour_usd=1.0), holders=1)
    task = await hour_spent_and_waiting(cluster)
    operator(cluster, limit_set("hour", 2.0))
    # asked again within a second of the denial, and granted out of the new limit
    await cluster.run(task, limit_seconds=RECHECK_SECONDS + 0.5)
    r = task.result()
    assert r.hour_lease is not None
    ledger = cluster.cost_view.hour_ledger(hour_window(cluster.now))
    assert ledger is not None and ledger.leases[r.hour_lease.lease_id].granted == r.hour_lease.granted > 0


async def test_gate_release_gives_the_reservation_back_to_the_next_call() -> None:
    cluster = Cluster(settings_with(workflow_usd=0.0015, overdraft=False), holders=1)
    gate = cluster.gates[0]
    worst = usd_to_nanos(0.001)
    r1 = await admitted(cluster, gate, "wf-a", worst)
    assert r1.workflow_lease.granted == worst, "half the budget is less than a call: one call's worth"
    waiter = await admitting(gate, "wf-a", worst)
    await answered(cluster)
    assert not waiter.done() and gate.denied == 1, "what the budget has left does not fit a call"
    assert gate.in_flight_nanos() == worst
    requests = len(lease_records(cluster, "request"))
    gate.release(r1)
    assert gate.in_flight_nanos() == 0
    r2 = await asyncio.wait_for(waiter, 2)
    assert r2.workflow_lease is r1.workflow_lease and r2.hour_lease is r1.hour_lease
    assert len(lease_records(cluster, "request")) == requests, "no new lease was needed"
    assert gate.in_flight_nanos() == worst and gate.workflow_committed("wf-a") == (0, 0)


async def test_gate_renews_a_lease_in_use_every_third_of_lease_seconds() -> None:
    cluster = Cluster(settings_with(lease_seconds=9.0), holders=1)
    gate = cluster.gates[0]
    asked_at = cluster.now
    r = await admitted(cluster, gate, "wf-a", 1_000)  # a call that takes 12 s
    for step in range(1, 121):
        cluster.now = asked_at + step / 10
        await gate.tick()
        await answered(cluster)
    for lease in (r.workflow_lease, r.hour_lease):
        assert lease is not None
        renewed = [at - asked_at for rec, at in lease_records(cluster, "renew") if rec.lease_id == lease.lease_id]
        assert renewed == [3.0, 6.0, 9.0, 12.0], lease.scope
    assert lease_records(cluster, "return") == [], "a lease in use is never returned"
    wf = cluster.cost_view.workflow_spend("wf-a")
    ledger = cluster.cost_view.hour_ledger(hour_window(asked_at))
    assert wf is not None and ledger is not None
    assert wf.leases[r.workflow_lease.lease_id].renewed == asked_at + 12.0, "not expired by the cost role"
    assert ledger.leases[r.hour_lease.lease_id].renewed == asked_at + 12.0  # type: ignore[union-attr]
    await cluster.settle(gate, r, 700)
    cluster.pump()
    wf = cluster.cost_view.workflow_spend("wf-a")
    assert wf is not None and wf.leases[r.workflow_lease.lease_id].spent == 700, "still there to count the call"


async def test_gate_returns_a_lease_idle_for_half_of_lease_seconds() -> None:
    cluster = Cluster(settings_with(lease_seconds=9.0), holders=1)
    gate = cluster.gates[0]
    r = await admitted(cluster, gate, "wf-a", 1_000)
    used_at = cluster.now
    await cluster.settle(gate, r, 400)  # the call is over: its cost records are in the log
    for step in range(1, 61):
        cluster.now = used_at + step / 10
        await gate.tick()
        await answered(cluster)
    returned = {rec.lease_id: at - used_at for rec, at in lease_records(cluster, "return")}
    assert r.hour_lease is not None
    assert returned == pytest.approx({r.workflow_lease.lease_id: 4.6, r.hour_lease.lease_id: 4.6}, abs=1e-3)
    wf = cluster.cost_view.workflow_spend("wf-a")
    ledger = cluster.cost_view.hour_ledger(hour_window(used_at))
    assert wf is not None and (wf.nanos, wf.leases) == (400, {}), "the cost role freed what was not spent"
    assert ledger is not None and (ledger.nanos, ledger.leases) == (400, {})


async def test_gate_stops_using_a_lease_at_80_percent_of_lease_seconds() -> None:
    """A lease not renewed (no tick ran: the loop was busy) is not used past 80 % of
    ``lease_seconds`` from when it was asked for, before the cost role may expire it."""
    cluster = Cluster(settings_with(lease_seconds=10.0), holders=1)
    gate = cluster.gates[0]
    asked_at = cluster.now
    first = await admitted(cluster, gate, "wf-a", 1_000)
    gate.release(first)
    assert first.hour_lease is not None
    held = {first.workflow_lease.lease_id, first.hour_lease.lease_id}
    cluster.now = asked_at + 7.9
    second = await admitted(cluster, gate, "wf-a", 1_000)
    assert second.hour_lease is not None
    assert {second.workflow_lease.lease_id, second.hour_lease.lease_id} == held
    gate.release(second)
    cluster.now = asked_at + 8.0
    third = await admitted(cluster, gate, "wf-a", 1_000)
    assert third.hour_lease is not None
    assert not {third.workflow_lease.lease_id, third.hour_lease.lease_id} & held, "new leases"
    assert {rec.lease_id for rec, _ in lease_records(cluster, "return")} == held, "the old ones given back"


async def test_gate_returns_a_lease_only_once_its_calls_cost_events_are_delivered() -> None:
    cluster = Cluster(settings_with(lease_seconds=9.0), holders=1)
    gate = cluster.gates[0]
    r = await admitted(cluster, gate, "wf-a", 1_000)
    assert r.hour_lease is not None
    gate.settle(r, 600)
    assert (r.workflow_lease.spent, r.workflow_lease.reserved) == (600, 0)
    cluster.now += 6.0  # idle for longer than lease_seconds / 2

    async def returned() -> set[str]:
        await gate.tick()
        await written(cluster)
        return {rec.lease_id for rec, _ in lease_records(cluster, "return")}

    assert await returned() == set(), "its cost event is not in Kafka yet"
    gate.delivered(r, 1, 0)
    assert await returned() == {r.workflow_lease.lease_id, r.hour_lease.lease_id}


async def test_gate_tells_the_hours_ledger_what_its_lease_spent_once_a_tick_and_before_returning_it() -> None:
    cluster = Cluster(settings_with(lease_seconds=9.0), holders=1)
    gate = cluster.gates[0]
    calls = [await admitted(cluster, gate, "wf-a", 1_000) for _ in range(3)]
    hour_lease = calls[0].hour_lease
    assert hour_lease is not None and all(r.hour_lease is hour_lease for r in calls)
    gate.settle(calls[0], 600)
    gate.settle(calls[1], 250)
    assert lease_records(cluster, "spend") == [], "not one record per call"
    await gate.tick()
    await written(cluster)
    [(spend, _)] = lease_records(cluster, "spend")
    assert (spend.lease_id, spend.scope, spend.spent_nanos) == (hour_lease.lease_id, "hour", 850)
    assert spend.window_start == datetime.fromtimestamp(hour_window(cluster.now), UTC)
    await gate.tick()
    await written(cluster)
    assert len(lease_records(cluster, "spend")) == 1, "nothing new spent: nothing to tell"
    gate.settle(calls[2], 100)
    for r in calls:
        gate.delivered(r)
    cluster.now += 6.0  # idle: returned at the next tick, with what it spent since
    await gate.tick()
    await written(cluster)
    hour = [decode_cost_record(value) for _key, value, _at in cluster.log[cluster.partition_of(b"hour")]]
    mine = [(rec.budget, rec.spent_nanos) for rec in hour
            if isinstance(rec, BudgetRecord) and rec.lease_id == hour_lease.lease_id]
    assert mine[-2:] == [("spend", 100), ("return", 0)], "the spend goes before the return"
    cluster.pump()
    ledger = cluster.cost_view.hour_ledger(hour_window(cluster.now))
    assert ledger is not None and (ledger.nanos, ledger.leases) == (950, {}), "what was not spent is free"


async def test_gate_a_call_that_cost_nothing_writes_no_spend_record() -> None:
    cluster = Cluster(settings_with(), holders=1)
    gate = cluster.gates[0]
    r = await admitted(cluster, gate, "wf-a", 1_000)
    gate.settle(r, 0)
    gate.delivered(r)  # its cost event
    for lease in (r.workflow_lease, r.hour_lease):
        assert lease is not None and (lease.spent, lease.reserved, lease.calls) == (0, 0, 0)
    await gate.tick()
    await written(cluster)
    assert lease_records(cluster, "spend") == []


async def test_gate_summary_shows_the_leases_held_and_requests_unanswered() -> None:
    cluster = Cluster(settings_with(lease_seconds=8.0, opening_share=0.0), holders=1)  # no openings asked for
    gate, view = cluster.gates[0], cluster.views[0]
    asked_at = cluster.now
    cluster.cost_role_up = False
    task = await admitting(gate, "wf-a", 1_000)
    await written(cluster)
    cluster.now = asked_at + 5.0
    assert gate.summary() == {
        "leases_held": 0, "leases_held_usd": 0.0, "lease_requests_waiting": 2,
        "lease_request_oldest_seconds": 5.0, "grants_stalled": False,
    }
    cluster.now = asked_at + 5.5
    assert gate.summary()["grants_stalled"] is True, "unanswered for longer than 5 s (at least lease_seconds / 2)"
    assert {k: view.summary()[k] for k in ("lease_requests_waiting", "grants_stalled")} == {
        "lease_requests_waiting": 2, "grants_stalled": True,
    }, "on /ready"
    cluster.cost_role_up = True
    await answered(cluster)
    await asyncio.wait_for(task, 2)
    # two leases of an eighth of their scope's room ($100 each, nothing spent yet), one
    # call's worth reserved in each
    assert gate.summary() == {
        "leases_held": 2, "leases_held_usd": nanos_to_usd(2 * (100 * 10**9 // 8 - 1_000)), "lease_requests_waiting": 0,
        "lease_request_oldest_seconds": 0.0, "grants_stalled": False,
    }


# ------------------------------------------------------------------ cost role: leases
class CostRoleBench:
    """The cost role's accountant over in-memory tables, its view reading back what it
    publishes; ``apply`` counts one record of the costs topic."""

    def __init__(self, settings: Settings, published: Sequence[bytes] = ()) -> None:
        self.topology = Topology(settings)
        self.view = GuardrailView(settings)
        for value in published:
            self.view.apply(self.topology.spend.name, value)
        self.accountant = CostAccountant(settings, self.topology, HourWindows(), Workflows(), self.view)
        self.published: list[bytes] = []

    def apply(
        self, record: BudgetRecord | CostEvent, partition: int, offset: int, at: float = NOW
    ) -> list[SpendSnapshot]:
        """The spend snapshots published for ``record``."""
        key = record.scope if isinstance(record, BudgetRecord) else record.workflow_id
        source = Source(self.topology.costs.name, partition, offset, key.encode(), encode(record), at)
        self.accountant.batch.add(self.accountant.apply(source, at))
        self.accountant.tables.write()
        out = [o.value for o in self.accountant.batch.take() if o.topic == self.topology.spend.name]
        for value in out:
            self.view.apply(self.topology.spend.name, value)
        self.published.extend(out)
        return [decode(value, SpendSnapshot) for value in out]


def lease_request(lease_id: str, scope: str, want: int, least: int, window: int | None = None) -> BudgetRecord:
    return BudgetRecord(
        budget="request", lease_id=lease_id, scope=scope, want_nanos=want, least_nanos=least,
        window_start=datetime.fromtimestamp(window, UTC) if window is not None else None,
    )


def hour_spend(lease_id: str, nanos: int) -> BudgetRecord:
    return BudgetRecord(
        budget="spend", lease_id=lease_id, scope="hour", spent_nanos=nanos,
        window_start=datetime.fromtimestamp(WINDOW, UTC),
    )


def call_cost(workflow_id: str, nanos: int, lease_id: str | None = None) -> CostEvent:
    return CostEvent(
        request_id=f"r-{nanos}", workflow_id=workflow_id, agent_type="researcher", tier=Tier.NANO,
        provider="openai", model="gpt-5-nano", attempt=1, input_tokens=1, output_tokens=1,
        cost_usd=nanos_to_usd(nanos), lease_id=lease_id,
    )


def only(snaps: list[SpendSnapshot], scope: str) -> SpendSnapshot:
    [snap] = [s for s in snaps if s.scope == scope]
    return snap


def test_a_published_workflow_total_keeps_its_idle_clock() -> None:
    """A workflow whose table entry was dropped as idle (or lost in a restart) comes back
    from its published total with the time it was last active, so it still expires."""
    published = WorkflowTotal(500, 2, 9, updated_at=1_000.0, leases={"h#1": Lease(900, 500, 990.0)})
    restored = _newest(Total(), published)
    assert restored == Total(500, 9, 1_000.0, {"h#1": Lease(900, 500, 990.0)})
    assert expired(restored, 1_000.0 + 3_601, 3_600) and not expired(restored, 1_000.0 + 3_599, 3_600)
    # the table wins when it includes as much; hour totals carry no idle clock
    assert _newest(Total(700, 9, 5.0), published) == Total(700, 9, 5.0)
    assert _newest(Total(), PartTotal(40, 3)) == Total(40, 3, 0.0)


def test_cost_role_grants_a_workflow_lease_in_the_workflow_snapshot() -> None:
    role = CostRoleBench(settings_with(workflow_usd=1.0))
    [snap] = role.apply(lease_request("a#1", "wf-a", want=300_000_000, least=100_000_000), partition=2, offset=7)
    assert (snap.kind, snap.scope, snap.partition, snap.last_offset, snap.spent_nanos) == ("workflow", "wf-a", 2, 7, 0)
    assert snap.leases == {"a#1": LeaseState(granted_nanos=300_000_000, spent_nanos=0, renewed_at=NOW)}
    [snap] = role.apply(lease_request("b#1", "wf-a", want=USD, least=100_000_000), partition=2, offset=8)
    assert snap.leases["b#1"].granted_nanos == 350_000_000, "half of what the first lease left"
    assert set(snap.leases) == {"a#1", "b#1"}


def test_cost_role_grants_an_hour_lease_in_the_hour_ledger() -> None:
    role = CostRoleBench(settings_with(hour_usd=1.0))
    # 600M spent this hour by calls made under no hourly lease: the ledger has 400M of room
    role.apply(call_cost("wf-x", 600_000_000), partition=3, offset=0)
    snaps = role.apply(lease_request("a#1", "hour", want=USD, least=100_000_000, window=WINDOW), partition=1, offset=4)
    ledger = only(snaps, LEDGER)
    assert len(snaps) == 1
    assert (ledger.kind, ledger.partition, ledger.last_offset, ledger.spent_nanos) == ("hour", 1, 4, 0)
    assert ledger.window_start == datetime.fromtimestamp(WINDOW, UTC)
    assert ledger.leases == {"a#1": LeaseState(granted_nanos=200_000_000, spent_nanos=0, renewed_at=NOW)}
    denied = only(role.apply(lease_request("b#1", "hour", want=USD, least=250_000_000, window=WINDOW), 1, 5), LEDGER)
    assert set(denied.leases) == {"a#1"} and denied.last_offset == 5, "no room for its least: counted, not granted"
    assert role.view.hour_ledger(WINDOW) == PartTotal(0, 5, 1)


def test_cost_role_counts_a_calls_cost_against_its_lease() -> None:
    role = CostRoleBench(settings_with(hour_usd=1.0, workflow_usd=1.0))
    role.apply(lease_request("a#1", "wf-a", 300_000_000, 100_000_000), partition=2, offset=0)
    role.apply(lease_request("a#2", "hour", 300_000_000, 100_000_000, window=WINDOW), partition=1, offset=0)
    wf = only(role.apply(call_cost("wf-a", 120_000_000, lease_id="a#1"), partition=2, offset=1), "wf-a")
    assert wf.spent_nanos == 120_000_000
    assert wf.leases["a#1"] == LeaseState(granted_nanos=300_000_000, spent_nanos=120_000_000, renewed_at=NOW)
    ledger = only(role.apply(hour_spend("a#2", 120_000_000), partition=1, offset=1), LEDGER)
    assert ledger.spent_nanos == 120_000_000 and ledger.leases["a#2"].spent_nanos == 120_000_000
    # a cost naming no lease of the workflow counts in its total only
    wf = only(role.apply(call_cost("wf-a", 5_000_000, lease_id="gone#9"), partition=2, offset=2), "wf-a")
    assert wf.spent_nanos == 125_000_000 and set(wf.leases) == {"a#1"}
    assert wf.leases["a#1"].spent_nanos == 120_000_000
    assert role.view.hour_spend(WINDOW) == 125_000_000, "both counted in the hour from their cost events"


def test_cost_role_replaying_an_offset_changes_nothing() -> None:
    role = CostRoleBench(settings_with(hour_usd=1.0, workflow_usd=1.0))
    records = [
        (lease_request("a#1", "wf-a", 300_000_000, 100_000_000), 2, 0),
        (call_cost("wf-a", 120_000_000, lease_id="a#1"), 2, 1),
        (BudgetRecord(budget="return", lease_id="a#1", scope="wf-a"), 2, 2),
        (lease_request("a#2", "hour", 300_000_000, 100_000_000, window=WINDOW), 1, 0),
        (hour_spend("a#2", 120_000_000), 1, 1),
    ]
    for record, p, offset in records:
        role.apply(record, p, offset)
    wf, ledger = role.view.workflow_spend("wf-a"), role.view.hour_ledger(WINDOW)
    assert wf is not None and (wf.nanos, wf.last_offset, wf.leases) == (120_000_000, 2, {})
    assert ledger is not None and set(ledger.leases) == {"a#2"}
    for record, p, offset in records:  # read again after a crash before the commit
        for snap in role.apply(record, p, offset, at=NOW + 1):
            if snap.scope == "wf-a":
                assert (snap.spent_nanos, snap.last_offset, snap.leases) == (120_000_000, 2, {}), record
            elif snap.scope == LEDGER:
                assert (snap.spent_nanos, snap.last_offset) == (120_000_000, 1), record
                assert snap.leases == {"a#2": LeaseState(granted_nanos=300_000_000, spent_nanos=120_000_000,
                                                         renewed_at=NOW)}, record
    assert role.view.hour_spend(WINDOW) == 120_000_000


def test_a_restarted_cost_role_continues_from_the_published_leases() -> None:
    settings = settings_with(hour_usd=1.0, workflow_usd=1.0)
    before = CostRoleBench(settings)
    before.apply(lease_request("a#1", "hour", 600_000_000, 100_000_000, window=WINDOW), 1, 0)  # half: 500M
    before.apply(lease_request("a#2", "wf-a", 600_000_000, 100_000_000), 2, 0)  # half: 500M
    before.apply(hour_spend("a#1", 100_000_000), 1, 1)
    before.apply(call_cost("wf-a", 100_000_000, lease_id="a#2"), 2, 1)
    # a new cost role with empty tables (their changelog lost its tail): it reads the spend topic back
    after = CostRoleBench(settings, published=before.published)
    wf = only(after.apply(lease_request("b#1", "wf-a", USD, 1), 2, 2), "wf-a")
    assert (wf.spent_nanos, wf.last_offset) == (100_000_000, 2)
    assert wf.leases["a#2"] == LeaseState(granted_nanos=500_000_000, spent_nanos=100_000_000, renewed_at=NOW)
    assert wf.leases["b#1"].granted_nanos == 250_000_000, "half of 1e9 - 100M spent - 400M still held"
    ledger = only(after.apply(lease_request("b#2", "hour", USD, 1, window=WINDOW), 1, 2), LEDGER)
    assert (ledger.spent_nanos, ledger.last_offset) == (100_000_000, 2)
    assert ledger.leases["a#1"].spent_nanos == 100_000_000
    assert ledger.leases["b#2"].granted_nanos == 250_000_000
    replayed = only(after.apply(call_cost("wf-a", 100_000_000, lease_id="a#2"), 2, 1), "wf-a")
    assert replayed.spent_nanos == 100_000_000, "an offset the published total includes"


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
    pending.set_hour(key0, window, Total(10, 0, ts), 0)
    pending.set_hour(key0, window, Total(25, 1, ts), 0)
    pending.set_hour(key1, window, Total(7, 0, ts), 1)
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


def test_the_hour_reached_across_partitions_in_one_batch_is_announced() -> None:
    """Two partitions' events in one batch take the hour past its limit together: the cost
    role counts both before its own snapshots are read back, and still announces it."""
    from benchmarks.baseline import HourWindows, Workflows
    from schemas.models import CostEvent, Tier
    from streams.envelope import Source
    from streams.roles.cost import CostAccountant

    settings = load_settings(environ={}, overrides={"cost_guardrails": {
        "max_cost_per_hour_usd": 1.0, "alert_threshold_usd": 0.5,
    }})
    topology = Topology(settings)
    accountant = CostAccountant(settings, topology, HourWindows(), Workflows(), GuardrailView(settings))
    at = 7_200.0 + 60

    def spend(p: int, offset: int, usd: float) -> list[str]:
        event = CostEvent(
            request_id=f"r{p}-{offset}", workflow_id=f"wf-{p}", agent_type="researcher", tier=Tier.NANO,
            provider="openai", model="gpt-5-nano", attempt=1, input_tokens=1, output_tokens=1, cost_usd=usd,
        )
        source = Source(topology.costs.name, p, offset, f"wf-{p}".encode(), encode(event), at)
        out = accountant.apply(source, at)
        return [GuardrailEvent.model_validate_json(o.value).kind for o in out if o.topic == topology.guardrails.name]

    assert spend(0, 0, 0.3) == []
    assert spend(1, 0, 0.3) == ["alert"], "0.6 over both partitions"
    assert spend(0, 1, 0.3) == []
    assert spend(1, 1, 0.2) == ["limit_reached"], "1.1 over both partitions, none read back yet"
    assert spend(1, 2, 0.1) == [], "announced once"


def test_usd_to_nanos_of_a_float_is_the_exact_decimal_product_rounded() -> None:
    """The float path (every call's cost) gives what exact decimal arithmetic gives, for
    amounts quantized to a nano-dollar as prices and costs are, and for unquantized ones."""
    rng = random.Random(5)
    amounts = [rng.randrange(0, 10**15) / 10**9 for _ in range(20_000)]  # up to $1M, quantized
    amounts += [rng.uniform(0, 50) for _ in range(20_000)]  # any float, below a large limit
    amounts += [0.0, 1e-9, 0.1 + 0.2, 999_999.999999999, 2_000_000.000000001, -0.000123]
    for usd in amounts:
        assert usd_to_nanos(usd) == round(Decimal(str(usd)) * NANOS_PER_USD), usd
    assert usd_to_nanos(Decimal("0.0000000025")) == 2, "a Decimal is rounded half to even, exactly"
