"""Metrics hooks, the outgoing-message observer and the health/readiness/metrics server."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import aiohttp
import pytest
from faust.types import TP
from prometheus_client import CollectorRegistry, generate_latest

from schemas.codec import encode
from schemas.models import AgentResult, CostEvent, Tier, Timings
from streams.envelope import DeadLetters, Outgoing, Source
from streams.guardrails.view import GuardrailView
from streams.observability import (
    HealthServer,
    Metrics,
    OutgoingObserver,
    dead_letter_code,
)
from streams.providers.pool import PoolStats
from streams.supervisor import HEALTH_PORT_ENV, role_env
from tests.monitoring import FakeLagConsumer, spend
from tests.support import wait_until
from topologies.config import load_settings
from topologies.topics import Topology

SETTINGS = load_settings(environ={})
TOPOLOGY = Topology(SETTINGS)
SOURCE = Source("agent.requests.nano", 2, 41, b"wf-1", b"{}")
NOW = datetime.now(UTC)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def _result(status: str = "ok", latency_ms: float = 250.0) -> Outgoing:
    result = AgentResult(
        request_id="r-1", workflow_id="wf-1", agent_type="writer", status=status,  # type: ignore[arg-type]
        output="hi", tier=Tier.NANO, routed_by="rules", provider="openai", model="gpt-4o-mini",
        input_tokens=10, output_tokens=20, cost_usd=0.001, attempts=1,
        timings=Timings(
            created_at=NOW, classified_at=NOW, started_at=NOW, finished_at=NOW,
            model_latency_ms=latency_ms,
        ),
    )
    return Outgoing(TOPOLOGY.results.name, b"wf-1", encode(result))


def _cost(tier: Tier = Tier.NANO) -> Outgoing:
    event = CostEvent(
        request_id="r-1", workflow_id="wf-1", agent_type="writer", tier=tier, provider="openai",
        model="gpt-4o-mini", attempt=1, input_tokens=10, output_tokens=20, cost_usd=0.0015,
    )
    return Outgoing(TOPOLOGY.costs.name, b"wf-1", encode(event))


def _dead_letter(code: str = "provider_error", big: bool = False) -> Outgoing:
    source = Source(SOURCE.topic, 0, 1, b"k", b"x" * (500_000 if big else 10))
    return DeadLetters(TOPOLOGY.dead_letters.name, "t").letter(source, code, "boom")  # type: ignore[arg-type]


def test_tier_result_and_cost_are_recorded(metrics: Metrics) -> None:
    observer = OutgoingObserver(TOPOLOGY, metrics)
    observer.observe_outgoing("tier-nano", [_result(latency_ms=250.0), _cost()])
    reg = metrics.registry
    assert _value(reg, "tierstream_requests_processed_total", role="tier-nano", tier="nano", status="ok") == 1
    assert _value(reg, "tierstream_model_call_duration_seconds_count", tier="nano", provider="openai") == 1
    assert _value(reg, "tierstream_model_call_duration_seconds_sum", tier="nano", provider="openai") == pytest.approx(0.25)
    assert _value(reg, "tierstream_tokens_total", tier="nano", provider="openai", direction="input") == 10
    assert _value(reg, "tierstream_tokens_total", tier="nano", provider="openai", direction="output") == 20
    assert _value(reg, "tierstream_cost_usd_total", tier="nano", provider="openai") == pytest.approx(0.0015)


def test_classifier_routing_counts_the_tier_from_the_topic_alone(metrics: Metrics) -> None:
    observer = OutgoingObserver(TOPOLOGY, metrics)
    # The value is not JSON: the classifier path must not parse it.
    routed = Outgoing(TOPOLOGY.tiers[Tier.PREMIUM].name, b"wf-1", b"not json")
    observer.observe_outgoing("classifier", [routed, routed])
    reg = metrics.registry
    assert _value(reg, "tierstream_classifier_decisions_total", tier="premium") == 2
    assert _value(reg, "tierstream_requests_processed_total", role="classifier", tier="premium", status="ok") == 2


def test_dead_letters_by_code_and_role(metrics: Metrics) -> None:
    observer = OutgoingObserver(TOPOLOGY, metrics)
    observer.observe_outgoing("classifier", [_dead_letter("invalid_json")])
    observer.observe_outgoing("tier-premium", [_dead_letter("provider_error", big=True)])
    reg = metrics.registry
    assert _value(reg, "tierstream_dead_letters_total", role="classifier", code="invalid_json") == 1
    assert _value(reg, "tierstream_dead_letters_total", role="tier-premium", code="provider_error") == 1
    assert _value(reg, "tierstream_requests_processed_total", role="classifier", tier="unclassified", status="dead_letter") == 1
    assert _value(reg, "tierstream_requests_processed_total", role="tier-premium", tier="premium", status="dead_letter") == 1


def test_dead_letter_code_reads_the_head_and_bounds_the_label() -> None:
    assert dead_letter_code(_dead_letter("too_large", big=True).value) == "too_large"
    assert dead_letter_code(b'{"reason": "x", "code": "made_up"}') == "other"
    assert dead_letter_code(b'{"pad": "' + b"y" * 400 + b'", "code": "schema_invalid"}') == "schema_invalid"


def test_a_malformed_message_is_skipped_not_raised(metrics: Metrics) -> None:
    observer = OutgoingObserver(TOPOLOGY, metrics)
    observer.observe_outgoing("tier-nano", [Outgoing(TOPOLOGY.results.name, None, b"{bad"), _cost()])
    assert _value(metrics.registry, "tierstream_cost_usd_total", tier="nano", provider="openai") > 0


def test_in_flight_gauge_returns_to_zero_on_error(metrics: Metrics) -> None:
    reg = metrics.registry
    with metrics.track_in_flight("tier-nano"):
        assert _value(reg, "tierstream_calls_in_flight", role="tier-nano") == 1
    with pytest.raises(RuntimeError), metrics.track_in_flight("tier-nano"):
        raise RuntimeError("handler failed")
    assert _value(reg, "tierstream_calls_in_flight", role="tier-nano") == 0


POOL_CONFIG = {"min_size": 1, "max_calls_per_client": 256, "recycle_after": 1000, "idle_timeout": 30.0}


def test_pool_stats_are_read_at_scrape_time(metrics: Metrics) -> None:
    stats = [PoolStats("openai", size=1, in_use=0, max_size=2, total_calls=0, created=1, retired=0, **POOL_CONFIG)]
    metrics.pools.watch(lambda: stats)
    assert _value(metrics.registry, "tierstream_client_pool_size", provider="openai") == 1
    stats[0] = PoolStats("openai", size=2, in_use=3, max_size=2, total_calls=9, created=2, retired=0, **POOL_CONFIG)
    assert _value(metrics.registry, "tierstream_client_pool_size", provider="openai") == 2
    assert _value(metrics.registry, "tierstream_client_pool_in_use", provider="openai") == 3
    assert _value(metrics.registry, "tierstream_client_pool_recycle_after_calls", provider="openai") == 1000
    assert _value(metrics.registry, "tierstream_client_pool_idle_timeout_seconds", provider="openai") == 30


def test_supervisor_gives_each_child_its_own_health_port() -> None:
    assert role_env({"A": "1"}, 8080, 0) == {"A": "1", HEALTH_PORT_ENV: "8080"}
    assert role_env({}, 8080, 3)[HEALTH_PORT_ENV] == "8083"
    assert HEALTH_PORT_ENV not in role_env({}, 0, 2)  # 0: every child picks a free port
    # The variable name is one the configuration loader reads.
    assert load_settings(environ={HEALTH_PORT_ENV: "9001"}).worker.health_port == 9001


class FakeConsumer:
    def __init__(self) -> None:
        self.partitions: set[tuple[str, int]] = set()

    def assigned(self) -> set[tuple[str, int]]:
        return self.partitions


async def _wait_status(http: aiohttp.ClientSession, url: str, want: int, timeout: float = 10.0) -> str:
    """Poll until ``url`` answers ``want``, and return the body; fail with the last answer at the deadline."""

    async def answer() -> tuple[int, str]:
        async with http.get(url) as resp:
            return resp.status, await resp.text()

    _, body = await wait_until(answer, timeout, f"{url} to answer {want}", accept=lambda a: a[0] == want, interval=0.02)
    return body


async def test_health_server_endpoints(metrics: Metrics) -> None:
    metrics.record_classified("classifier", "nano")
    consumer = FakeConsumer()
    server = HealthServer(consumer, port=0, host="127.0.0.1", registry=metrics.registry)
    await server.start()
    try:
        assert server.bound_port
        base = f"http://127.0.0.1:{server.bound_port}"
        async with aiohttp.ClientSession() as http:
            await _wait_status(http, f"{base}/health", 200)
            async with http.get(f"{base}/ready") as resp:
                assert resp.status == 503
                assert "no partitions assigned" in (await resp.json())["reason"]
            consumer.partitions.add(("agent.requests", 0))
            await _wait_status(http, f"{base}/ready", 200)
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                text = await resp.text()
        for name in (
            "tierstream_requests_processed_total",
            "tierstream_classifier_decisions_total",
            "tierstream_model_call_duration_seconds",
            "tierstream_tokens_total",
            "tierstream_cost_usd_total",
            "tierstream_dead_letters_total",
            "tierstream_calls_in_flight",
            "tierstream_client_pool_size",
        ):
            assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert 'tierstream_classifier_decisions_total{tier="nano"} 1.0' in text
    finally:
        await server.stop()


async def test_ready_is_503_while_the_consumer_has_not_started(metrics: Metrics) -> None:
    class NotStarted:
        def assigned(self) -> set[tuple[str, int]]:
            raise RuntimeError("ConsumerNotStarted")

    server = HealthServer(NotStarted(), port=0, host="127.0.0.1", registry=metrics.registry)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            body = await _wait_status(http, f"http://127.0.0.1:{server.bound_port}/ready", 503)
        assert "consumer not started" in body
    finally:
        await server.stop()


async def test_a_busy_port_does_not_stop_the_worker(metrics: Metrics) -> None:
    first = HealthServer(FakeConsumer(), port=0, host="127.0.0.1", registry=metrics.registry)
    await first.start()
    try:
        second = HealthServer(FakeConsumer(), port=first.bound_port or 0, host="127.0.0.1", registry=metrics.registry)
        await second.start()
        assert second.bound_port is None
        await second.stop()
    finally:
        await first.stop()


def test_pool_counters_are_read_at_scrape_time(metrics: Metrics) -> None:
    stats = [PoolStats("anthropic", size=1, in_use=0, max_size=2, total_calls=7, created=3, retired=2, **POOL_CONFIG)]
    metrics.pools.watch(lambda: stats)
    reg = metrics.registry
    assert _value(reg, "tierstream_client_pool_calls_total", provider="anthropic") == 7
    assert _value(reg, "tierstream_client_pool_clients_created_total", provider="anthropic") == 3
    assert _value(reg, "tierstream_client_pool_clients_retired_total", provider="anthropic") == 2


def _view(hour_usd: str = "1.0", alert_usd: str = "0.5") -> GuardrailView:
    settings = load_settings(environ={
        "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": hour_usd,
        "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": alert_usd,
        "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD": "0.25",
    })
    return GuardrailView(settings)


def test_guardrail_gauges_follow_the_view(metrics: Metrics) -> None:
    reg = metrics.registry
    assert _value(reg, "tierstream_guardrail_paused") == 0  # nothing watched: no series
    assert reg.get_sample_value("tierstream_guardrail_paused") is None
    view = _view()
    metrics.guardrails.watch(view)
    assert _value(reg, "tierstream_guardrail_hour_limit_usd") == 1.0
    assert _value(reg, "tierstream_guardrail_alert_threshold_usd") == 0.5
    assert _value(reg, "tierstream_guardrail_workflow_limit_usd") == 0.25
    assert reg.get_sample_value("tierstream_guardrail_paused") == 0
    assert reg.get_sample_value("tierstream_guardrail_state_caught_up") == 0
    spend(view, "global", 0.4, partition=0)
    spend(view, "global", 0.2, partition=3)
    spend(view, "tier:premium", 0.6)
    spend(view, "wf-a", 0.3)
    spend(view, "wf-b", 0.1)
    assert _value(reg, "tierstream_guardrail_hour_spend_usd", scope="global") == pytest.approx(0.6)
    assert _value(reg, "tierstream_guardrail_hour_spend_usd", scope="premium") == pytest.approx(0.6)
    assert reg.get_sample_value("tierstream_guardrail_hour_spend_usd", {"scope": "nano"}) == 0
    assert _value(reg, "tierstream_guardrail_alerting") == 1
    assert _value(reg, "tierstream_guardrail_paused") == 0
    assert _value(reg, "tierstream_guardrail_blocked_workflows") == 1
    spend(view, "global", 0.5, partition=4)
    assert _value(reg, "tierstream_guardrail_paused") == 1
    report = view.summary()
    assert report["paused"] is True and report["hour_spent_usd"] == pytest.approx(1.1)


def test_consumer_lag_per_topic_from_highwater_and_committed_offsets(metrics: Metrics) -> None:
    a0, a1, b0 = TP("agent.requests.nano", 0), TP("agent.requests.nano", 1), TP("agent.costs", 0)
    consumer = FakeLagConsumer({a0: 10, a1: 5, b0: None}, {a0: 4, a1: None})
    metrics.consumers.watch(consumer)
    reg = metrics.registry
    # partition 0: 10 - 4; partition 1: nothing committed yet, 5 - 0; b0: not fetched yet
    assert reg.get_sample_value("tierstream_consumer_lag_messages", {"topic": "agent.requests.nano"}) == 11
    assert reg.get_sample_value("tierstream_consumer_lag_messages", {"topic": "agent.costs"}) == 0
    assert reg.get_sample_value("tierstream_consumer_assigned_partitions", {"topic": "agent.requests.nano"}) == 2
    consumer._committed_offset[a0] = 10
    consumer._committed_offset[a1] = 5
    assert reg.get_sample_value("tierstream_consumer_lag_messages", {"topic": "agent.requests.nano"}) == 0


def test_a_failing_source_leaves_its_samples_out_but_the_scrape_succeeds(metrics: Metrics) -> None:
    class Broken(FakeLagConsumer):
        def assigned(self) -> set[tuple[str, int]]:
            raise RuntimeError("ConsumerNotStarted")

    metrics.consumers.watch(Broken({}, {}))
    metrics.record_classified("classifier", "nano")
    text = generate_latest(metrics.registry).decode()
    assert "tierstream_consumer_lag_messages{" not in text
    assert 'tierstream_classifier_decisions_total{tier="nano"} 1.0' in text


async def test_ready_needs_every_check_and_reports_do_not_decide(metrics: Metrics) -> None:
    problems = {"providers": "providers not answering: openai: ClientConnectorError"}
    report = {"paused": False}
    consumer = FakeConsumer()
    consumer.partitions.add(("agent.requests.nano", 0))
    server = HealthServer(
        consumer, port=0, host="127.0.0.1", registry=metrics.registry,
        checks={"providers": lambda: problems.get("providers")},
        reports={"guardrails": lambda: dict(report)},
    )
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.bound_port}/ready"
        async with aiohttp.ClientSession() as http:
            body = json.loads(await _wait_status(http, url, 503))
            assert body["reasons"] == [problems["providers"]]
            assert body["guardrails"] == {"paused": False}
            problems.clear()
            report["paused"] = True
            body = json.loads(await _wait_status(http, url, 200))
            assert body["status"] == "ready" and body["guardrails"] == {"paused": True}
            consumer.partitions.clear()
            problems["providers"] = "providers not answering: x"
            body = json.loads(await _wait_status(http, url, 503))
            assert body["reasons"] == ["no partitions assigned yet", "providers not answering: x"]
    finally:
        await server.stop()
