"""The ``rules`` strategy: free, local tiering by keywords and length."""

from __future__ import annotations

from schemas.models import Tier
from topologies.config import RulesSettings


def rules_tier(text: str, rules: RulesSettings) -> Tier:
    lowered = text.lower()
    if any(k in lowered for k in rules.premium_keywords) or len(text) >= rules.premium_min_chars:
        return Tier.PREMIUM
    if any(k in lowered for k in rules.nano_keywords):
        return Tier.NANO
    return Tier.STANDARD
