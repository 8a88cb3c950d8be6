"""The tier roles: answer a classified request with its tier's model.

Consumes its tier topic; produces results, the cost of each call, and dead letters.
Stateless: everything a call needs is in the message, so any replica can take over any
partition, and a task whose worker died is read again from Kafka by the next owner.
Up to ``worker.max_concurrent_tasks`` calls are in flight, under the agent types' rate
limits (quotas follow the partitions assigned) and the cost guardrails' budget gate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import partial

from schemas.codec import DecodeError, decode, encode
from schemas.models import AgentResult, Tier, TieredRequest, Timings
from streams.costing import cost_event
from streams.dedupe import AnsweredIndex
from streams.envelope import DeadLetters, Outgoing, Source
from streams.guardrails.budget import (
    TICK_SECONDS,
    BudgetExceeded,
    BudgetGate,
    Reservation,
    exceeded_result,
    holder_name,
)
from streams.guardrails.money import usd_to_nanos
from streams.guardrails.service import PauseReport
from streams.guardrails.view import GuardrailView
from streams.logs import log_context
from streams.observability import default_metrics
from streams.pricing import PriceBook
from streams.providers import ProviderError, ProviderRegistry
from streams.ratelimit import Permit, RateLimiter
from streams.runtime.types import Partition, RoleSpec, Worker
from streams.tokens import estimate_input_tokens
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
        budget: BudgetGate | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.tier = tier
        self.stage = tier_role(tier)
        self.settings = settings
        self.topology = topology
        self.providers = providers
        self.prices = prices
        self.choice = settings.tiers[tier]
        self.log_prompts = settings.worker.log_prompts
        self.budget = budget
        self.limiter = limiter
        self.dead_letters = DeadLetters(topology.dead_letters.name, self.stage)

    async def handle(self, source: Source) -> list[Outgoing]:
        try:
            request = decode(source.value, TieredRequest, max_bytes=self.settings.worker.max_request_bytes)
        except DecodeError as exc:
            return [self.dead_letters.undecodable(source, exc)]
        with log_context(request_id=request.request_id, workflow_id=request.workflow_id):
            return await self._answer(source, request)

    async def _answer(self, source: Source, request: TieredRequest) -> list[Outgoing]:
        served_tier, downgraded_from = self._serving_tier()
        choice = self.settings.tiers[served_tier]
        provider, model = choice.provider, choice.model
        unknown = self.dead_letters.unknown_agent_type(source, request, self.settings.agent_types)
        if unknown is not None:
            return [unknown]
        if self.limiter is not None and request.agent_type in self.limiter.out_of_scope:
            return [self._out_of_rate_limit_scope(source, request)]
        input_estimate = estimate_input_tokens(request)
        reservation: Reservation | None = None
        budget_wait_ms: float | None = None
        if self.budget is not None:
            worst = self.prices.worst_case(
                provider, model, input_estimate, request.max_output_tokens
            )
            waited = time.perf_counter()
            try:
                reservation = await self.budget.admit(request.workflow_id, usd_to_nanos(worst))
            except BudgetExceeded:
                return [self._budget_exceeded(request)]
            budget_wait_ms = round((time.perf_counter() - waited) * 1000, 3)
        started_at = datetime.now(UTC)
        t0 = time.perf_counter()
        permit: Permit | None = None

        async def before_attempt(attempt: int) -> None:
            # Every attempt passes the rate limiter right before it is sent: a token taken
            # earlier than its request reaches the provider could break the window bound.
            nonlocal permit, started_at, t0
            if self.limiter is not None:
                permit = await self.limiter.acquire(
                    request.agent_type, model, input_estimate + request.max_output_tokens
                )
            if attempt == 1:  # the model latency excludes the wait for the limiter
                started_at, t0 = datetime.now(UTC), time.perf_counter()

        try:
            attempted = await self.providers.complete(
                provider, model, request.chat(), request.max_output_tokens, before_attempt
            )
        except ProviderError as exc:
            if reservation is not None:
                self.budget.release(reservation)  # type: ignore[union-attr]
            log.warning("model call failed after %d attempt(s): %s", exc.attempts, exc)
            return [self.dead_letters.letter(source, "provider_error", str(exc), request, exc.attempts)]
        latency_ms = (time.perf_counter() - t0) * 1000
        completion = attempted.completion
        if self.limiter is not None and permit is not None:
            self.limiter.reconcile(
                permit, completion.input_tokens, completion.output_tokens, request.max_output_tokens
            )
        cost = cost_event(
            self.prices, request, served_tier, provider, model, completion, attempted.attempts
        )
        result = AgentResult(
            request_id=request.request_id,
            workflow_id=request.workflow_id,
            agent_type=request.agent_type,
            status="ok",
            output=completion.text,
            finish_reason=completion.finish_reason,
            tier=served_tier,
            downgraded_from=downgraded_from,
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
                budget_wait_ms=budget_wait_ms,
            ),
            metadata=request.metadata,
        )
        if self.log_prompts:
            log.debug("answered", extra={"prompt": request.prompt_text(), "output": completion.text})
        key = request.workflow_id.encode()
        on_delivered = None
        if reservation is not None:
            assert self.budget is not None
            self.budget.settle(reservation, usd_to_nanos(cost.cost_usd))
            on_delivered = partial(self.budget.delivered, reservation)
            cost = cost.model_copy(update={"lease_id": reservation.workflow_lease.lease_id})
        return [
            Outgoing(self.topology.results.name, key, encode(result)),
            Outgoing(self.topology.costs.name, key, encode(cost), on_delivered),
        ]

    def _serving_tier(self) -> tuple[Tier, Tier | None]:
        """Budget-aware downgrade (off by default): above the hour's alert threshold,
        PREMIUM work is served by the STANDARD model."""
        if (
            self.tier is Tier.PREMIUM
            and self.settings.cost_guardrails.downgrade_premium_above_alert
            and self.budget is not None
            and self.budget.view.alerting()
        ):
            return Tier.STANDARD, Tier.PREMIUM
        return self.tier, None

    def _out_of_rate_limit_scope(self, source: Source, request: TieredRequest) -> Outgoing:
        """A rate limit that names its tiers gives this tier no share: no call can be made."""
        assert self.limiter is not None
        tiers = ", ".join(t.value for t in self.limiter.out_of_scope[request.agent_type])
        return self.dead_letters.letter(
            source, "rate_limit_scope",
            f"agent_type '{request.agent_type}' is rate-limited to tiers [{tiers}] "
            f"(rate_limits.{request.agent_type}.tiers) but was routed to {self.tier.value}",
            request,
        )

    def _budget_exceeded(self, request: TieredRequest) -> Outgoing:
        assert self.budget is not None
        result = exceeded_result(self.budget, request, self.tier, self.choice.provider, self.choice.model)
        return Outgoing(self.topology.results.name, request.workflow_id.encode(), encode(result))


def build(worker: Worker, tier: Tier) -> RoleSpec:
    settings, topology = worker.settings, worker.topology
    providers = ProviderRegistry(settings)
    view = GuardrailView(settings)
    limiter = RateLimiter(settings, tier, topology, providers.throttles)
    budget = BudgetGate(view, worker.sender(topology.costs), holder_name(worker.role))
    budget.observe_wait = default_metrics().budget_admission.labels(tier.value).observe
    handler = TierHandler(tier, settings, topology, providers, PriceBook(settings), budget, limiter)
    source = topology.tiers[tier]

    def share_rate_limits(assigned: Iterable[Partition]) -> None:
        # Quotas follow partitions: recomputed from the full assignment on every rebalance.
        limiter.on_assignment(assigned)

    return RoleSpec(
        consumes=source,
        produces=(topology.results, topology.costs, topology.dead_letters),
        handle=handler.handle,
        concurrency=settings.worker.max_concurrent_tasks,
        # A call can be held by the budget gate for the rest of an hour; a rebalance must
        # not wait for it (the answered index keeps the answer single).
        wait_empty=False,
        answered=AnsweredIndex(settings),
        costs_topic=topology.costs.name,
        providers=providers,
        limiter=limiter,
        view=view,
        timers=[PauseReport(view, source.name).timer(), (TICK_SECONDS, budget.tick)],
        lifecycles=[budget],
        on_assigned=[share_rate_limits],
    )
