"""Budget-aware downgrade: above the hour's alert threshold, PREMIUM work is served by
the STANDARD model and the result says so. Off by default."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import orjson

from schemas import AgentResult, CostEvent, Tier, decode, encode
from schemas.models import SpendSnapshot
from streams.envelope import Source
from streams.guardrails.budget import BudgetGate
from streams.guardrails.money import hour_window
from streams.guardrails.view import GuardrailView
from streams.pricing import PriceBook
from streams.processes import simulator_env
from streams.providers import ProviderRegistry
from streams.roles.tier import TierHandler
from streams.simulator import ProviderSimulator
from topologies import Settings, Topology, load_settings


def settings_for(sim: ProviderSimulator, downgrade: bool) -> Settings:
    return load_settings(environ={
        **simulator_env(sim.port),
        "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": "1",
        "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": "100",
        "TIERSTREAM__COST_GUARDRAILS__DOWNGRADE_PREMIUM_ABOVE_ALERT": str(downgrade).lower(),
    })


async def answer(settings: Settings, hour_spent_usd: float) -> tuple[AgentResult, CostEvent]:
    topology = Topology(settings)
    view = GuardrailView(settings)
    view.caught_up.set()
    snapshot = SpendSnapshot(
        kind="hour", scope="global", partition=0, spent_nanos=round(hour_spent_usd * 1e9), last_offset=0,
        window_start=datetime.fromtimestamp(hour_window(time.time()), UTC),
    )
    view.apply(topology.spend.name, encode(snapshot))
    registry = ProviderRegistry(settings)
    handler = TierHandler(Tier.PREMIUM, settings, topology, registry, PriceBook(settings), BudgetGate(view))
    body = orjson.dumps({
        "request_id": "d-1", "workflow_id": "wf-d", "agent_type": "planner", "task": "Plan it.",
        "max_output_tokens": 64, "tier": "premium", "routed_by": "hint",
    })
    try:
        out = await handler.handle(Source(topology.tiers[Tier.PREMIUM].name, 0, 0, b"wf-d", body))
    finally:
        await registry.close()
    assert [o.topic for o in out] == [topology.results.name, topology.costs.name]
    return decode(out[0].value, AgentResult), decode(out[1].value, CostEvent)


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
