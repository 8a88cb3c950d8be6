"""Cluster-wide rate limits that follow partition assignment, and 429 back-off.

Mechanism
---------
A limit L (requests or tokens per minute, burst B) for an agent type is enforced by every
tier worker process on its *share* of it: the fraction of the partitions that can carry the
agent type (the tier topics of the tiers the limit applies to) that Kafka assigned to this
process. The share is recomputed on every rebalance (Faust's ``on_partitions_assigned``).
The consumer group assigns each partition to exactly one member, so the shares of all
members add up to 1 with any number of replicas and no store beyond Kafka.

Each share is a token bucket of capacity ``share x B`` refilled at ``share x (L - B) / 61``
per second (one second of slack for the time a request takes to reach the provider). A bucket never holds more than its capacity, a rebalance never adds tokens
(levels are capped to the new capacity), and the capacities add up to B, so in any 60 s
window the cluster sends at most ``B + (L - B) = L``: the provider's sliding-window limit is
never exceeded by us. What it costs: the share follows partitions, not load. A process
whose partitions are idle leaves its share unused while another's backlog waits; with
evenly loaded partitions (keys spread over many workflows) the loss is small.

Why not a library: ``aiolimiter`` cannot change its rate on a rebalance or a 429, has no
refunds (the token estimate is reconciled with reported usage after the call) and refuses
an amount above its capacity; ``limits`` stores one entry per unit of a moving window,
which is millions for tokens per minute. The bucket is a few lines of arithmetic.

Token budgets: before a call the bucket is charged the worst-case input estimate (the
budget gate's: ``streams.tokens.estimate_input_tokens``) plus ``max_output_tokens``;
after it the estimate is replaced with the reported input tokens (and, with
``count_output: usage``, the reported output tokens) and the difference is refunded.

429s: :class:`Throttle` (one per provider model, per process) pauses every call to that
model until ``Retry-After`` has passed and multiplies the rate of every bucket sending to
it by ``rate_limit_backoff_factor``, then lets it recover linearly to the full rate over
``rate_limit_recovery_seconds``. ``Throttles.listeners`` hear of every such change a
429 made here; ``streams.throttle_feed`` publishes them and applies the other replicas'
with :meth:`Throttle.adopt`, which tells no listener (no feedback loop).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from schemas.models import Tier
from topologies.config import ProviderSettings, RateLimit, Settings
from topologies.topics import Topology

Clock = Callable[[], float]
MINUTE = 60.0
# Buckets refill what is left of the limit after the burst over 61 s rather than 60: a
# request reaches the provider some time after its token was taken (a new connection, a
# busy event loop), and the first calls of a process are the slowest. Measured: with a
# 60 s refill one replica alone drew 1 over-limit 429 from the simulator at start-up.
REFILL_WINDOW = MINUTE + 1.0


class TokenBucket:
    """A token bucket whose capacity and rate change with the process's share.

    The level may go below zero: a request larger than the capacity (a big token
    estimate on a small share) waits for a full bucket, then runs into debt that later
    refills pay back, so the long-run rate still holds.
    """

    __slots__ = ("capacity", "rate", "level", "updated")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate  # per second, before the 429 factor
        self.level = capacity  # a fresh process may use its share of the burst at once
        self.updated = now

    def refill(self, now: float, factor: float = 1.0) -> None:
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.capacity, self.level + elapsed * self.rate * factor)
        self.updated = now

    def resize(self, capacity: float, rate: float, now: float, factor: float = 1.0) -> None:
        """A new share: never adds tokens, so the cluster's total level stays <= B."""
        self.refill(now, factor)
        self.capacity, self.rate = capacity, rate
        self.level = min(self.level, capacity)

    def wait_time(self, amount: float, now: float, factor: float = 1.0) -> float:
        """Seconds until ``amount`` can be taken (0: now; inf: this process has no share)."""
        self.refill(now, factor)
        if self.capacity <= 0 or self.rate * factor <= 0 and self.level < min(amount, self.capacity):
            return math.inf
        needed = min(amount, self.capacity) - self.level
        if needed <= 0:
            return 0.0
        return needed / (self.rate * factor)

    def take(self, amount: float) -> None:
        self.level -= amount

    def refund(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


@dataclass(frozen=True, slots=True)
class BackoffCurve:
    """The rate allowed after a cut: ``cut_factor`` of it at ``cut_at``, back to the full
    rate linearly over ``recovery_seconds`` (times on a monotonic clock)."""

    cut_factor: float
    cut_at: float
    recovery_seconds: float

    def factor(self, now: float) -> float:
        recovered = (now - self.cut_at) / self.recovery_seconds
        return min(1.0, self.cut_factor + (1.0 - self.cut_factor) * recovered)


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """A throttle's back-off: no call before ``blocked_until``, then ``curve``."""

    blocked_until: float
    curve: BackoffCurve


class Throttle:
    """429 back-off for one provider model in this process: pause, shrink, recover."""

    def __init__(
        self,
        backoff: float,
        recovery_seconds: float,
        clock: Clock = time.monotonic,
        ready: asyncio.Event | None = None,
    ) -> None:
        self.backoff = backoff
        self.clock = clock
        self.blocked_until = 0.0
        self.rate_limited = 0  # 429s seen
        self.events_sent = 0  # back-off changes published to the other replicas
        self.events_applied = 0  # other replicas' back-off that paused or slowed this process
        self._ready = ready  # set once the other replicas' back-off is known
        self._curve = BackoffCurve(1.0, -math.inf, recovery_seconds)

    def factor(self, now: float | None = None) -> float:
        """The fraction of the configured rate allowed now, recovering linearly to 1."""
        return self._curve.factor(self.clock() if now is None else now)

    def state(self) -> ThrottleState:
        return ThrottleState(self.blocked_until, self._curve)

    def pause_remaining(self, now: float | None = None) -> float:
        return max(0.0, self.blocked_until - (self.clock() if now is None else now))

    def on_rate_limited(self, retry_after: float | None) -> bool:
        """A 429 from the provider. True if it changed the back-off (a new cut, or a longer
        pause): what the other replicas should hear of."""
        now = self.clock()
        self.rate_limited += 1
        changed = False
        # One cut per pause: the other calls that were in flight when the provider said
        # stop answer 429 too, and must not each halve the rate again.
        if now >= self.blocked_until:
            cut = max(0.01, self.factor(now) * self.backoff)
            self._curve = BackoffCurve(cut, now, self._curve.recovery_seconds)
            changed = True
        if retry_after is not None and now + retry_after > self.blocked_until:
            self.blocked_until = now + retry_after
            changed = True
        return changed

    def adopt(self, other: ThrottleState) -> bool:
        """Take on another replica's back-off: its pause if longer, its rate curve if lower
        now. Idempotent, and never reported to listeners. True if this slowed us down."""
        now = self.clock()
        changed = False
        if other.blocked_until > self.blocked_until and other.blocked_until > now:
            self.blocked_until = other.blocked_until
            changed = True
        if other.curve.factor(now) < self.factor(now) - 1e-9:
            self._curve = other.curve
            changed = True
        if changed:
            self.events_applied += 1
        return changed

    async def wait(self) -> None:
        """Hold a call while the provider asked this process (or another replica) to wait
        (Retry-After), and until the other replicas' back-off has been read at start."""
        if self._ready is not None and not self._ready.is_set():
            await self._ready.wait()
        while (delay := self.blocked_until - self.clock()) > 0:
            await asyncio.sleep(delay)


# (provider, model, throttle, the Retry-After the provider asked for)
Listener = Callable[[str, str, Throttle, "float | None"], None]


class Throttles:
    """The :class:`Throttle` of each (provider, model), made on first use."""

    def __init__(self, providers: dict[str, ProviderSettings], clock: Clock = time.monotonic) -> None:
        self._providers = providers
        self.clock = clock
        self._by_model: dict[tuple[str, str], Throttle] = {}
        # Told when a 429 here changed a back-off.
        self.listeners: list[Listener] = []
        # Cleared by a feed of the other replicas' back-off until it has read it.
        self.ready = asyncio.Event()
        self.ready.set()

    def knows(self, provider: str) -> bool:
        return provider in self._providers

    def get(self, provider: str, model: str) -> Throttle:
        key = (provider, model)
        throttle = self._by_model.get(key)
        if throttle is None:
            conf = self._providers[provider]  # type: ignore[index]
            throttle = self._by_model[key] = Throttle(
                conf.rate_limit_backoff_factor, conf.rate_limit_recovery_seconds, self.clock, self.ready
            )
        return throttle

    def on_rate_limited(self, provider: str, model: str, retry_after: float | None) -> None:
        """A 429 from ``provider`` for ``model`` in this process."""
        throttle = self.get(provider, model)
        if throttle.on_rate_limited(retry_after):
            for listener in self.listeners:
                listener(provider, model, throttle, retry_after)

    def items(self) -> Iterator[tuple[tuple[str, str], Throttle]]:
        return iter(list(self._by_model.items()))


@dataclass(eq=False)
class LimitedKey:
    """One limit in this process: an agent type, or an agent type and model (per_model)."""

    agent_type: str
    model: str | None
    limit: RateLimit
    carriers: dict[str, int]  # tier topic -> partitions that can carry this key's requests
    requests: TokenBucket
    tokens: TokenBucket
    share: float = 0.0
    waiting: int = 0
    admitted: int = 0
    # FIFO: a large token request is not starved by a stream of small ones.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Permit:
    """What one call took from its limit; given back in part once usage is known."""

    key: LimitedKey | None
    tokens: int


@dataclass(frozen=True)
class LimitStats:
    tier: str
    agent_type: str
    model: str
    share: float
    requests_per_minute: float
    tokens_per_minute: float
    waiting: int
    admitted: int


def bucket_sizes(limit: RateLimit, share: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """((capacity, rate/s) of the request bucket, the same of the token bucket) for a share."""
    token_burst = limit.tokens_per_minute * limit.burst / limit.requests_per_minute
    return (
        (share * limit.burst, share * (limit.requests_per_minute - limit.burst) / REFILL_WINDOW),
        (share * token_burst, share * (limit.tokens_per_minute - token_burst) / REFILL_WINDOW),
    )


class RateLimiter:
    """The rate limits one tier worker process enforces (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        tier: Tier,
        topology: Topology,
        throttles: Throttles,
        clock: Clock = time.monotonic,
    ) -> None:
        self.tier = tier
        self.topic = topology.tiers[tier].name
        self.throttles = throttles
        self.clock = clock
        self.sharing = settings.worker.rate_limit_sharing
        self.provider = settings.tiers[tier].provider
        self.keys: dict[tuple[str, str | None], LimitedKey] = {}
        self.out_of_scope: dict[str, list[Tier]] = {}
        now = clock()
        for agent_type, limit in settings.rate_limits.items():
            tiers = limit.tiers or list(Tier)
            if tier not in tiers:
                self.out_of_scope[agent_type] = tiers
                continue
            model = settings.tiers[tier].model if limit.per_model else None
            carriers = {
                topology.tiers[t].name: topology.tiers[t].partitions
                for t in tiers
                if model is None or settings.tiers[t].model == model
            }
            # "process": the naive limiter, each process enforcing the whole limit.
            share = 1.0 if self.sharing == "process" else 0.0
            (rc, rr), (tc, tr) = bucket_sizes(limit, share)
            self.keys[(agent_type, model)] = LimitedKey(
                agent_type, model, limit, carriers, TokenBucket(rc, rr, now), TokenBucket(tc, tr, now),
                share=share,
            )
        self._model = settings.tiers[tier].model
        self._fresh = True

    def on_assignment(self, assigned: Iterable[tuple[str, int]]) -> None:
        """Recompute every share from this process's assigned (topic, partition)s."""
        if self.sharing == "process":
            return
        mine = sum(1 for topic, _ in assigned if topic == self.topic)
        now = self.clock()
        for key in self.keys.values():
            share = mine / sum(key.carriers.values())
            (rc, rr), (tc, tr) = bucket_sizes(key.limit, share)
            factor = self.throttles.get(self.provider, self._model).factor(now)
            key.requests.resize(rc, rr, now, factor)
            key.tokens.resize(tc, tr, now, factor)
            if self._fresh:  # the first assignment: start with the share of the burst
                key.requests.level, key.tokens.level = rc, tc
            key.share = share
            changed, key.changed = key.changed, asyncio.Event()
            changed.set()
        self._fresh = False

    def key_for(self, agent_type: str) -> LimitedKey | None:
        return self.keys.get((agent_type, None)) or self.keys.get((agent_type, self._model))

    async def acquire(self, agent_type: str, model: str, tokens: int) -> Permit:
        """Wait until one request of ``tokens`` estimated tokens fits this process's share.

        While it waits, the Faust agent's coroutine waits too: at most
        ``max_concurrent_tasks`` requests are held, the backlog stays in Kafka.
        """
        throttle = self.throttles.get(self.provider, model)
        key = self.key_for(agent_type)
        if key is None:
            await throttle.wait()
            return Permit(None, tokens)
        key.waiting += 1
        try:
            async with key.lock:
                while True:
                    await throttle.wait()
                    now = self.clock()
                    factor = throttle.factor(now)
                    delay = max(
                        key.requests.wait_time(1, now, factor),
                        key.tokens.wait_time(tokens, now, factor),
                    )
                    if delay <= 0:
                        key.requests.take(1)
                        key.tokens.take(tokens)
                        key.admitted += 1
                        return Permit(key, tokens)
                    changed = key.changed
                    # Re-check at least every second: a 429 factor recovers over time.
                    try:
                        await asyncio.wait_for(changed.wait(), min(delay, 1.0))
                    except TimeoutError:
                        pass
        finally:
            key.waiting -= 1

    def reconcile(self, permit: Permit, input_tokens: int, output_tokens: int, max_output_tokens: int) -> None:
        """Replace the estimate with the reported usage; refund what was over-charged."""
        key = permit.key
        if key is None:
            return
        output = output_tokens if key.limit.count_output == "usage" else max_output_tokens
        over = permit.tokens - (input_tokens + output)
        if over > 0:
            key.tokens.refund(over)
        else:
            key.tokens.take(-over)  # the estimate was low: pay the rest from the bucket

    def stats(self) -> list[LimitStats]:
        out = []
        for key in self.keys.values():
            factor = self.throttles.get(self.provider, self._model).factor()
            (_, rr), (_, tr) = bucket_sizes(key.limit, key.share)
            out.append(
                LimitStats(
                    self.tier.value, key.agent_type, key.model or "*", key.share, rr * MINUTE * factor,
                    tr * MINUTE * factor, key.waiting, key.admitted,
                )
            )
        return out
