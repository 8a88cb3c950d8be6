"""The classifier role: give each request a model tier and route it to that tier's topic
(or, for a request marked ``batch`` whose deadline allows, to the batch role's topic).

Consumes the requests topic; produces tiered requests (keyed by workflow_id, so a
workflow keeps its order on its tier topic), the costs of meta-routing calls, and dead
letters. Classifies in batches: one agent reads each partition in offset order and a
batch's outputs are sent in that order, so the requests of a workflow stay in order.
""" 

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from schemas.codec import DecodeError, decode, encode
from schemas.models import AgentRequest, ChatMessage, RoutedBy, Tier, TieredRequest
from streams.costing import cost_event
from streams.envelope import DeadLetters, Outgoing, Source
from streams.logs import log_context
from streams.pricing import PriceBook
from streams.providers import Completion, ProviderError, ProviderRegistry
from streams.routing.model import RouterModel, configured_router
from streams.routing.rules import rules_tier
from streams.runtime.types import RoleSpec, Worker
from streams.tokens import estimate_input_tokens
from topologies.config import ClassifierSettings, Settings
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
        self.router: RouterModel | None = None
        if self.conf.strategy == "learned":
            self.router = configured_router(self.conf.learned.model, self.conf.learned.quality_target)

    def _floor(self, request: AgentRequest, tier: Tier) -> Tier:
        if not self.conf.agent_type_floor:
            return tier
        floor = self.agent_types[request.agent_type].min_tier
        return floor if TIER_ORDER[floor] > TIER_ORDER[tier] else tier

    async def classify(self, request: AgentRequest) -> Classification:
        [decision] = await self.classify_batch([request])
        return decision

    async def classify_batch(self, requests: Sequence[AgentRequest]) -> list[Classification]:
        """One decision per request, in order. A hint wins; ``learned`` routes the rest
        in one pass of its model, ``llm`` makes their calls concurrently."""
        decisions: list[Classification | None] = [
            Classification(r.tier_hint, "hint") if r.tier_hint is not None else None for r in requests
        ]
        todo = [i for i, d in enumerate(decisions) if d is None]
        if self.conf.strategy == "rules":
            for i in todo:
                tier = rules_tier(requests[i].prompt_text(), self.conf.rules)
                decisions[i] = Classification(self._floor(requests[i], tier), "rules")
        elif self.conf.strategy == "learned":
            assert self.router is not None
            tiers = self.router.route(
                [requests[i].prompt_text() for i in todo], [requests[i].agent_type for i in todo]
            )
            for i, tier in zip(todo, tiers, strict=True):
                decisions[i] = Classification(self._floor(requests[i], tier), "learned")
        else:
            routed = await asyncio.gather(*(self._meta_route(requests[i]) for i in todo))
            for i, decision in zip(todo, routed, strict=True):
                decisions[i] = decision
        return [d for d in decisions if d is not None]

    async def _meta_route(self, request: AgentRequest) -> Classification:
        with log_context(request_id=request.request_id, workflow_id=request.workflow_id):
            return await self._meta_route_call(request)

    async def _meta_route_call(self, request: AgentRequest) -> Classification:
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
    """Decode, validate, classify, and route messages from the requests topic."""

    stage = CLASSIFIER_ROLE

    def __init__(
        self, settings: Settings, topology: Topology, classifier: Classifier, prices: PriceBook
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.classifier = classifier
        self.prices = prices
        self.max_bytes = settings.worker.max_request_bytes
        self.dead_letters = DeadLetters(topology.dead_letters.name, self.stage)

    def _over_context_window(self, request: AgentRequest, tier: Tier) -> str | None:
        """Why the request cannot fit its tier model's context window, if it cannot: a
        provider would refuse it (and charge nothing), so it is not queued at all."""
        choice = self.settings.tiers[tier]
        window = self.prices.context_window(choice.provider, choice.model)
        needed = estimate_input_tokens(request) + request.max_output_tokens
        if window is None or needed <= window:
            return None
        return (
            f"about {needed - request.max_output_tokens:,} input tokens plus max_output_tokens "
            f"{request.max_output_tokens:,} exceed the {window:,}-token context window of "
            f"{choice.model} ({tier.value} tier); shorten the task or lower max_output_tokens"
        )

    def _by_batch(self, request: AgentRequest, now: datetime) -> bool:
        """Whether the request goes to the batch role: it asks for it (or its agent type
        does), the batch path is on, and its deadline leaves the providers' window."""
        batch = self.settings.batch
        wanted = request.latency_class or self.settings.agent_types[request.agent_type].latency_class
        if wanted != "batch" or not batch.enabled:
            return False
        if request.complete_by is None:
            return True
        needed = timedelta(seconds=batch.completion_window_seconds + batch.deadline_margin_seconds)
        complete_by = request.complete_by
        if complete_by.tzinfo is None:
            complete_by = complete_by.replace(tzinfo=UTC)
        return complete_by - now >= needed

    def _admit(self, source: Source) -> AgentRequest | Outgoing:
        """The request, or the dead letter that says why there is none."""
        try:
            request = decode(source.value, AgentRequest, max_bytes=self.max_bytes)
        except DecodeError as exc:
            return self.dead_letters.undecodable(source, exc)
        return self.dead_letters.unknown_agent_type(source, request, self.settings.agent_types) or request

    def _route(self, source: Source, request: AgentRequest, decision: Classification) -> list[Outgoing]:
        too_long = self._over_context_window(request, decision.tier)
        if too_long is not None:
            return [self.dead_letters.letter(source, "context_too_long", too_long, request)]
        tiered = TieredRequest(
            **request.model_dump(), tier=decision.tier, routed_by=decision.routed_by
        )
        topic = self.topology.batch if self._by_batch(request, tiered.classified_at) else self.topology.tiers[decision.tier]
        out = Outgoing(topic.name, request.workflow_id.encode(), encode(tiered))
        if decision.routing_call is None:
            return [out]
        # Meta-routing is a model call like any other: it is costed against the workflow.
        nano = self.settings.tiers[Tier.NANO]
        event = cost_event(
            self.prices, request, Tier.NANO, nano.provider, nano.model, decision.routing_call,
            attempt=1,
        )
        return [out, Outgoing(self.topology.costs.name, out.key, encode(event))]

    async def handle_batch(self, sources: Sequence[Source]) -> list[list[Outgoing]]:
        """What each message of a batch produces, in the batch's order; the valid
        requests are classified together."""
        admitted = [self._admit(source) for source in sources]
        valid = [(i, a) for i, a in enumerate(admitted) if isinstance(a, AgentRequest)]
        decisions = await self.classifier.classify_batch([request for _, request in valid])
        outputs: list[list[Outgoing]] = [[a] if isinstance(a, Outgoing) else [] for a in admitted]
        for (i, request), decision in zip(valid, decisions, strict=True):
            outputs[i] = self._route(sources[i], request, decision)
        return outputs

    async def handle(self, source: Source) -> list[Outgoing]:
        [outgoing] = await self.handle_batch([source])
        return outgoing


def build(worker: Worker) -> RoleSpec:
    settings, topology = worker.settings, worker.topology
    providers = ProviderRegistry(settings) if settings.classifier.strategy == "llm" else None
    handler = ClassifierHandler(settings, topology, Classifier(settings, providers), PriceBook(settings))
    size = settings.classifier.batch_size
    if providers is not None:  # a batch's meta-routing calls run at once
        size = min(size, settings.worker.max_concurrent_tasks)
    return RoleSpec(
        consumes=topology.requests,
        # with the llm strategy, the routing calls' costs too
        produces=(
            *topology.tiers.values(), topology.batch, *([topology.costs] if providers else []), topology.dead_letters,
        ),
        handle_batch=handler.handle_batch,
        batch_size=size,
        batch_wait_seconds=settings.classifier.batch_wait_seconds,
        providers=providers,
    )
