"""The tier role: answer a classified request with its tier's model.

Stateless: everything a call needs is in the message, so any replica can take over any
partition, and a task whose worker died is simply read again from Kafka.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from schemas.codec import DecodeError, decode, encode
from schemas.models import AgentResult, Tier, TieredRequest, Timings
from streams.costing import cost_event
from streams.envelope import Outgoing, Source, dead_letter, dead_letter_for
from streams.logs import log_context
from streams.pricing import PriceBook
from streams.providers import ProviderError, ProviderRegistry
from topologies.config import Settings
from topologies.topics import Topology, tier_role

log = logging.getLogger(__name__)


class TierHandler:
    def __init__(
        self,
        tier: Tier,
        settings: Settings,
        topology: Topology,
        providers: ProviderRegistry,
        prices: PriceBook,
    ) -> None:
        self.tier = tier
        self.stage = tier_role(tier)
        self.settings = settings
        self.topology = topology
        self.providers = providers
        self.prices = prices
        self.choice = settings.tiers[tier]
        self.log_prompts = settings.worker.log_prompts

    async def handle(self, source: Source) -> list[Outgoing]:
        dlq = self.topology.dead_letters.name
        try:
            request = decode(source.value, TieredRequest, max_bytes=self.settings.worker.max_request_bytes)
        except DecodeError as exc:
            return [dead_letter_for(dlq, source, exc, self.stage)]
        with log_context(request_id=request.request_id, workflow_id=request.workflow_id):
            return await self._answer(source, request)

    async def _answer(self, source: Source, request: TieredRequest) -> list[Outgoing]:
        provider, model = self.choice.provider, self.choice.model
        if request.agent_type not in self.settings.agent_types:
            return [
                dead_letter(
                    self.topology.dead_letters.name, source, code="unknown_agent_type",
                    stage=self.stage, reason=f"agent_type '{request.agent_type}' is not configured",
                    payload={"request_id": request.request_id, "workflow_id": request.workflow_id},
                )
            ]
        started_at = datetime.now(UTC)
        t0 = time.perf_counter()
        try:
            attempted = await self.providers.complete(
                provider, model, request.chat(), request.max_output_tokens
            )
        except ProviderError as exc:
            log.warning("model call failed after %d attempt(s): %s", exc.attempts, exc)
            return [
                dead_letter(
                    self.topology.dead_letters.name, source, code="provider_error",
                    stage=self.stage, reason=str(exc), attempts=exc.attempts,
                    payload={"request_id": request.request_id, "workflow_id": request.workflow_id},
                )
            ]
        latency_ms = (time.perf_counter() - t0) * 1000
        completion = attempted.completion
        cost = cost_event(
            self.prices, request, self.tier, provider, model, completion, attempted.attempts
        )
        result = AgentResult(
            request_id=request.request_id,
            workflow_id=request.workflow_id,
            agent_type=request.agent_type,
            status="ok",
            output=completion.text,
            finish_reason=completion.finish_reason,
            tier=self.tier,
            routed_by=request.routed_by,
            provider=provider,
            model=model,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_usd=cost.cost_usd,
            attempts=attempted.attempts,
            timings=Timings(
                created_at=request.created_at,
                classified_at=request.classified_at,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                model_latency_ms=round(latency_ms, 3),
            ),
            metadata=request.metadata,
        )
        if self.log_prompts:
            log.debug("answered", extra={"prompt": request.prompt_text(), "output": completion.text})
        key = request.workflow_id.encode()
        return [
            Outgoing(self.topology.results.name, key, encode(result)),
            Outgoing(self.topology.costs.name, key, encode(cost)),
        ]
