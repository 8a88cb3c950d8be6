"""Counters served at ``GET /stats``."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from .limiter import ModelWindow


class SimulatorStats:
    """Plain counters, updated on the event loop only (no locking needed)."""

    __slots__ = (
        "started_at",
        "requests_total",
        "by_api",
        "by_model",
        "by_status",
        "rate_limited",
        "errors_injected",
        "status_directives",
        "timeouts_injected",
        "bursts_429",
        "input_tokens",
        "output_tokens",
        "in_flight",
        "peak_in_flight",
    )

    def __init__(self) -> None:
        self.started_at = time.time()
        self.requests_total = 0
        self.by_api: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.rate_limited = 0
        self.errors_injected = 0
        self.status_directives = 0
        self.timeouts_injected = 0
        self.bursts_429 = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    def enter(self, api: str) -> None:
        self.requests_total += 1
        self.by_api[api] += 1
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def leave(self, status: int) -> None:
        self.in_flight -= 1
        self.by_status[status] += 1

    def snapshot(self, windows: dict[tuple[str, str], ModelWindow], now: float) -> dict[str, Any]:
        per_window: dict[str, dict[str, dict[str, int | None]]] = {}
        for (api, model), window in windows.items():
            window.evict(now)
            per_window.setdefault(api, {})[model] = {
                "requests_per_minute_limit": window.limits.requests_per_minute,
                "tokens_per_minute_limit": window.limits.tokens_per_minute,
                "max_requests_in_window": window.peak_requests,
                "max_tokens_in_window": window.peak_tokens,
                "current_requests_in_window": len(window.events),
                "current_tokens_in_window": window.tokens,
            }
        return {
            "uptime_s": round(time.time() - self.started_at, 3),
            "requests_total": self.requests_total,
            "by_api": dict(self.by_api),
            "by_model": dict(self.by_model),
            "by_status": {str(code): count for code, count in sorted(self.by_status.items())},
            "rate_limited": self.rate_limited,
            "errors_injected": self.errors_injected,
            "status_directives": self.status_directives,
            "timeouts_injected": self.timeouts_injected,
            "bursts_429": self.bursts_429,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "windows": per_window,
        }
