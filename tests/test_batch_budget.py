"""A batch's worst case reserved against the workflow and hourly budgets before it is sent,
without a broker: the in-memory costs topic and cost role of ``tests.test_leases``, and
the batch role's :class:`BatchBudget` on a gate with long reservations."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.codec import encode
from schemas.models import CostEvent, Tier, TieredRequest
from streams.batches.budget import BatchBudget, Rebalanced
from streams.guardrails.budget import BudgetGate
from streams.guardrails.money import hour_window, usd_to_nanos
from streams.guardrails.view import GuardrailView
from streams.pricing import PriceBook
from tests.test_leases import NOW, USD, Cluster, _until, settings_with

PROVIDER, MODEL = "openai", "gpt-4o-mini"


def request(n: int, workflow: str) -> TieredRequest:
    return TieredRequest(request_id=f"r-{n}", workflow_id=workflow, agent_type="writer", task=f"Say {n}.",
                         max_output_tokens=100, tier=Tier.NANO, routed_by="hint", latency_class="batch")


def worst_case() -> int:
    """One request's worst case at the batch price (every request here has the same)."""
    budget = BatchBudget(None, PriceBook(settings_with()), 0.5)  # type: ignore[arg-type]
    return budget.worst(request(0, "wf"), PROVIDER, MODEL)


def batch_role_in(cluster: Cluster, patience: float = 0.2) -> BatchBudget:
    """A batch role's budget whose gate writes to the cluster's costs topic and reads its
    spend snapshots."""
    view = GuardrailView(cluster.settings)
    view.caught_up.set()
    gate = BudgetGate(view, cluster.send, "batch",
                      clock=lambda: cluster.now, long_reservations=True)
    cluster.views.append(view)
    cluster.gates.append(gate)
    return BatchBudget(gate, PriceBook(cluster.settings), 0.5, patience=patience)


async def in_cluster(cluster: Cluster, work: Awaitable[Any]) -> Any:
    """``work``'s result, run while the cluster's time passes, a millisecond a turn: an
    admission waits for its tasks a real second at most, which must not take the cluster
    into the next hour."""
    task = asyncio.ensure_future(work)
    await cluster.run(task, step=0.001)
    return task.result()


async def answer(cluster: Cluster, budget: BatchBudget, items: list[TieredRequest], nanos: int) -> None:
    """The batch ended, each item costing ``nanos``: each item's cost event (naming its
    lease and hour), then the reservations settled, as the batch role does (the hour's
    spend goes with the gate's next tick)."""
    for r in items:
        fields = budget.cost_fields(r.request_id, datetime.fromtimestamp(NOW, UTC))
        event = CostEvent(request_id=r.request_id, workflow_id=r.workflow_id, agent_type=r.agent_type, tier=r.tier,
                          provider=PROVIDER, model=MODEL, attempt=1, input_tokens=1, output_tokens=1,
                          cost_usd=nanos / USD, **fields)  # type: ignore[arg-type]
        await cluster.send(r.workflow_id.encode(), encode(event))
    budget.answered({r.request_id: nanos for r in items})


def outstanding(cluster: Cluster, workflow: str) -> int:
    total = cluster.cost_view.workflow_spend(workflow)
    return sum(lease.granted - lease.spent for lease in total.leases.values()) if total else 0


async def test_a_batch_reserves_its_worst_case_per_workflow_and_what_does_not_fit_is_exceeded() -> None:
    w = worst_case()
    cluster = Cluster(settings_with(workflow_usd=4.5 * w / USD), holders=0)
    budget = batch_role_in(cluster)
    runaway = [request(n, "wf-a") for n in range(6)]
    other = [request(10 + n, "wf-b") for n in range(2)]

    arrived = [runaway[0], other[0], *runaway[1:], other[1]]
    admission = await in_cluster(cluster, budget.reserve(arrived, PROVIDER, MODEL, rebalanced=lambda: False))
    assert admission.admitted == [r for r in arrived if r not in runaway[4:]], "in the order they arrived"
    assert admission.exceeded == runaway[4:], "its budget has room for four worst cases, not six"
    assert admission.waiting == []
    assert outstanding(cluster, "wf-a") == 4 * w, "a lease of exactly the batch's worst case, no more"
    hour = cluster.cost_view.hour_ledger(hour_window(NOW))
    assert [lease.granted for lease in hour.leases.values()] == [6 * w], "one hourly lease for the whole batch"
    assert budget.gate.workflow_room("wf-a") < w

    # The batch ends: each item cost half its worst case. Its lease goes back once idle.
    await answer(cluster, budget, admission.admitted, w // 2)
    await cluster.run(_until(lambda: outstanding(cluster, "wf-a") == 0))
    assert cluster.cost_view.workflow_spend("wf-a").nanos == 4 * (w // 2)
    assert not any(budget.holds(r.request_id) for r in admission.admitted)

    # What the batch did not spend is the workflow's again: 4.5 - 2 worst cases.
    more = [request(20 + n, "wf-a") for n in range(3)]
    admission = await in_cluster(cluster, budget.reserve(more, PROVIDER, MODEL, rebalanced=lambda: False))
    assert (admission.admitted, admission.exceeded) == (more[:2], more[2:])


async def test_a_batch_waits_for_the_hour_and_goes_without_what_its_own_reservations_crowd_out() -> None:
    """The hour has room for three of five workflows' worst cases: the three go as a batch,
    the other two wait, and are reserved once the batch's answers settled below the worst case."""
    w = worst_case()
    cluster = Cluster(settings_with(hour_usd=3.5 * w / USD), holders=0)
    budget = batch_role_in(cluster)
    requests = [request(n, f"wf-{n}") for n in range(5)]

    first = await in_cluster(cluster, budget.reserve(requests, PROVIDER, MODEL, rebalanced=lambda: False))
    assert len(first.admitted) == 3 and len(first.waiting) == 2 and first.exceeded == []
    ledger = cluster.cost_view.hour_ledger(hour_window(NOW))
    assert ledger.nanos + sum(lease.granted - lease.spent for lease in ledger.leases.values()) <= 3.5 * w

    await answer(cluster, budget, first.admitted, w // 4)
    budget.patience = 60.0  # both will be reserved: once the batch's leases went back
    second = await in_cluster(cluster, budget.reserve(first.waiting, PROVIDER, MODEL, rebalanced=lambda: False))
    assert sorted(r.request_id for r in second.admitted) == sorted(r.request_id for r in first.waiting)


async def test_a_rebalance_while_a_batch_waits_for_budget_releases_what_it_reserved() -> None:
    w = worst_case()
    cluster = Cluster(settings_with(hour_usd=1.5 * w / USD), holders=0)
    budget = batch_role_in(cluster, patience=600)
    requests = [request(n, f"wf-{n}") for n in range(3)]
    moved = False

    async def rebalance_once_one_is_reserved() -> None:
        nonlocal moved
        while not any(budget.holds(r.request_id) for r in requests):
            await asyncio.sleep(0)
        moved = True

    mover = asyncio.ensure_future(rebalance_once_one_is_reserved())
    with pytest.raises(Rebalanced):
        await in_cluster(cluster, budget.reserve(requests, PROVIDER, MODEL, rebalanced=lambda: moved))
    await mover
    assert not any(budget.holds(r.request_id) for r in requests)
    assert budget.gate.in_flight_nanos() == 0, "nothing stays reserved"


async def test_a_batch_items_cost_counts_in_the_hour_its_batch_was_reserved_in() -> None:
    cluster = Cluster(settings_with(), holders=0)
    earlier = hour_window(NOW) - 3600
    event = CostEvent(request_id="r-1", workflow_id="wf", agent_type="writer", tier=Tier.NANO, provider=PROVIDER,
                      model=MODEL, attempt=1, input_tokens=1, output_tokens=1, cost_usd=0.25,
                      window_start=datetime.fromtimestamp(earlier, UTC))
    await cluster.send(b"wf", encode(event))
    cluster.pump()
    assert cluster.cost_view.hour_spend(earlier) == usd_to_nanos(0.25)
    assert cluster.cost_view.hour_spend(hour_window(NOW)) == 0
    assert cluster.cost_view.workflow_spend("wf").nanos == usd_to_nanos(0.25)
