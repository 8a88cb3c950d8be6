"""Read labelled routing data (``schemas.routing``): every line valid, or an error naming it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import orjson
from pydantic import ValidationError

from schemas.models import Tier
from schemas.routing import RoutingExample

TIER_ORDER = (Tier.NANO, Tier.STANDARD, Tier.PREMIUM)


class RoutingDataError(ValueError):
    """The data file cannot be used; the message names the line and what is wrong."""


@dataclass(frozen=True)
class RoutingData:
    examples: list[RoutingExample]
    tiers: tuple[Tier, ...]  # the tiers every example scores, cheapest first
    sha256: str  # of the file's bytes: a trained router records what it learned from

    @property
    def top(self) -> Tier:
        return self.tiers[-1]

    def scores(self, tier: Tier) -> list[float]:
        return [e.scores[tier] for e in self.examples]


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(the object)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_lines(raw: bytes, name: str = "<data>") -> RoutingData:
    examples: list[RoutingExample] = []
    tiers: frozenset[Tier] | None = None
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = RoutingExample.model_validate(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise RoutingDataError(f"{name}, line {number}: not valid JSON ({exc})") from None
        except ValidationError as exc:
            raise RoutingDataError(f"{name}, line {number}: {_describe(exc)}") from None
        present = frozenset(example.scores)
        if tiers is None:
            tiers = present
        elif present != tiers:
            raise RoutingDataError(
                f"{name}, line {number}: scores tiers {sorted(t.value for t in present)}, but "
                f"earlier lines score {sorted(t.value for t in tiers)}; every line must score the same tiers"
            )
        examples.append(example)
    if tiers is None:
        raise RoutingDataError(f"{name}: no examples")
    ordered = tuple(t for t in TIER_ORDER if t in tiers)
    return RoutingData(examples, ordered, hashlib.sha256(raw).hexdigest())


def load_routing_data(path: str | Path) -> RoutingData:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RoutingDataError(f"cannot read routing data {path}: {exc.strerror}") from None
    return parse_lines(raw, str(path))
