"""Budget-aware downgrade: above the hour's alert threshold, PREMIUM work is served by
the STANDARD model and the result says so. Off by default."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import UTC, datetime

import orjson

from schemas import AgentResult, CostEvent, Tier, decode, encode
from schemas.models import SpendSnapshot
from streams.envelope import Outgoing, Source
from streams.guardrails.money import hour_window, usd_to_nanos
from streams.pricing import PriceBook
from streams.processes import simulator_env
from streams.providers import ProviderRegistry
from streams.roles.tier import TierHandler
from streams.simulator import ProviderSimulator
from tests.test_leases import Cluster
from topologies import Settings, load_settings


def settings_for(sim: ProviderSimulator, downgrade: bool) -> Settings:
    return load_settings(environ={
        **simulator_env(sim.port),
        "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": "1",
        "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": "100",
        "TIERSTREAM__COST_GUARDRAILS__DOWNGRADE_PREMIUM_ABOVE_ALERT": str(downgrade).lower(),
    })


async def served(cluster: Cluster, work: Awaitable[list[Outgoing]], timeout: float = 10) -> list[Outgoing]:
    """``work`` run while the in-memory cost role answers the lease requests it writes."""
    task = asyncio.ensure_future(work)
    deadline = time.monotonic() + timeout
    while not task.done():
        assert time.monotonic() < deadline, "the request was not answered"
        cluster.pump()
        await asyncio.wait([task], timeout=0.01)
    return task.result()


async def answer(settings: Settings, hour_spent_usd: float) -> tuple[AgentResult, CostEvent]:
    cluster = Cluster(settings, holders=1)
    # The downgrade reads the hour's spend at the wall-clock hour: the leases use it too.
    cluster.now = time.time()
    topology, view, gate = cluster.topology, cluster.views[0], cluster.gates[0]
    snapshot = SpendSnapshot(
        kind="hour", scope="global", partition=0, spent_nanos=round(hour_spent_usd * 1e9), last_offset=0,
        window_start=datetime.fromtimestamp(hour_window(cluster.now), UTC),
    )
    view.apply(topology.spend.name, encode(snapshot))
    registry = ProviderRegistry(settings)
    handler = TierHandler(Tier.PREMIUM, settings, topology, registry, PriceBook(settings), gate)
    body = orjson.dumps({
        "request_id": "d-1", "workflow_id": "wf-d", "agent_type": "planner", "task": "Plan it.",
        "max_output_tokens": 64, "tier": "premium", "routed_by": "hint",
    })
    try:
        out = await served(cluster, handler.handle(Source(topology.tiers[Tier.PREMIUM].name, 0, 0, b"wf-d", body)))
    finally:
        await registry.close()
    # the result, then the call's cost naming its workflow lease; the hour's lease counts it
    assert [o.topic for o in out] == [topology.results.name, topology.costs.name]
    result, cost = decode(out[0].value, AgentResult), decode(out[1].value, CostEvent)
    [hour_lease] = gate._allowances[("hour", hour_window(cluster.now))].leases
    assert (hour_lease.spent, hour_lease.unreported) == (usd_to_nanos(cost.cost_usd),) * 2
    granted = cluster.cost_view.workflow_spend("wf-d")
    assert granted is not None and cost.lease_id in granted.leases
    return result, cost


async def test_premium_is_served_by_standard_above_the_alert_threshold(simulator) -> None:
    settings = settings_for(simulator, downgrade=True)
    result, cost = await answer(settings, hour_spent_usd=1.5)
    standard = settings.tiers[Tier.STANDARD]
    assert (result.tier, result.downgraded_from, result.model) == (Tier.STANDARD, Tier.PREMIUM, standard.model)
    assert (cost.tier, cost.model) == (Tier.STANDARD, standard.model)
    assert simulator.stats()["by_model"] == {standard.model: 1}


async def test_below_the_threshold_or_when_off_premium_stays_premium(simulator) -> None:
    premium = settings_for(simulator, downgrade=True).tiers[Tier.PREMIUM]
    below, _ = await answer(settings_for(simulator, downgrade=True), hour_spent_usd=0.5)
    off, _ = await answer(settings_for(simulator, downgrade=False), hour_spent_usd=1.5)
    for result in (below, off):
        assert (result.tier, result.downgraded_from, result.model) == (Tier.PREMIUM, None, premium.model)
    assert simulator.stats()["by_model"] == {premium.model: 2}
