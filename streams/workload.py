"""Sample workloads: a reproducible mix of agent types, tiers and prompt lengths."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

from schemas.models import AgentRequest

# (weight, agent_type, task): the rules classifier sends them to different tiers, in
# roughly the mix teams report (most work NANO or STANDARD, PREMIUM rare).
TEMPLATES: tuple[tuple[int, str, str], ...] = (
    (20, "router", "Classify this support ticket into billing, shipping or other: {topic}."),
    (10, "router", "Extract the order number and the customer's name from: {topic}."),
    (15, "writer", "Write a friendly two-paragraph product update about {topic}."),
    (10, "writer", "Detect language and sentiment of this review: {topic}."),
    (12, "researcher", "Summarise recent findings about {topic} with three sources."),
    (8, "researcher", "Compare two approaches to {topic} and list their limits."),
    (10, "analyst", "Analyse last quarter's numbers for {topic} and point out anomalies."),
    (5, "analyst", "Find the root cause of the latency regression in {topic} and propose a fix."),
    (5, "planner", "Design a multi-step migration strategy for {topic}, with trade-offs."),
    (5, "planner", "Propose the architecture of a service for {topic} that scales to 10x."),
)
_WEIGHTS = [weight for weight, _, _ in TEMPLATES]
TOPICS = (
    "the checkout service", "a mobile banking app", "solar panel installs", "warehouse robots",
    "an email campaign", "vector search", "the payments ledger", "a hiring pipeline",
)


def sample_requests(
    count: int, *, workflows: int = 20, seed: int = 7, run_id: str | None = None
) -> Iterator[AgentRequest]:
    """``count`` requests spread over ``workflows`` workflows; ids are unique per ``run_id``."""
    rng = random.Random(seed)
    run_id = run_id or uuid.uuid4().hex[:8]
    for i in range(count):
        _, agent_type, template = rng.choices(TEMPLATES, weights=_WEIGHTS)[0]
        yield AgentRequest(
            request_id=f"{run_id}-{i:07d}",
            workflow_id=f"wf-{run_id}-{rng.randrange(workflows):04d}",
            agent_type=agent_type,
            task=template.format(topic=rng.choice(TOPICS)),
            max_output_tokens=rng.choice((64, 128, 256, 512)),
            metadata={"run_id": run_id},
        )
