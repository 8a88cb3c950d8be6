"""The classifier role: give each request a model tier and route it to that tier's topic."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from schemas.codec import DecodeError, decode, encode
from schemas.models import AgentRequest, ChatMessage, RoutedBy, Tier, TieredRequest
from streams.costing import cost_event
from streams.envelope import Outgoing, Source, dead_letter, dead_letter_for
from streams.logs import log_context
from streams.pricing import PriceBook
from streams.providers import Completion, ProviderError, ProviderRegistry
from topologies.config import ClassifierSettings, RulesSettings, Settings
from topologies.topics import CLASSIFIER_ROLE, Topology

log = logging.getLogger(__name__)

TIER_ORDER = {Tier.NANO: 0, Tier.STANDARD: 1, Tier.PREMIUM: 2}
META_ROUTING_PROMPT = (
    "Classify the complexity of this agent task. "
    "Reply with exactly one word: NANO, STANDARD, or PREMIUM.\n"
    "NANO: routing, classification, simple extraction or yes/no questions.\n"
    "STANDARD: research, analysis, code generation, writing, summarisation.\n"
    "PREMIUM: multi-step reasoning, strategic planning, hard debugging, architecture."
)
META_ROUTING_MAX_TOKENS = 4
META_ROUTING_MAX_CHARS = 8000


def rules_tier(text: str, rules: RulesSettings) -> Tier:
    """Free, local tiering by keywords and length."""
    lowered = text.lower()
    if any(k in lowered for k in rules.premium_keywords) or len(text) >= rules.premium_min_chars:
        return Tier.PREMIUM
    if any(k in lowered for k in rules.nano_keywords):
        return Tier.NANO
    return Tier.STANDARD


def parse_tier_word(answer: str) -> Tier | None:
    """The tier a one-word meta-routing answer names, or None if it names none."""
    word = answer.strip().strip(".!\"'`*").upper()
    return Tier[word] if word in Tier.__members__ else None


@dataclass(frozen=True, slots=True)
class Classification:
    tier: Tier
    routed_by: RoutedBy
    routing_call: Completion | None = None


class Classifier:
    def __init__(self, settings: Settings, providers: ProviderRegistry | None) -> None:
        self.conf: ClassifierSettings = settings.classifier
        self.agent_types = settings.agent_types
        self.nano = settings.tiers[Tier.NANO]
        self.providers = providers
        if self.conf.strategy == "llm" and providers is None:
            raise ValueError("classifier.strategy 'llm' needs provider clients")

    def _floor(self, request: AgentRequest, tier: Tier) -> Tier:
        if not self.conf.agent_type_floor:
            return tier
        floor = self.agent_types[request.agent_type].min_tier
        return floor if TIER_ORDER[floor] > TIER_ORDER[tier] else tier

    async def classify(self, request: AgentRequest) -> Classification:
        if request.tier_hint is not None:
            return Classification(request.tier_hint, "hint")
        if self.conf.strategy == "rules":
            return Classification(self._floor(request, rules_tier(request.prompt_text(), self.conf.rules)), "rules")
        return await self._meta_route(request)

    async def _meta_route(self, request: AgentRequest) -> Classification:
        assert self.providers is not None
        messages = [
            ChatMessage(role="system", content=META_ROUTING_PROMPT),
            ChatMessage(role="user", content=request.prompt_text()[:META_ROUTING_MAX_CHARS]),
        ]
        try:
            attempted = await self.providers.complete(
                self.nano.provider, self.nano.model, messages, META_ROUTING_MAX_TOKENS
            )
        except ProviderError as exc:
            log.warning("meta-routing call failed, routing to STANDARD: %s", exc)
            return Classification(self._floor(request, Tier.STANDARD), "llm_fallback")
        tier = parse_tier_word(attempted.completion.text)
        if tier is None:
            return Classification(
                self._floor(request, Tier.STANDARD), "llm_fallback", attempted.completion
            )
        return Classification(self._floor(request, tier), "llm", attempted.completion)


class ClassifierHandler:
    """Decode, validate, classify, and route one message from the requests topic."""

    stage = CLASSIFIER_ROLE

    def __init__(
        self, settings: Settings, topology: Topology, classifier: Classifier, prices: PriceBook
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.classifier = classifier
        self.prices = prices
        self.max_bytes = settings.worker.max_request_bytes
        self.tier_counts: dict[Tier, int] = dict.fromkeys(Tier, 0)

    async def handle(self, source: Source) -> list[Outgoing]:
        dlq = self.topology.dead_letters.name
        try:
            request = decode(source.value, AgentRequest, max_bytes=self.max_bytes)
        except DecodeError as exc:
            return [dead_letter_for(dlq, source, exc, self.stage)]
        if request.agent_type not in self.settings.agent_types:
            known = ", ".join(sorted(self.settings.agent_types))
            letter = dead_letter(
                dlq, source, code="unknown_agent_type", stage=self.stage,
                reason=f"agent_type '{request.agent_type}' is not configured (known: {known})",
                payload={"request_id": request.request_id, "workflow_id": request.workflow_id},
            )
            return [letter]
        with log_context(request_id=request.request_id, workflow_id=request.workflow_id):
            decision = await self.classifier.classify(request)
        self.tier_counts[decision.tier] += 1
        tiered = TieredRequest(
            **request.model_dump(), tier=decision.tier, routed_by=decision.routed_by
        )
        out = Outgoing(
            self.topology.tiers[decision.tier].name,
            request.workflow_id.encode(),
            encode(tiered),
        )
        if decision.routing_call is None:
            return [out]
        # Meta-routing is a model call like any other: it is costed against the workflow.
        nano = self.settings.tiers[Tier.NANO]
        event = cost_event(
            self.prices, request, Tier.NANO, nano.provider, nano.model, decision.routing_call,
            attempt=1,
        )
        return [out, Outgoing(self.topology.costs.name, out.key, encode(event))]
