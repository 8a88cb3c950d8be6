"""Turn a run's results into the figures a person wants to read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from schemas.models import AgentResult, DeadLetter, Tier


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class TierFigures:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    models: Counter[str] = field(default_factory=Counter)


@dataclass
class RunSummary:
    produced: int
    results: dict[str, AgentResult] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    elapsed_s: float = 0.0

    def add_result(self, result: AgentResult) -> None:
        if result.request_id in self.results:
            self.duplicates += 1
        self.results[result.request_id] = result

    @property
    def by_tier(self) -> dict[Tier, TierFigures]:
        figures = {tier: TierFigures() for tier in Tier}
        for r in self.results.values():
            f = figures[r.tier]
            f.requests += 1
            f.input_tokens += r.input_tokens
            f.output_tokens += r.output_tokens
            f.cost_usd += r.cost_usd
            f.models[f"{r.provider}/{r.model}"] += 1
        return figures

    @property
    def statuses(self) -> Counter[str]:
        return Counter(r.status for r in self.results.values())

    def end_to_end_ms(self) -> list[float]:
        return [
            (r.timings.finished_at - r.timings.created_at).total_seconds() * 1000
            for r in self.results.values()
        ]

    def waits_before_call_ms(self) -> dict[str, list[float]]:
        """Per agent type, the time from classification to the model call: the tier
        topic's queue plus any wait for a rate-limit permit."""
        waits: dict[str, list[float]] = {}
        for r in self.results.values():
            waited = (r.timings.started_at - r.timings.classified_at).total_seconds() * 1000
            waits.setdefault(r.agent_type, []).append(waited)
        return waits

    def model_ms(self) -> list[float]:
        return [r.timings.model_latency_ms for r in self.results.values()]

    @property
    def total_cost_usd(self) -> float:
        return sum(r.cost_usd for r in self.results.values())

    @property
    def lost(self) -> int:
        return self.produced - len(self.results) - len(self.dead_letters)
