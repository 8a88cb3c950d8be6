"""Per-model sliding-window rate limiting and window peaks.

Each (api, model) pair owns a deque of ``(admitted_at, charged_tokens)`` for the last
60 s plus a running token sum, so admission is O(1) amortised: every entry is appended
once and evicted once. The same window yields the verification peaks: the most
requests / tokens admitted in any 60 s window equals the maximum, over admissions, of
the window's size right after that admission.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from .config import RATE_WINDOW_SECONDS, ModelRateLimit

LimitKind = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits and what is left of them, for the ``*ratelimit*`` response headers."""

    requests_limit: int | None
    requests_remaining: int
    requests_reset_s: float
    tokens_limit: int | None
    tokens_remaining: int
    tokens_reset_s: float


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: LimitKind
    limit: int
    used: int
    requested: int
    retry_after_s: float
    never_fits: bool
    """The request alone exceeds the limit: waiting will not help."""
    quota: Quota


class ModelWindow:
    __slots__ = ("events", "tokens", "limits", "peak_requests", "peak_tokens")

    def __init__(self, limits: ModelRateLimit) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.tokens = 0
        self.limits = limits
        self.peak_requests = 0
        self.peak_tokens = 0

    def evict(self, now: float) -> None:
        cutoff = now - RATE_WINDOW_SECONDS
        events = self.events
        while events and events[0][0] <= cutoff:
            self.tokens -= events.popleft()[1]

    def _reset_in(self, now: float) -> float:
        """Seconds until the oldest admission leaves the window (capacity frees up)."""
        if not self.events:
            return 0.0
        return max(0.0, self.events[0][0] + RATE_WINDOW_SECONDS - now)

    def quota(self, now: float) -> Quota:
        rpm = self.limits.requests_per_minute
        tpm = self.limits.tokens_per_minute
        reset = self._reset_in(now)
        return Quota(
            requests_limit=rpm,
            requests_remaining=0 if rpm is None else max(0, rpm - len(self.events)),
            requests_reset_s=reset,
            tokens_limit=tpm,
            tokens_remaining=0 if tpm is None else max(0, tpm - self.tokens),
            tokens_reset_s=reset,
        )

    def _tokens_free_in(self, now: float, needed: int) -> float:
        """Seconds until ``needed`` more tokens fit under the limit (scan from oldest)."""
        tpm = self.limits.tokens_per_minute
        assert tpm is not None
        excess = self.tokens + needed - tpm
        for admitted_at, charged in self.events:
            excess -= charged
            if excess <= 0:
                return max(0.0, admitted_at + RATE_WINDOW_SECONDS - now)
        return RATE_WINDOW_SECONDS

    def try_admit(self, now: float, tokens: int) -> Rejection | Quota:
        self.evict(now)
        rpm = self.limits.requests_per_minute
        tpm = self.limits.tokens_per_minute
        if rpm is not None and len(self.events) >= rpm:
            index = len(self.events) - rpm
            wait = self.events[index][0] + RATE_WINDOW_SECONDS - now
            return Rejection("requests", rpm, len(self.events), 1, wait, False, self.quota(now))
        if tpm is not None and self.tokens + tokens > tpm:
            never = tokens > tpm
            wait = RATE_WINDOW_SECONDS if never else self._tokens_free_in(now, tokens)
            return Rejection("tokens", tpm, self.tokens, tokens, wait, never, self.quota(now))
        self.events.append((now, tokens))
        self.tokens += tokens
        if len(self.events) > self.peak_requests:
            self.peak_requests = len(self.events)
        if self.tokens > self.peak_tokens:
            self.peak_tokens = self.tokens
        return self.quota(now)


def retry_after_header(seconds: float) -> tuple[str, str]:
    """``(Retry-After, retry-after-ms)``: whole seconds (>= 1) and milliseconds (>= 1)."""
    millis = max(1, math.ceil(seconds * 1000))
    return str(max(1, math.ceil(seconds))), str(millis)
