"""A 429 pauses every replica, against the real broker and the provider simulator.

Three ``tier:premium`` workers answer a steady stream of requests. One request asks the
simulator for a 429 with a 10 s Retry-After (``#sim:status=429 #sim:retry_after=10``):
only the worker that owns its partition sees that 429. The others must learn of it from
the throttles topic, so over the pause the simulator gets no call for the model from any
of them, although each holds requests; afterwards all three resume, at the same reduced
rate. Everything is observed from outside: each worker's ``/metrics`` (what ``tierstream
status`` reads) and the simulator's ``/stats``.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.ratelimit import sim_stats
from schemas.models import Tier, TieredRequest
from streams import processes
from streams.admin import wait_for_roles
from streams.broker import free_ports
from streams.ratelimit_metrics import read_status
from tests.support import Pipeline, collect, new_pipeline, produce_raw, wait_until

pytestmark = pytest.mark.e2e

RETRY_AFTER = 10.0
MARGIN = 0.5  # at each end of the pause: a call sent just before a replica paused may still be on the wire
State = dict[str, dict]


def request(request_id: str, n: int, task: str) -> TieredRequest:
    return TieredRequest(
        request_id=request_id, workflow_id=f"wf-{n % 12}", agent_type="researcher", task=task,
        max_output_tokens=16, tier=Tier.PREMIUM, routed_by="hint",
    )


async def steady_requests(pipeline: Pipeline, stop: asyncio.Event, sent: list[str], per_second: float) -> None:
    """Produce requests at a steady pace over every premium partition until ``stop``."""
    spec = pipeline.topology.tiers[Tier.PREMIUM]
    producer = AIOKafkaProducer(acks="all", **pipeline.kafka_kwargs())
    await producer.start()
    try:
        n = 0
        while not stop.is_set():
            r = request(f"s-{n}", n, f"Question {n}: summarise the findings.")
            await producer.send_and_wait(
                spec.name, orjson.dumps(r.model_dump(mode="json")), key=r.workflow_id.encode(), partition=n % spec.partitions
            )
            sent.append(r.request_id)
            n += 1
            try:  # the pace of the stream, not a wait for a condition
                await asyncio.wait_for(stop.wait(), 1 / per_second)
            except TimeoutError:
                pass
    finally:
        await producer.stop()


def _in_flight(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "tierstream_calls_in_flight":
            return sum(s.value for s in family.samples)
    return 0.0


def states(urls: list[str]) -> list[State]:
    """What ``tierstream status`` shows of each worker, and its calls in flight."""
    report = read_status(urls)
    for worker in report:
        assert "error" not in worker, worker
        worker["in_flight"] = _in_flight(str(worker["url"]))
    return report  # type: ignore[return-value]


def reachable(urls: list[str]) -> list[State] | None:
    """:func:`states`, or None while a worker's health server is not up yet."""
    try:
        return states(urls)
    except (AssertionError, OSError):
        return None


def throttle(state: State, model: str) -> dict[str, float]:
    return state["throttles"].get(f"openai/{model}", {})


def calls(state: State) -> float:
    return state["pools"].get("openai", {}).get("pool_calls", 0.0)


async def until(
    pipeline: Pipeline, urls: list[str], check: Callable[[list[State]], bool], timeout: float, what: str
) -> list[State]:
    """The workers' states once ``check`` holds for them (they are all up and alive)."""

    def now() -> list[State] | None:
        pipeline.assert_workers_alive()
        return reachable(urls)

    return await wait_until(lambda: asyncio.to_thread(now), timeout, what,
                            accept=lambda states: states is not None and check(states), interval=0.2)


async def model_calls(port: int, model: str) -> int:
    return int((await asyncio.to_thread(sim_stats, port))["by_model"].get(model, 0))


@pytest.mark.timeout(480)
async def test_a_429_pauses_every_replica_and_they_recover_together(kafka_bootstrap: str, tmp_path) -> None:
    sim_port, *health = free_ports(4)
    sim = processes.spawn(["provider-sim", "--port", str(sim_port), "--latency-ms", "20"], log_path=tmp_path / "simulator.log")
    # No retry: the request that drew the 429 is dead-lettered rather than drawing another.
    pipeline = new_pipeline(kafka_bootstrap, sim_port, tmp_path, TIERSTREAM__PROVIDERS__OPENAI__MAX_RETRIES="0")
    model = pipeline.settings.tiers[Tier.PREMIUM].model
    urls = [f"http://127.0.0.1:{port}" for port in health]
    stop, sent = asyncio.Event(), []
    producing: asyncio.Task[None] | None = None
    try:
        processes.wait_http_ok(f"http://127.0.0.1:{sim_port}/health", 30, sim)
        # (the cost role grants the budget leases every call is made under)
        await pipeline.start_workers("tier:premium", "tier:premium", "tier:premium", "cost", health_ports=health)
        await wait_for_roles(pipeline.settings, ["tier-premium"], 240, members=3)
        producing = asyncio.create_task(steady_requests(pipeline, stop, sent, per_second=6))
        await until(pipeline, urls, lambda now: all(calls(s) >= 3 for s in now), 120, "every replica answering")

        trigger = request("trigger-429", 5, f"Answer. #sim:status=429 #sim:retry_after={RETRY_AFTER:g}")
        produced_at = time.monotonic()
        await produce_raw(
            kafka_bootstrap, pipeline.topology.tiers[Tier.PREMIUM].name,
            [(trigger.workflow_id.encode(), orjson.dumps(trigger.model_dump(mode="json")))],
        )
        paused = await until(
            pipeline, urls, lambda now: all(throttle(s, model).get("pause_seconds", 0) > 0 for s in now),
            30, "every replica paused",
        )
        all_paused_after = time.monotonic() - produced_at
        receivers = [s for s in paused if throttle(s, model).get("provider_429", 0) > 0]
        others = [s for s in paused if throttle(s, model).get("provider_429", 0) == 0]
        assert len(receivers) == 1 and len(others) == 2, paused  # one replica saw the 429
        assert throttle(receivers[0], model)["events_sent"] == 1
        for state in others:  # the two others slowed down because of the broadcast alone
            assert throttle(state, model)["events_applied"] >= 1 and throttle(state, model)["events_sent"] == 0
            assert throttle(state, model)["throttle_factor"] == pytest.approx(
                throttle(receivers[0], model)["throttle_factor"], abs=0.02
            )
        pause_left = min(throttle(s, model)["pause_seconds"] for s in paused)
        window_start, window_end = time.monotonic() + MARGIN, time.monotonic() + pause_left - MARGIN
        assert window_end - window_start > RETRY_AFTER / 2, f"the broadcast took too long: {pause_left:.1f} s left"

        # Over the pause: no call for the model from any replica, though each holds requests.
        await asyncio.sleep(window_start - time.monotonic())  # the margin after the pause began
        at_start = await model_calls(sim_port, model)
        await asyncio.sleep(window_end - time.monotonic())  # the measurement window: its length is the point
        pipeline.assert_workers_alive()
        at_end = await model_calls(sim_port, model)
        held = await asyncio.to_thread(states, urls)
        print(
            f"\nall replicas paused {all_paused_after:.2f} s after the trigger was produced; "
            f"{at_end - at_start} calls for {model} in the {window_end - window_start:.1f} s window; "
            f"requests held per replica {[s['in_flight'] for s in held]}"
        )
        assert at_end == at_start
        assert all(s["in_flight"] > 0 for s in held), held  # every replica had work it held back
        assert all(throttle(s, model)["pause_seconds"] > 0 for s in held)

        # Afterwards every replica calls again, at the same reduced rate.
        before = [calls(s) for s in held]
        resumed = await until(
            pipeline, urls, lambda now: all(calls(s) > b for s, b in zip(now, before, strict=True)),
            30, "every replica calling again",
        )
        factors = [throttle(s, model)["throttle_factor"] for s in resumed]
        assert max(factors) < 1.0 and max(factors) - min(factors) < 0.02, factors

        stop.set()
        await producing
        seen = await collect(pipeline, len(sent) + 1, timeout=120)
    finally:
        stop.set()
        if producing is not None and not producing.done():
            producing.cancel()
        pipeline.stop_workers()
        processes.stop(sim)
    # Nothing lost on the way: every request answered once, the trigger dead-lettered.
    assert sorted(r["request_id"] for r in seen.results) == sorted(sent)
    (letter,) = seen.dead_letters
    assert letter["request_id"] == "trigger-429" and letter["code"] == "provider_error" and "HTTP 429" in letter["reason"]
