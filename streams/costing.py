"""From a completed call to its CostEvent."""

from __future__ import annotations

from decimal import Decimal

from schemas.models import AgentRequest, CostEvent, Tier
from streams.pricing import PriceBook
from streams.providers import Completion


def cost_event(
    prices: PriceBook,
    request: AgentRequest,
    tier: Tier,
    provider: str,
    model: str,
    completion: Completion,
    attempt: int,
    price_factor: float = 1.0,
) -> CostEvent:
    """Priced by the configured model name: the served name may carry a date suffix.
    ``price_factor``: the share of the online price paid (batch APIs: half)."""
    cost = prices.cost(
        provider,
        model,
        completion.input_tokens,
        completion.output_tokens,
        completion.cached_input_tokens,
    )
    if price_factor != 1.0:
        cost = cost * Decimal(str(price_factor))
    return CostEvent(
        request_id=request.request_id,
        workflow_id=request.workflow_id,
        agent_type=request.agent_type,
        tier=tier,
        provider=provider,
        model=model,
        attempt=attempt,
        input_tokens=completion.input_tokens,
        output_tokens=completion.output_tokens,
        cached_input_tokens=completion.cached_input_tokens,
        reasoning_tokens=completion.reasoning_tokens,
        cost_usd=float(cost),
    )
