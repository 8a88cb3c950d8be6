"""Configuration of the provider simulator.

Latency model
-------------
Real provider latency is right-skewed: most calls finish near a typical time and a
long tail takes several times longer. The simulator draws the *base* latency of each
call from a log-normal distribution described by its median and its 99th percentile
(both in milliseconds), then adds ``latency_ms_per_output_token`` for every generated
token (decode time), so long answers are slower, as they are for real models.

* ``latency_ms_median == 0`` means "answer immediately" (no sleep at all, whatever
  the other latency fields say); use it for throughput benchmarks.
* ``latency_ms_p99 = None`` means ``4 x median`` (sigma ~= 0.6, a typical tail).
* ``latency_ms_p99 == latency_ms_median`` gives a constant latency.

Rate limits
-----------
``requests_per_minute`` / ``tokens_per_minute`` are enforced per (api, model) over a
*sliding* 60 s window (exact: a deque of admission timestamps, not a token bucket).
A request is charged ``input tokens + max_tokens`` at admission, as OpenAI does.
``model_limits`` gives a model its own limits; a model listed there uses exactly those
(``None`` = unlimited) instead of the global ones.

Batches
-------
The OpenAI Batch API and the Anthropic Message Batches API have their own queue: batch
items never touch the online windows, latency or fault injection. A batch's items are
answered one after another over ``batch_delay_seconds`` from its creation (item ``i`` of
``n`` at ``created + delay * (i + 1) / n``, monotonic clock), so the whole batch ends
exactly ``batch_delay_seconds`` after creation. ``batch_item_error_rate`` and
``batch_item_expire_rate`` make a fraction of the items fail (500 ``api_error``) or expire,
drawn from a generator seeded by ``seed``. ``batch_max_requests`` caps one batch (``None``:
each API's own cap, 50,000 for OpenAI and 100,000 for Anthropic); ``batch_max_enqueued_tokens``
caps, per (api, model), the tokens of unfinished batches (input tokens + max tokens of
each item, as the online limiter charges them).
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

RATE_WINDOW_SECONDS = 60.0
"""Length of the sliding rate-limit window (the "minute" of RPM/TPM)."""

_P99_Z = 2.3263478740408408
"""Standard-normal quantile of 0.99."""

PositiveLimit = Annotated[int, Field(ge=1)]

OPENAI_BATCH_MAX_REQUESTS = 50_000
"""Requests per OpenAI batch input file."""
ANTHROPIC_BATCH_MAX_REQUESTS = 100_000
"""Requests per Anthropic Message Batch."""


class ModelRateLimit(BaseModel):
    """Rate limits of one model; ``None`` means unlimited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: PositiveLimit | None = None
    tokens_per_minute: PositiveLimit | None = None


class SimulatorConfig(BaseModel):
    """Behaviour of ``tierstream provider-sim``; every field has a usable default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8700, ge=0, le=65535, description="0 picks a free port")

    latency_ms_median: float = Field(default=400.0, ge=0, le=600_000)
    latency_ms_p99: float | None = Field(default=None, ge=0, le=3_600_000)
    latency_ms_per_output_token: float = Field(default=0.0, ge=0, le=10_000)

    error_rate: float = Field(
        default=0.0, ge=0, le=1, description="fraction answered 500/503 (Anthropic: 500/529)"
    )
    timeout_rate: float = Field(
        default=0.0, ge=0, le=1, description="fraction that hang hang_seconds before answering"
    )
    hang_seconds: float = Field(default=30.0, ge=0, le=3600)
    # Bursts of 429: for burst_429_seconds out of every burst_429_every_seconds (counted
    # from start), every call is answered 429 with Retry-After: burst_429_retry_after_seconds.
    burst_429_every_seconds: float | None = Field(default=None, gt=0, le=86_400)
    burst_429_seconds: float = Field(default=1.0, gt=0, le=3600)
    burst_429_retry_after_seconds: float = Field(default=1.0, ge=0, le=3600)

    requests_per_minute: PositiveLimit | None = None
    tokens_per_minute: PositiveLimit | None = None
    model_limits: dict[str, ModelRateLimit] = Field(default_factory=dict)

    default_max_tokens: int = Field(
        default=256, ge=1, le=1_000_000, description="OpenAI max_tokens when the request has none"
    )
    output_tokens_min: int = Field(
        default=16, ge=1, le=200_000, description="shortest natural answer, in tokens"
    )
    output_tokens_max: int = Field(
        default=512, ge=1, le=200_000, description="longest natural answer, in tokens"
    )

    batch_delay_seconds: float = Field(
        default=2.0, ge=0, le=86_400, description="a batch ends this long after its creation"
    )
    batch_item_error_rate: float = Field(
        default=0.0, ge=0, le=1, description="fraction of batch items answered 500 api_error"
    )
    batch_item_expire_rate: float = Field(
        default=0.0, ge=0, le=1, description="fraction of batch items that expire unanswered"
    )
    batch_max_requests: PositiveLimit | None = Field(
        default=None, description="items per batch; None: 50,000 (OpenAI) / 100,000 (Anthropic)"
    )
    batch_max_enqueued_tokens: PositiveLimit | None = Field(
        default=None, description="tokens of unfinished batches per (api, model); None: unlimited"
    )

    seed: int | None = Field(
        default=None, description="seeds latency, fault injection and batch item draws"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> SimulatorConfig:
        if self.latency_ms_p99 is not None and self.latency_ms_p99 < self.latency_ms_median:
            raise ValueError("latency_ms_p99 must be >= latency_ms_median")
        every = self.burst_429_every_seconds
        if every is not None and self.burst_429_seconds >= every:
            raise ValueError("burst_429_seconds must be below burst_429_every_seconds")
        if self.output_tokens_max < self.output_tokens_min:
            raise ValueError("output_tokens_max must be >= output_tokens_min")
        if self.batch_item_error_rate + self.batch_item_expire_rate > 1:
            raise ValueError("batch_item_error_rate + batch_item_expire_rate must be <= 1")
        return self

    def batch_limit(self, api: str) -> int:
        """The most items one batch of ``api`` may hold."""
        if self.batch_max_requests is not None:
            return self.batch_max_requests
        return OPENAI_BATCH_MAX_REQUESTS if api == "openai" else ANTHROPIC_BATCH_MAX_REQUESTS

    def limits_for(self, model: str) -> ModelRateLimit:
        """The limits that apply to ``model``."""
        override = self.model_limits.get(model)
        if override is not None:
            return override
        return ModelRateLimit(
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )

    def lognormal_params(self) -> tuple[float, float] | None:
        """``(mu, sigma)`` of the base latency in ms, or ``None`` for zero latency."""
        if self.latency_ms_median <= 0:
            return None
        p99 = self.latency_ms_p99 if self.latency_ms_p99 is not None else 4 * self.latency_ms_median
        sigma = math.log(p99 / self.latency_ms_median) / _P99_Z
        return math.log(self.latency_ms_median), sigma
