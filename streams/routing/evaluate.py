"""``tierstream router eval``: every routing strategy measured on labelled data.

Each strategy gives a score per request (its curve: the top-scored share goes to the top
tier) and its own decisions (its operating point):

- ``random``: one score for all (the diagonal); operates where it reaches the target.
- ``rules``: the classifier's keyword rules; the tier they pick, moved up to the nearest
  tier the data scores.
- ``length``: longer prompts first; operates where it reaches the target.
- ``learned``: a router file as it is (``--model``), or one trained per fold of a
  cross-validation that holds out whole ``source`` families (``--cross-validate``):
  the figure for task families it has not seen. Operates at its own threshold.
- ``oracle``: knows the scores; each request's cheapest tier among the best.

The operating points of ``random`` and ``length`` are read off their curves on the very
data they are measured on, which flatters them; ``rules`` and ``learned`` decide blind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import rankdata

from streams.pricing import PriceBook
from streams.routing.curves import Curve, quality_curve
from streams.routing.data import TIER_ORDER, RoutingData
from streams.routing.model import RouterModel, choose_tiers, example_arrays, grouped_folds, train_router
from streams.routing.rules import rules_tier
from streams.tokens import estimate_chat_tokens
from topologies.config import Settings

TARGET = 0.95
PLOT_POINTS = 201


@dataclass
class StrategyResult:
    """One strategy on one part of the data (all of it, or one held-out fold)."""

    curve: Curve
    cost_curve: Curve
    decisions: np.ndarray | None  # tier index per example; None: read off the curve
    how: str

    def figures(self, scores: np.ndarray, costs: np.ndarray) -> dict[str, Any]:
        curve = self.curve
        top_quality, top_cost = scores[:, -1].mean(), costs[:, -1].mean()
        if self.decisions is None:
            share = curve.share_for_quality_ratio(TARGET)
            quality = float(np.interp(share, curve.shares, curve.quality))
            cost = float(np.interp(share, self.cost_curve.shares, self.cost_curve.quality))
        else:
            rows = np.arange(len(scores))
            share = float(np.mean(self.decisions == scores.shape[1] - 1))
            quality = float(scores[rows, self.decisions].mean())
            cost = float(costs[rows, self.decisions].mean())
        grid = np.linspace(0, 1, PLOT_POINTS)
        return {
            "premium_share_for_95pct_quality": curve.share_for_quality_ratio(TARGET),
            "apgr": curve.apgr(),
            "cpt50": curve.cpt(0.5),
            "cpt80": curve.cpt(0.8),
            "operating_point": {
                "premium_share": share,
                "quality_ratio": quality / top_quality if top_quality else None,
                "cost_ratio": cost / top_cost if top_cost else None,
            },
            "curve": np.interp(grid, curve.shares, curve.quality) / curve.top if curve.top else grid * 0,
        }


FIGURES = ("premium_share_for_95pct_quality", "apgr", "cpt50", "cpt80")


@dataclass
class Part:
    """The examples one set of figures is computed on, and each strategy's result there."""

    rows: np.ndarray
    strategies: dict[str, StrategyResult]


@dataclass
class Evaluation:
    """The figures of every strategy on all the data (``pooled``) and, with
    cross-validation, on each held-out fold (``folds``)."""

    data: RoutingData
    pooled: Part
    folds: list[Part]
    scores: np.ndarray
    costs: np.ndarray
    warnings: list[str] = field(default_factory=list)

    def _figures(self, part: Part, name: str) -> dict[str, Any]:
        return part.strategies[name].figures(self.scores[part.rows], self.costs[part.rows])

    def strategy_figures(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, result in self.pooled.strategies.items():
            figures = self._figures(self.pooled, name)
            figures["operating_point"]["how"] = result.how
            figures["curve"] = {
                "premium_share": np.linspace(0, 1, PLOT_POINTS).round(4).tolist(),
                "quality_ratio": figures["curve"].round(5).tolist(),
            }
            if self.folds:
                figures["folds"] = [{k: self._figures(f, name)[k] for k in FIGURES} for f in self.folds]
            out[name] = figures
        return out

    def report(self) -> dict[str, Any]:
        tiers = self.data.tiers
        return {
            "data": {
                "examples": len(self.data.examples),
                "tiers": [t.value for t in tiers],
                "sources": len({e.source for e in self.data.examples if e.source is not None}),
                "sha256": self.data.sha256,
                "folds": len(self.folds),
            },
            "top_tier": tiers[-1].value,
            "lower_tier": tiers[-2].value,
            "quality": {t.value: float(self.scores[:, i].mean()) for i, t in enumerate(tiers)},
            "quality_target": TARGET,
            "strategies": self.strategy_figures(),
            "warnings": self.warnings,
        }


def tier_costs(data: RoutingData, settings: Settings, output_tokens: int) -> np.ndarray:
    """What each example costs on each tier's configured model: (examples, tiers) USD."""
    prices = PriceBook(settings)
    tokens = [estimate_chat_tokens(e.contents()) for e in data.examples]
    costs = np.zeros((len(data.examples), len(data.tiers)))
    for j, tier in enumerate(data.tiers):
        model = settings.tiers[tier]
        for i, count in enumerate(tokens):
            costs[i, j] = float(prices.cost(model.provider, model.model, count, output_tokens))
    return costs


def _result(score: Sequence[float], scores: np.ndarray, costs: np.ndarray,
            decisions: np.ndarray | None, how: str) -> StrategyResult:
    curve = quality_curve(score, scores[:, -2], scores[:, -1])
    cost_curve = quality_curve(score, costs[:, -2], costs[:, -1])
    return StrategyResult(curve, cost_curve, decisions, how)


def _rules_decisions(data: RoutingData, settings: Settings) -> np.ndarray:
    present = [TIER_ORDER.index(t) for t in data.tiers]
    chosen = []
    for example in data.examples:
        wanted = TIER_ORDER.index(rules_tier(example.text(), settings.classifier.rules))
        above = [i for i, rank in enumerate(present) if rank >= wanted]
        chosen.append(above[0] if above else len(present) - 1)
    return np.array(chosen)


def _oracle_decisions(scores: np.ndarray) -> np.ndarray:
    best = scores.max(axis=1, keepdims=True)
    return (scores >= best - 1e-12).argmax(axis=1)  # the cheapest tier among the best


def learned_scores(model: RouterModel, data: RoutingData) -> tuple[np.ndarray, np.ndarray]:
    """The curve score (the loss of the tier just below the top) and the decisions."""
    if model.tiers != data.tiers:
        raise ValueError(
            f"the router routes between {[t.value for t in model.tiers]}, the data scores "
            f"{[t.value for t in data.tiers]}"
        )
    texts, agent_types, _ = example_arrays(data.examples, data.tiers)
    losses = model.losses(texts, agent_types)
    return losses[:, -1], choose_tiers(losses, model.threshold)


Scored = dict[str, tuple[np.ndarray, np.ndarray | None, str]]  # name -> score, decisions, how


def _strategies(data: RoutingData, rows: np.ndarray, scores: np.ndarray, rules: np.ndarray,
                learned: tuple[np.ndarray, np.ndarray, str] | None) -> Scored:
    """Each strategy's score and decisions on ``rows``."""
    s = scores[rows]
    lengths = np.array([len(data.examples[i].text()) for i in rows], dtype=np.float64)
    found: Scored = {
        "random": (np.zeros(len(rows)), None, "where its curve reaches the target"),
        "rules": (rules[rows].astype(np.float64), rules[rows], "its own decisions"),
        "length": (lengths, None, "where its curve reaches the target"),
    }
    if learned is not None:
        found["learned"] = learned
    found["oracle"] = (s[:, -1] - s[:, -2], _oracle_decisions(s), "the cheapest tier among the best")
    return found


def _part(rows: np.ndarray, scored: Scored, scores: np.ndarray, costs: np.ndarray) -> Part:
    s, c = scores[rows], costs[rows]
    return Part(rows, {name: _result(score, s, c, decisions, how) for name, (score, decisions, how) in scored.items()})


def _percentiles(score: np.ndarray) -> np.ndarray:
    """Mid-ranks as fractions: a run of equal scores gets the middle of its span, so a
    fold scored all alike sits at 0.5 whatever its size, tied with every other fold."""
    return (rankdata(score, method="average") - 0.5) / len(score)


def evaluate(
    data: RoutingData,
    settings: Settings,
    model: RouterModel | None = None,
    cross_validate: bool = False,
    output_tokens: int = 256,
    seed: int = 0,
) -> Evaluation:
    """Every strategy on the data.

    With ``cross_validate``, folds hold out whole ``source`` families and ``learned`` is
    trained without the fold it scores. The pooled figures send the same share of each
    fold to the top tier by the learned score (it becomes a rank within its fold): the
    scores of different routers are not comparable with each other, and a fold's own PGR
    divides by its own, sometimes tiny, quality gap."""
    _, _, scores = example_arrays(data.examples, data.tiers)
    costs = tier_costs(data, settings, output_tokens)
    rules = _rules_decisions(data, settings)
    everything = np.arange(len(data.examples))
    folds: list[Part] = []
    if cross_validate:
        splits = grouped_folds(len(data.examples), [e.source for e in data.examples], seed)
        how = f"thresholds picked on the training folds ({len(splits)} folds, grouped by source)"
        rows = np.concatenate([held_out for _, held_out in splits])
        fold_scored = []
        for train, held_out in splits:
            router = train_router(_subset(data, train), TARGET, seed)
            score, decisions = learned_scores(router, _subset(data, held_out))
            fold_scored.append(_strategies(data, held_out, scores, rules, (score, decisions, how)))
            folds.append(_part(held_out, fold_scored[-1], scores, costs))
        merged: Scored = {}
        for name, (_, decisions, strategy_how) in fold_scored[0].items():
            # Only the learned router scores each fold with a different function.
            rank = _percentiles if name == "learned" else np.asarray
            pooled = np.concatenate([rank(f[name][0]) for f in fold_scored])
            chosen = None if decisions is None else np.concatenate([f[name][1] for f in fold_scored])  # type: ignore[misc]
            merged[name] = (pooled, chosen, strategy_how)
        whole = _part(rows, merged, scores, costs)
    else:
        learned = None
        if model is not None:
            score, decisions = learned_scores(model, data)
            learned = (score, decisions, f"the model's threshold (quality target {model.quality_target})")
        whole = _part(everything, _strategies(data, everything, scores, rules, learned), scores, costs)
    warnings = []
    for j, tier in enumerate(data.tiers[:-1]):
        if costs[:, j].sum() > costs[:, -1].sum():
            top = data.tiers[-1]
            warnings.append(
                f"the {tier.value} model ({settings.tiers[tier].model}) costs more than the "
                f"{top.value} model ({settings.tiers[top].model}) on this data: routing away from "
                f"{top.value} raises the cost (cost_ratio above 1)"
            )
    return Evaluation(data, whole, folds, scores, costs, warnings)


def _subset(data: RoutingData, rows: np.ndarray) -> RoutingData:
    return RoutingData([data.examples[i] for i in rows], data.tiers, data.sha256)


def plot(evaluation: Evaluation, path: str) -> None:
    """The quality curves as a PNG (matplotlib: the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'tierstream[bench]'") from None
    figure, axes = plt.subplots(figsize=(7, 5))
    for name, figures in evaluation.report()["strategies"].items():
        curve = figures["curve"]
        axes.plot(curve["premium_share"], curve["quality_ratio"], label=name, linewidth=1.5)
    axes.axhline(TARGET, color="grey", linestyle=":", linewidth=1, label=f"{TARGET:.0%} of all-top quality")
    tiers = evaluation.data.tiers
    axes.set_xlabel(f"share of requests sent to {tiers[-1].value}")
    axes.set_ylabel(f"quality / all-{tiers[-1].value} quality")
    axes.set_title(f"Routing {tiers[-2].value} vs {tiers[-1].value}: {len(evaluation.data.examples):,} prompts")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
