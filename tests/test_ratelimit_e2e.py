"""Cluster-wide rate limits and provider faults, against the real broker and the provider
simulator with its server-side limits on (an exact sliding 60 s window, 429 above it).

The steady-state window of the shared-limit tests is ``RATELIMIT_STEADY_SECONDS`` (default
35 s, in ``make test``); the ``slow`` versions measure two minutes (``make test-slow``).
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import orjson
import pytest

from benchmarks.ratelimit import Outcome, Scenario, run_scenario, sim_stats
from schemas.models import Tier, TieredRequest
from streams import processes
from streams.admin import wait_for_roles
from streams.broker import free_ports
from tests.support import collect, new_pipeline, produce_raw

pytestmark = pytest.mark.e2e

STEADY = float(os.environ.get("RATELIMIT_STEADY_SECONDS", "35"))
LONG = 120.0


def requests_scenario(steady: float) -> Scenario:
    # burst 10 of 600: the cluster sends at most 10 + 590 in any 60 s window
    return Scenario(replicas=3, requests_per_minute=600, burst=10, sim_rpm=600, steady_seconds=steady)


def tokens_scenario(steady: float) -> Scenario:
    # ~250-token requests (input + max_output_tokens 200): tokens bind, requests do not
    return Scenario(
        replicas=3, requests_per_minute=600, tokens_per_minute=60_000, burst=20, sim_rpm=None,
        sim_tpm=60_000, max_output_tokens=200, task_chars=200, steady_seconds=steady,
    )


def report(outcome: Outcome) -> None:
    print(
        f"\n{outcome.scenario.replicas} workers, {outcome.steady_seconds:.0f} s steady: "
        f"{outcome.ok_per_minute:.0f} req/min ({outcome.request_utilisation:.1%}), "
        f"{outcome.tokens_per_minute:.0f} tok/min ({outcome.token_utilisation:.1%}), "
        f"over-limit 429s {outcome.over_limit_429}, peak in 60 s: {outcome.peak_requests_in_60s} req, "
        f"{outcome.peak_tokens_in_60s} tok; RSS MB {outcome.worker_rss_mb}"
    )


def check_requests(outcome: Outcome) -> None:
    report(outcome)
    assert outcome.over_limit_429 == 0
    assert outcome.peak_requests_in_60s <= 600
    assert outcome.request_utilisation >= 0.90


def check_tokens(outcome: Outcome) -> None:
    report(outcome)
    assert outcome.over_limit_429 == 0
    assert outcome.peak_tokens_in_60s <= 60_000
    assert outcome.token_utilisation >= 0.90


@pytest.mark.timeout(420)
def test_three_workers_share_a_requests_per_minute_limit(kafka_bootstrap: str, tmp_path: Path) -> None:
    check_requests(run_scenario(kafka_bootstrap, requests_scenario(STEADY), tmp_path))


@pytest.mark.timeout(420)
def test_three_workers_share_a_tokens_per_minute_limit(kafka_bootstrap: str, tmp_path: Path) -> None:
    check_tokens(run_scenario(kafka_bootstrap, tokens_scenario(STEADY), tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_workers_share_a_requests_per_minute_limit_two_minutes(kafka_bootstrap: str, tmp_path: Path) -> None:
    check_requests(run_scenario(kafka_bootstrap, requests_scenario(LONG), tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_workers_share_a_tokens_per_minute_limit_two_minutes(kafka_bootstrap: str, tmp_path: Path) -> None:
    check_tokens(run_scenario(kafka_bootstrap, tokens_scenario(LONG), tmp_path))


BACKLOG = int(os.environ.get("RATELIMIT_BACKLOG", "20000"))


@pytest.mark.timeout(420)
def test_memory_stays_bounded_while_the_limiter_holds_a_backlog(kafka_bootstrap: str, tmp_path: Path) -> None:
    """60 requests/min against a backlog of BACKLOG: the worker holds at most its
    in-flight calls and Faust's fetch buffer, the rest waits in Kafka. (100,000 by hand:
    ``RATELIMIT_BACKLOG=100000 pytest -s -k memory tests/test_ratelimit_e2e.py``.)"""
    outcome = run_scenario(
        kafka_bootstrap,
        Scenario(replicas=1, requests_per_minute=60, burst=5, sim_rpm=60, steady_seconds=15, backlog=BACKLOG),
        tmp_path,
    )
    report(outcome)
    assert outcome.over_limit_429 == 0
    assert outcome.unanswered_at_end >= BACKLOG - 60  # the limiter held nearly all of it
    assert max(outcome.worker_rss_mb) < 400


@pytest.mark.timeout(420)
async def test_every_request_ends_as_a_result_or_a_dead_letter_under_faults(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """10 % 500s, 5 % hangs longer than the call timeout, a 1 s burst of 429s every 6 s."""
    (port,) = free_ports(1)
    sim = processes.spawn(
        ["provider-sim", "--port", str(port), "--latency-ms", "10", "--error-rate", "0.1",
         "--timeout-rate", "0.05", "--hang-seconds", "5", "--burst-429-every", "6",
         "--burst-429-seconds", "1", "--retry-after", "1", "--seed", "7"],
        log_path=tmp_path / "simulator.log",
    )
    pipeline = new_pipeline(
        kafka_bootstrap, port, tmp_path,
        TIERSTREAM__PROVIDERS__OPENAI__TIMEOUT_SECONDS="1",
        TIERSTREAM__PROVIDERS__OPENAI__MAX_RETRIES="2",
        TIERSTREAM__PROVIDERS__OPENAI__RETRY_INITIAL_SECONDS="0.05",
        TIERSTREAM__PROVIDERS__OPENAI__RETRY_MAX_SECONDS="0.5",
        TIERSTREAM__RATE_LIMITS="{researcher: {requests_per_minute: 600, tokens_per_minute: 1000000, burst: 50, tiers: [premium]}}",
        # each burst cuts the rate once; recovering within seconds keeps the test short
        TIERSTREAM__PROVIDERS__OPENAI__RATE_LIMIT_RECOVERY_SECONDS="3",
    )
    try:
        processes.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, sim)
        count = 300
        requests = [
            TieredRequest(request_id=f"f-{n}", workflow_id=f"wf-{n % 20}", agent_type="researcher",
                          task=f"Question {n}", max_output_tokens=16, tier=Tier.PREMIUM, routed_by="hint")
            for n in range(count)
        ]
        sent = {r.request_id: orjson.dumps(r.model_dump(mode="json")) for r in requests}
        await pipeline.start_workers("tier:premium", "tier:premium", "cost")  # cost: budget leases
        # Both members first: a rebalance mid-run may answer a request twice (at least
        # once), which would blur "counts add up".
        await wait_for_roles(pipeline.settings, ["tier-premium"], 180, members=2)
        await produce_raw(
            kafka_bootstrap, pipeline.topology.tiers[Tier.PREMIUM].name,
            [(r.workflow_id.encode(), sent[r.request_id]) for r in requests],
        )
        seen = await collect(pipeline, count, timeout=300)
        stats = await asyncio.to_thread(sim_stats, port)
    finally:
        pipeline.stop_workers()
        processes.stop(sim)
    results = {r["request_id"]: r for r in seen.results}
    letters = {d["request_id"]: d for d in seen.dead_letters}
    print(f"\nresults {len(results)}, dead letters {len(letters)}, simulator {stats['by_status']}, "
          f"injected 500s {stats['errors_injected']}, hangs {stats['timeouts_injected']}, burst 429s {stats['bursts_429']}")
    assert not set(results) & set(letters)
    assert len(results) + len(letters) == count and set(results) | set(letters) == set(sent)
    assert all(r["status"] == "ok" and r["attempts"] >= 1 for r in results.values())
    assert any(r["attempts"] > 1 for r in results.values())  # faults were retried, then answered
    for letter in letters.values():
        assert letter["code"] == "provider_error" and letter["reason"] and letter["attempts"] == 3
        assert base64.b64decode(letter["original_value"]) == sent[letter["request_id"]]
    assert stats["errors_injected"] > 0 and stats["timeouts_injected"] > 0 and stats["bursts_429"] > 0
