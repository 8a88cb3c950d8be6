"""The classifier: rules, meta-routing through the simulator with the real SDKs,
fallback to STANDARD, tier hints and agent-type floors."""

from __future__ import annotations

import orjson
import pytest

from schemas import AgentRequest, Tier, TieredRequest, decode
from schemas.models import CostEvent
from streams.envelope import Source
from streams.pricing import PriceBook
from streams.processes import simulator_env
from streams.providers import ProviderRegistry
from streams.roles.classifier import (
    META_ROUTING_MAX_TOKENS,
    Classifier,
    ClassifierHandler,
    parse_tier_word,
)
from streams.routing.rules import rules_tier
from streams.simulator import ProviderSimulator
from topologies import Settings, Topology, load_settings


def request(task: str, agent_type: str = "writer", hint: Tier | None = None) -> AgentRequest:
    return AgentRequest(request_id="r-1", workflow_id="wf-1", agent_type=agent_type, task=task, tier_hint=hint)


@pytest.fixture
def rules_settings() -> Settings:
    return load_settings(environ={})


@pytest.mark.parametrize(
    ("task", "tier"),
    [
        ("Classify this email as spam or not.", Tier.NANO),
        ("Extract the invoice number.", Tier.NANO),
        ("Write a blog post about tea.", Tier.STANDARD),
        ("Propose the ARCHITECTURE of a payments system.", Tier.PREMIUM),
        ("Find the root cause of the outage.", Tier.PREMIUM),
        ("x" * 4000, Tier.PREMIUM),
        ("x" * 3999, Tier.STANDARD),
    ],
)
def test_rules(rules_settings: Settings, task: str, tier: Tier) -> None:
    assert rules_tier(task, rules_settings.classifier.rules) is tier


async def test_agent_type_floor_and_hint(rules_settings: Settings) -> None:
    classifier = Classifier(rules_settings, None)
    # researcher has min_tier standard: a NANO task is raised to STANDARD
    raised = await classifier.classify(request("Extract the dates.", agent_type="researcher"))
    assert (raised.tier, raised.routed_by) == (Tier.STANDARD, "rules")
    # an explicit hint wins over rules and floor
    hinted = await classifier.classify(request("Extract the dates.", agent_type="researcher", hint=Tier.NANO))
    assert (hinted.tier, hinted.routed_by) == (Tier.NANO, "hint")
    no_floor = load_settings(environ={"TIERSTREAM__CLASSIFIER__AGENT_TYPE_FLOOR": "false"})
    plain = await Classifier(no_floor, None).classify(request("Extract the dates.", agent_type="researcher"))
    assert plain.tier is Tier.NANO


@pytest.mark.parametrize(
    ("answer", "tier"),
    [("PREMIUM", Tier.PREMIUM), (" nano.\n", Tier.NANO), ("**Standard**", Tier.STANDARD), ("banana", None), ("", None)],
)
def test_parse_tier_word(answer: str, tier: Tier | None) -> None:
    assert parse_tier_word(answer) is tier


def llm_settings(sim: ProviderSimulator) -> Settings:
    return load_settings(
        environ={
            "TIERSTREAM__CLASSIFIER__STRATEGY": "llm",
            **simulator_env(sim.port),
            "TIERSTREAM__PROVIDERS__OPENAI__RETRY_INITIAL_SECONDS": "0.01",
        }
    )


@pytest.mark.parametrize(
    ("task", "tier", "routed_by"),
    [
        ("Plan a multi-step migration of our monolith architecture.", Tier.PREMIUM, "llm"),
        ("Write a blog post about tea.", Tier.STANDARD, "llm"),
        ("Route this: #sim:reply=NANO", Tier.NANO, "llm"),
        ("Anything #sim:reply=I think this is quite hard", Tier.STANDARD, "llm_fallback"),
        ("Anything #sim:status=400", Tier.STANDARD, "llm_fallback"),
    ],
)
async def test_meta_routing_through_the_simulator(
    simulator: ProviderSimulator, task: str, tier: Tier, routed_by: str
) -> None:
    settings = llm_settings(simulator)
    registry = ProviderRegistry(settings)
    try:
        decision = await Classifier(settings, registry).classify(request(task, agent_type="router"))
    finally:
        await registry.close()
    assert (decision.tier, decision.routed_by) == (tier, routed_by)
    stats = simulator.stats()
    # one NANO call, never retried, even when the provider answered 400
    assert stats["by_model"] == {settings.tiers[Tier.NANO].model: 1}


async def test_meta_routing_call_is_costed(simulator: ProviderSimulator) -> None:
    settings = llm_settings(simulator)
    topology = Topology(settings)
    registry = ProviderRegistry(settings)
    prices = PriceBook(settings)
    handler = ClassifierHandler(settings, topology, Classifier(settings, registry), prices)
    body = orjson.dumps({"request_id": "q1", "workflow_id": "wf-9", "agent_type": "router",
                         "task": "Decide. #sim:reply=PREMIUM"})
    try:
        out = await handler.handle(Source(topology.requests.name, 0, 7, b"wf-9", body))
    finally:
        await registry.close()
    assert [o.topic for o in out] == [topology.tiers[Tier.PREMIUM].name, topology.costs.name]
    tiered = decode(out[0].value, TieredRequest)
    assert (tiered.tier, tiered.routed_by, tiered.request_id) == (Tier.PREMIUM, "llm", "q1")
    cost = decode(out[1].value, CostEvent)
    nano = settings.tiers[Tier.NANO]
    assert (cost.tier, cost.model, cost.workflow_id) == (Tier.NANO, nano.model, "wf-9")
    assert 1 <= cost.output_tokens <= META_ROUTING_MAX_TOKENS and cost.input_tokens > 0
    expected = prices.cost(nano.provider, nano.model, cost.input_tokens, cost.output_tokens)
    assert cost.cost_usd == float(expected) > 0


@pytest.mark.parametrize(("max_tokens", "fits"), [(120_000, True), (128_000, False)])
async def test_requests_over_the_context_window_are_dead_lettered(
    rules_settings: Settings, max_tokens: int, fits: bool
) -> None:
    """gpt-4o-mini (the NANO model) takes 128,000 tokens: input estimate plus max_output_tokens."""
    prices = PriceBook(rules_settings)
    assert prices.context_window("openai", "gpt-4o-mini") == 128_000
    handler = ClassifierHandler(rules_settings, Topology(rules_settings), Classifier(rules_settings, None), prices)
    raw = orjson.dumps({"request_id": "r-ctx", "workflow_id": "wf-1", "agent_type": "writer",
                        "task": "Summarise.", "tier_hint": "nano", "max_output_tokens": max_tokens})
    [out] = await handler.handle(Source("agent.requests", 0, 7, b"wf-1", raw))
    if fits:
        assert out.topic == "agent.requests.nano"
    else:
        letter = orjson.loads(out.value)
        assert (out.topic, letter["code"], letter["request_id"]) == ("agent.dlq", "context_too_long", "r-ctx")
        assert "128,000-token context window of gpt-4o-mini" in letter["reason"]


def test_a_configured_context_window_overrides_the_library() -> None:
    settings = load_settings(environ={
        "TIERSTREAM__PRICES__GPT-4O-MINI__INPUT_PER_MTOK": "0.15",
        "TIERSTREAM__PRICES__GPT-4O-MINI__OUTPUT_PER_MTOK": "0.6",
        "TIERSTREAM__PRICES__GPT-4O-MINI__CONTEXT_WINDOW_TOKENS": "4096",
    })
    assert PriceBook(settings).context_window("openai", "gpt-4o-mini") == 4096
    assert PriceBook(settings).context_window("openai", "no-such-model") is None
