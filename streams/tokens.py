"""Token estimates made before a call, when the provider has not counted anything yet."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.models import AgentRequest


def estimate_chat_tokens(contents: Sequence[str]) -> int:
    """A deliberately high estimate (3 characters a token, plus per-message overhead):
    budget reservations and rate-limit admissions must not undershoot the real bill."""
    return sum(len(c) for c in contents) // 3 + 8 * len(contents) + 8


def estimate_input_tokens(request: AgentRequest) -> int:
    return estimate_chat_tokens([m.content for m in request.chat()])
