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
        "batch_calls",
        "batches_created",
        "batches_rejected",
        "batches_failed",
        "batches_cancel_requests",
        "batches_ended",
        "batch_items_submitted",
        "batch_items",
        "batch_input_tokens",
        "batch_output_tokens",
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
        # Batches: their HTTP calls are counted here only, not in requests_total / by_*.
        self.batch_calls: Counter[int] = Counter()  # by HTTP status
        self.batches_created: Counter[str] = Counter()  # by api: create calls answered 200
        self.batches_rejected: Counter[str] = Counter()  # create calls answered 4xx/429
        self.batches_failed: Counter[str] = Counter()  # OpenAI: failed validation
        self.batches_cancel_requests: Counter[str] = Counter()
        self.batches_ended: Counter[str] = Counter()  # processed to an end (not failed)
        self.batch_items_submitted: Counter[tuple[str, str]] = Counter()  # (api, model)
        self.batch_items: Counter[tuple[str, str]] = Counter()  # (api, outcome)
        self.batch_input_tokens: Counter[str] = Counter()  # of succeeded items
        self.batch_output_tokens: Counter[str] = Counter()

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

    def batch_snapshot(self, enqueued_tokens: dict[tuple[str, str], int]) -> dict[str, Any]:
        submitted: Counter[str] = Counter()
        by_model: dict[str, dict[str, int]] = {}
        for (api, model), count in sorted(self.batch_items_submitted.items()):
            submitted[api] += count
            by_model.setdefault(api, {})[model] = count
        items: dict[str, dict[str, int]] = {}
        for (api, outcome), count in sorted(self.batch_items.items()):
            items.setdefault(api, {})[outcome] = count
        enqueued: dict[str, dict[str, int]] = {}
        for (api, model), tokens in sorted(enqueued_tokens.items()):
            enqueued.setdefault(api, {})[model] = tokens
        return {
            "calls_by_status": {str(code): n for code, n in sorted(self.batch_calls.items())},
            "created": dict(self.batches_created),
            "rejected": dict(self.batches_rejected),
            "failed": dict(self.batches_failed),
            "cancel_requests": dict(self.batches_cancel_requests),
            "ended": dict(self.batches_ended),
            "items_submitted": dict(submitted),
            "items_submitted_by_model": by_model,
            "items": items,
            "input_tokens": dict(self.batch_input_tokens),
            "output_tokens": dict(self.batch_output_tokens),
            "enqueued_tokens": enqueued,
        }
