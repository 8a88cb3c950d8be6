"""From a completed call to its CostEvent."""

from __future__ import annotations

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
) -> CostEvent:
    """Priced by the configured model name: the served name may carry a date suffix."""
    cost = prices.cost(
        provider,
        model,
        completion.input_tokens,
        completion.output_tokens,
        completion.cached_input_tokens,
    )
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
