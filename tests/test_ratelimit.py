"""Unit tests of streams/ratelimit.py and of the tier worker's provider resilience.

The cluster bound is checked by driving several processes' buckets on a simulated clock
through rebalances and counting what they send in every sliding 60 s window; the
resilience tests use the real SDKs against the in-process provider simulator.
"""

from __future__ import annotations

import asyncio
from collections import deque

import orjson
import pytest

from schemas.codec import decode
from schemas.models import ChatMessage, DeadLetter, Tier, TieredRequest
from streams.envelope import Source
from streams.pricing import PriceBook
from streams.processes import simulator_env
from streams.providers import Completion, ProviderError, ProviderRegistry
from streams.providers.openai_client import OpenAIClient
from streams.ratelimit import RateLimiter, Throttle, Throttles, bucket_sizes
from streams.roles.tier import TierHandler
from streams.simulator import ProviderSimulator
from streams.tokens import estimate_input_tokens
from topologies import Settings, Topology, load_settings
from topologies.config import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited_settings(**extra: str) -> Settings:
    env = {
        "TIERSTREAM__RATE_LIMITS__RESEARCHER__REQUESTS_PER_MINUTE": "600",
        "TIERSTREAM__RATE_LIMITS__RESEARCHER__TOKENS_PER_MINUTE": "600000",
        "TIERSTREAM__RATE_LIMITS__RESEARCHER__BURST": "30",
        **extra,
    }
    return load_settings(environ=env)


def assignment(topic: str, partitions: list[int]) -> list[tuple[str, int]]:
    return [(topic, p) for p in partitions]


def test_shares_follow_assigned_partitions_and_add_up_to_one() -> None:
    settings = limited_settings(TIERSTREAM__RATE_LIMITS__RESEARCHER__TIERS="[premium]")
    topology = Topology(settings)
    topic = topology.tiers[Tier.PREMIUM].name
    clock = Clock()
    limiters = [RateLimiter(settings, Tier.PREMIUM, topology, Throttles(dict(settings.providers)), clock) for _ in range(4)]
    # 6 partitions over 4 members: 2, 2, 1, 1; other topics in the assignment do not count
    for limiter, parts in zip(limiters, ([0, 1], [2, 3], [4], [5]), strict=True):
        limiter.on_assignment(assignment(topic, parts) + [("agent.spend", 0)])
    shares = [limiter.keys[("researcher", None)].share for limiter in limiters]
    assert shares == pytest.approx([2 / 6, 2 / 6, 1 / 6, 1 / 6])
    sustained = [s.requests_per_minute for lim in limiters for s in lim.stats() if s.agent_type == "researcher"]
    assert sum(sustained) == pytest.approx((600 - 30) * 60 / 61)


def test_default_limit_is_split_over_all_tiers_and_naive_mode_is_not() -> None:
    settings = limited_settings()
    topology = Topology(settings)
    limiter = RateLimiter(settings, Tier.STANDARD, topology, Throttles(dict(settings.providers)))
    limiter.on_assignment(assignment(topology.tiers[Tier.STANDARD].name, list(range(6))))
    assert limiter.keys[("researcher", None)].share == pytest.approx(6 / 18)
    naive = limited_settings(TIERSTREAM__WORKER__RATE_LIMIT_SHARING="process")
    limiter = RateLimiter(naive, Tier.STANDARD, topology, Throttles(dict(naive.providers)))
    limiter.on_assignment(assignment(topology.tiers[Tier.STANDARD].name, [0]))
    assert limiter.keys[("researcher", None)].share == 1.0


def test_per_model_limits_count_only_tiers_of_that_model() -> None:
    settings = limited_settings(
        TIERSTREAM__RATE_LIMITS__RESEARCHER__PER_MODEL="true",
        TIERSTREAM__TIERS__PREMIUM__MODEL="gpt-4o-mini",  # premium and nano share a model
    )
    topology = Topology(settings)
    limiter = RateLimiter(settings, Tier.PREMIUM, topology, Throttles(dict(settings.providers)))
    limiter.on_assignment(assignment(topology.tiers[Tier.PREMIUM].name, list(range(6))))
    key = limiter.keys[("researcher", "gpt-4o-mini")]
    assert key.share == pytest.approx(6 / 12)
    assert set(key.carriers) == {topology.tiers[Tier.PREMIUM].name, topology.tiers[Tier.NANO].name}


def test_rate_limits_null_turns_every_limit_off() -> None:
    settings = load_settings(environ={"TIERSTREAM__RATE_LIMITS": "null"})
    assert settings.rate_limits == {}
    limiter = RateLimiter(settings, Tier.NANO, Topology(settings), Throttles(dict(settings.providers)))
    assert limiter.keys == {} and limiter.out_of_scope == {}


def test_rate_limit_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"rate_limits.researcher: Value error, burst must be below"):
        limited_settings(TIERSTREAM__RATE_LIMITS__RESEARCHER__BURST="600")
    with pytest.raises(ConfigError, match=r"rate_limits.researcher.tiers.0"):
        limited_settings(TIERSTREAM__RATE_LIMITS__RESEARCHER__TIERS="[gold]")


@pytest.mark.parametrize("members", [1, 2, 3, 5])
def test_cluster_never_exceeds_the_limit_in_any_window_through_rebalances(members: int) -> None:
    """Greedy members, a rebalance every 37 s (one member leaves, comes back): the sum they
    send in every sliding 60 s window stays within the limit and uses most of it."""
    settings = limited_settings(TIERSTREAM__RATE_LIMITS__RESEARCHER__TIERS="[premium]")
    topology = Topology(settings)
    topic = topology.tiers[Tier.PREMIUM].name
    clock = Clock()
    limiters = [
        RateLimiter(settings, Tier.PREMIUM, topology, Throttles(dict(settings.providers)), clock)
        for _ in range(members)
    ]

    def rebalance(active: list[int]) -> None:
        for i, limiter in enumerate(limiters):
            parts = [p for p in range(6) if active and active[p % len(active)] == i]
            limiter.on_assignment(assignment(topic, parts))

    rebalance(list(range(members)))
    sent: deque[float] = deque()
    peak = total = 0
    step, end = 0.01, 1000.0 + 300
    next_rebalance, leaving = 1037.0, True
    while clock.now < end:
        if clock.now >= next_rebalance and members > 1:
            rebalance(list(range(1, members)) if leaving else list(range(members)))
            leaving, next_rebalance = not leaving, next_rebalance + 37
        for limiter in limiters:
            key = limiter.keys[("researcher", None)]
            while key.requests.wait_time(1, clock.now) == 0 and key.tokens.wait_time(500, clock.now) == 0:
                key.requests.take(1)
                key.tokens.take(500)
                sent.append(clock.now)
                total += 1
        while sent and sent[0] <= clock.now - 60:
            sent.popleft()
        peak = max(peak, len(sent))
        clock.now += step
    assert peak <= 600
    assert total >= 0.94 * 600 * 5  # five minutes at >= 94 % of the limit


def test_token_estimate_is_reconciled_with_reported_usage() -> None:
    settings = limited_settings(TIERSTREAM__RATE_LIMITS__RESEARCHER__TIERS="[premium]")
    topology = Topology(settings)
    limiter = RateLimiter(settings, Tier.PREMIUM, topology, Throttles(dict(settings.providers)), Clock())
    limiter.on_assignment(assignment(topology.tiers[Tier.PREMIUM].name, list(range(6))))
    permit = asyncio.run(limiter.acquire("researcher", "o3", 1000))
    key = limiter.keys[("researcher", None)]
    before = key.tokens.level
    limiter.reconcile(permit, input_tokens=100, output_tokens=50, max_output_tokens=400)
    assert key.tokens.level == pytest.approx(before + 1000 - (100 + 400))  # output as max_output_tokens
    usage = limited_settings(
        TIERSTREAM__RATE_LIMITS__RESEARCHER__TIERS="[premium]",
        TIERSTREAM__RATE_LIMITS__RESEARCHER__COUNT_OUTPUT="usage",
    )
    limiter = RateLimiter(usage, Tier.PREMIUM, topology, Throttles(dict(usage.providers)), Clock())
    limiter.on_assignment(assignment(topology.tiers[Tier.PREMIUM].name, list(range(6))))
    permit = asyncio.run(limiter.acquire("researcher", "o3", 1000))
    key = limiter.keys[("researcher", None)]
    key.tokens.level = 0
    limiter.reconcile(permit, input_tokens=100, output_tokens=50, max_output_tokens=400)
    assert key.tokens.level == pytest.approx(1000 - 150)


def test_a_process_without_partitions_holds_its_requests() -> None:
    settings = limited_settings(TIERSTREAM__RATE_LIMITS__RESEARCHER__TIERS="[premium]")
    topology = Topology(settings)
    limiter = RateLimiter(settings, Tier.PREMIUM, topology, Throttles(dict(settings.providers)))
    limiter.on_assignment([])

    async def scenario() -> None:
        task = asyncio.create_task(limiter.acquire("researcher", "o3", 10))
        key = limiter.keys[("researcher", None)]
        for _ in range(100):  # let the waiter run until it blocks: it must not get through
            await asyncio.sleep(0)
        assert key.waiting == 1 and not task.done()
        limiter.on_assignment(assignment(topology.tiers[Tier.PREMIUM].name, [0]))
        permit = await asyncio.wait_for(task, 5)
        assert permit.key is key and key.admitted == 1

    asyncio.run(scenario())


def test_throttle_shrinks_on_429_and_recovers_linearly() -> None:
    clock = Clock()
    throttle = Throttle(backoff=0.5, recovery_seconds=30, clock=clock)
    assert throttle.factor() == 1.0
    throttle.on_rate_limited(retry_after=2.0)
    assert throttle.factor() == pytest.approx(0.5)
    assert throttle.blocked_until == pytest.approx(clock.now + 2.0)
    throttle.on_rate_limited(retry_after=1.0)  # another call's 429 during the pause: no cut
    assert throttle.factor() == pytest.approx(0.5)
    clock.now += 2.0  # the pause is over; 2 s of linear recovery
    assert throttle.factor() == pytest.approx(0.5 + 0.5 * 2 / 30)
    throttle.on_rate_limited(retry_after=None)
    cut = (0.5 + 0.5 * 2 / 30) * 0.5
    assert throttle.factor() == pytest.approx(cut)
    clock.now += 15
    assert throttle.factor() == pytest.approx(cut + (1 - cut) / 2)  # linear recovery from the last cut
    clock.now += 15
    assert throttle.factor() == 1.0


def test_bucket_sizes_keep_burst_plus_refill_at_the_limit() -> None:
    limit = limited_settings().rate_limits["researcher"]
    (rc, rr), (tc, tr) = bucket_sizes(limit, 1.0)
    assert rc + rr * 61 == pytest.approx(600)  # a second of slack in every 60 s window
    assert tc + tr * 61 == pytest.approx(600_000)


# -- the tier worker against the simulator (real SDKs) ------------------------------------


def sim_settings(sim: ProviderSimulator) -> Settings:
    return load_settings(
        environ={
            **simulator_env(sim.port),
            "TIERSTREAM__PROVIDERS__OPENAI__RETRY_INITIAL_SECONDS": "0.01",
            "TIERSTREAM__PROVIDERS__OPENAI__RETRY_MAX_SECONDS": "0.02",
            "TIERSTREAM__PROVIDERS__OPENAI__MAX_RETRIES": "2",
            "TIERSTREAM__RATE_LIMITS__WRITER__TIERS": "[nano]",
        }
    )


def tiered(task: str, agent_type: str = "researcher") -> bytes:
    req = TieredRequest(
        request_id="r1", workflow_id="wf-1", agent_type=agent_type, task=task, max_output_tokens=32,
        tier=Tier.PREMIUM, routed_by="hint",
    )
    return orjson.dumps(req.model_dump(mode="json"))


async def handle(settings: Settings, registry: ProviderRegistry, body: bytes, limiter: RateLimiter | None = None):
    topology = Topology(settings)
    handler = TierHandler(Tier.PREMIUM, settings, topology, registry, PriceBook(settings), None, limiter)
    return await handler.handle(Source(topology.tiers[Tier.PREMIUM].name, 3, 41, b"wf-1", body))


@pytest.mark.parametrize(
    ("status", "attempts"),
    [(400, 1), (404, 1), (422, 1), (500, 3), (503, 3)],
)
async def test_provider_errors_dead_letter_with_attempts_and_original(
    simulator: ProviderSimulator, status: int, attempts: int
) -> None:
    """4xx request errors are sent once; 5xx are retried max_retries times; either way the
    request ends in the dead-letter topic with the error, attempts and original bytes."""
    settings = sim_settings(simulator)
    registry = ProviderRegistry(settings)
    body = tiered(f"Answer this. #sim:status={status}")
    try:
        out = await handle(settings, registry, body)
    finally:
        await registry.close()
    assert len(out) == 1 and out[0].topic == Topology(settings).dead_letters.name
    letter = decode(out[0].value, DeadLetter)
    assert (letter.code, letter.attempts, letter.original_value) == ("provider_error", attempts, body)
    assert f"HTTP {status}" in letter.reason and letter.request_id == "r1"
    assert simulator.stats()["requests_total"] == attempts


async def test_a_429_slows_the_whole_process_down(simulator: ProviderSimulator) -> None:
    settings = sim_settings(simulator)
    registry = ProviderRegistry(settings)
    try:
        out = await handle(settings, registry, tiered("Answer. #sim:status=429"))
    finally:
        await registry.close()
    throttle = registry.throttles.get("openai", settings.tiers[Tier.PREMIUM].model)
    assert throttle.rate_limited == 3  # every attempt answered 429, each one counted
    assert throttle.factor() < 0.5 * 0.5 + 0.02  # one cut per Retry-After pause: 3 pauses
    assert decode(out[0].value, DeadLetter).attempts == 3


async def test_limited_call_is_reconciled_and_unlisted_tier_is_dead_lettered(
    simulator: ProviderSimulator,
) -> None:
    settings = sim_settings(simulator)
    topology = Topology(settings)
    registry = ProviderRegistry(settings)
    limiter = RateLimiter(settings, Tier.PREMIUM, topology, registry.throttles)
    limiter.on_assignment(assignment(topology.tiers[Tier.PREMIUM].name, list(range(6))))
    try:
        ok = await handle(settings, registry, tiered("Summarise the findings."), limiter)
        scoped = await handle(settings, registry, tiered("Write a poem.", agent_type="writer"), limiter)
    finally:
        await registry.close()
    assert [o.topic for o in ok] == [topology.results.name, topology.costs.name]
    key = limiter.keys[("researcher", None)]
    assert key.admitted == 1
    result = orjson.loads(ok[0].value)
    request = decode(tiered("Summarise the findings."), TieredRequest)
    charged = key.tokens.capacity - key.tokens.level  # nothing refilled: tokens still out
    assert charged <= result["input_tokens"] + 32 + 1  # the estimate was refunded...
    assert estimate_input_tokens(request) > result["input_tokens"]  # ...because it was high
    letter = decode(scoped[0].value, DeadLetter)
    assert letter.code == "rate_limit_scope" and "rate_limits.writer.tiers" in letter.reason


def test_status_reads_pools_limits_and_throttles_from_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from streams.observability import Metrics
    from streams.ratelimit_metrics import parse_status, read_status

    settings = limited_settings(TIERSTREAM__RATE_LIMITS__RESEARCHER__TIERS="[premium]")
    topology = Topology(settings)
    registry = ProviderRegistry(settings)
    limiter = RateLimiter(settings, Tier.PREMIUM, topology, registry.throttles)
    limiter.on_assignment(assignment(topology.tiers[Tier.PREMIUM].name, [0, 1, 2]))
    registry.throttles.get("openai", "o3").on_rate_limited(1.0)
    metrics = Metrics(CollectorRegistry())
    metrics.pools.watch(registry.stats)
    metrics.rate_limits.watch(registry, limiter)
    status = parse_status(generate_latest(metrics.registry).decode())
    assert status["pools"]["openai"]["pool_calls"] == 0 and status["pools"]["openai"]["pool_max_size"] >= 1
    assert {k: v for k, v in status["pools"]["anthropic"].items() if k not in ("pool_size", "pool_in_use", "pool_calls")} == {
        "pool_min_size": 1, "pool_max_size": 1, "pool_max_calls_per_client": 256,
        "pool_recycle_after_calls": 100_000, "pool_idle_timeout_seconds": 300,
    }
    researcher = status["rate_limits"]["premium/researcher/*"]
    assert researcher["share"] == pytest.approx(0.5)
    assert researcher["requests_per_minute"] == pytest.approx(0.5 * (600 - 30) * 60 / 61 * 0.5, rel=0.01)  # halved by the 429
    assert status["throttles"]["openai/o3"]["provider_429"] == 1
    (unreachable,) = read_status(["http://127.0.0.1:9"], timeout=1)
    assert "error" in unreachable


@pytest.mark.parametrize("retry_after", [None, 0.0])
async def test_a_call_that_fails_once_is_retried_and_both_attempts_count(
    simulator: ProviderSimulator, monkeypatch: pytest.MonkeyPatch, retry_after: float | None
) -> None:
    """The first attempt runs outside the retry loop; its failure still gets a retry (a
    server asking for a wait of 0 s asks for one at once)."""
    settings = sim_settings(simulator)
    registry = ProviderRegistry(settings)
    answer = OpenAIClient.complete
    calls: list[str] = []

    async def fails_once(client: OpenAIClient, model: str, messages: list[ChatMessage], max_output_tokens: int) -> Completion:
        calls.append(model)
        if len(calls) == 1:
            raise ProviderError("openai", "HTTP 503 InternalServerError", status=503, retryable=True, retry_after=retry_after)
        return await answer(client, model, messages, max_output_tokens)

    monkeypatch.setattr(OpenAIClient, "complete", fails_once)
    try:
        out = await handle(settings, registry, tiered("Summarise the findings."))
    finally:
        await registry.close()
    result = orjson.loads(out[0].value)
    assert (result["status"], result["attempts"], len(calls)) == ("ok", 2, 2)
    assert simulator.stats()["requests_total"] == 1  # the failure never reached the server
