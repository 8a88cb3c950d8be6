"""/health, /ready and /metrics of real worker processes on the real broker, over HTTP.

Ready means: the consumer joined its group and holds partitions, and the providers
answer. A worker paused by the hourly limit stays ready and says it is paused; its held
requests show as consumer lag and calls in flight.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.codec import encode
from schemas.models import Tier, TieredRequest
from streams import processes
from streams.broker import free_ports
from streams.guardrails.operator import set_limit
from tests.monitoring import LOCAL_PROMTOOL
from tests.support import produce_raw, wait_until

pytestmark = pytest.mark.e2e

HEALTH_PORT = "TIERSTREAM__WORKER__HEALTH_PORT"
Answer = tuple[int, Any]


async def get(http: aiohttp.ClientSession, url: str) -> Answer:
    """(status, JSON body or text), or (0, the error) while nothing listens."""
    try:
        async with http.get(url) as resp:
            is_json = resp.content_type == "application/json"
            return resp.status, await (resp.json() if is_json else resp.text())
    except aiohttp.ClientError as exc:
        return 0, repr(exc)


async def poll(
    http: aiohttp.ClientSession, urls: list[str], until: Callable[[list[Answer]], bool], timeout: float, what: str
) -> list[Answer]:
    """Ask every url until ``until(answers)``; fail with the last answers at the deadline."""

    async def answers() -> list[Answer]:
        return [await get(http, url) for url in urls]

    return await wait_until(answers, timeout, what, accept=until)


def sample(metrics_text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def tiered(n: int) -> bytes:
    return encode(TieredRequest(
        request_id=f"held-{n}", workflow_id=f"wf-{n}", agent_type="writer", task="Say hi.",
        max_output_tokens=16, tier=Tier.NANO, routed_by="hint",
    ))


async def test_ready_follows_assignment_and_providers_and_a_pause_stays_ready(pipeline_factory, tmp_path) -> None:
    port_a, port_b, sim_port = free_ports(3)
    pipeline = pipeline_factory(
        TIERSTREAM__SIMULATOR__PORT=str(sim_port),  # nothing listens there yet
        TIERSTREAM__KAFKA__PARTITIONS__TIERS="1",  # so a second replica gets no partition
    )
    nano_topic = pipeline.topology.tiers[Tier.NANO].name
    a, b = (f"http://127.0.0.1:{p}" for p in (port_a, port_b))
    simulator = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        try:
            pipeline.env[HEALTH_PORT] = str(port_a)
            await pipeline.start_workers("tier:nano")
            await poll(http, [f"{a}/health"], lambda r: r[0][0] == 200, 120, "worker A /health")

            # Joined with its partition, but the providers do not answer: not ready, for that reason only.
            [(status, body)] = await poll(
                http, [f"{a}/ready"],
                lambda r: isinstance(r[0][1], dict) and r[0][1].get("assigned_partitions") == 1,
                120, "worker A assigned",
            )
            assert status == 503, body
            (reason,) = body["reasons"]
            assert reason.startswith("providers not answering:") and "openai" in reason, reason
            assert body["guardrails"]["paused"] is False

            simulator = processes.spawn(
                ["provider-sim", "--port", str(sim_port), "--latency-ms", "5"],
                log_path=pipeline.log_dir / "simulator.log",
            )
            [(_, body)] = await poll(http, [f"{a}/ready"], lambda r: r[0][0] == 200, 60, "worker A ready")
            assert body["status"] == "ready" and body["assigned_partitions"] == 1

            # A second replica of a one-partition topic: exactly one of the two is ready.
            pipeline.env[HEALTH_PORT] = str(port_b)
            await pipeline.start_workers("tier:nano")

            def one_ready_one_idle(answers: list[Answer]) -> bool:
                statuses = sorted(status for status, _ in answers)
                idle = [body for status, body in answers if status == 503]
                return statuses == [200, 503] and idle[0].get("reasons") == ["no partitions assigned yet"]

            answers = await poll(http, [f"{a}/ready", f"{b}/ready"], one_ready_one_idle, 120, "one replica ready")
            ready_url = [a, b][[status for status, _ in answers].index(200)]
            # The cost role grants the budget leases the held calls need once the limit is raised.
            pipeline.env[HEALTH_PORT] = "0"
            await pipeline.start_workers("cost")

            # The hourly limit is spent (an operator sets it to $0): calls are held, the
            # worker stays ready and reports the pause, here and in its metrics.
            await set_limit(pipeline.settings, "hour", 0.0, "test: pause the hour")
            [(status, body)] = await poll(
                http, [f"{ready_url}/ready"],
                lambda r: isinstance(r[0][1], dict) and r[0][1].get("guardrails", {}).get("paused") is True,
                60, "pause reported",
            )
            assert status == 200 and body["status"] == "ready", body
            assert body["guardrails"]["hour_limit_usd"] == 0.0

            held = 5
            await produce_raw(pipeline.settings.kafka.bootstrap_servers, nano_topic, [(b"k", tiered(n)) for n in range(held)])

            def held_in_flight(answers: list[Answer]) -> bool:
                text = answers[0][1]
                return (
                    sample(text, "tierstream_consumer_lag_messages", topic=nano_topic) == held
                    and sample(text, "tierstream_calls_in_flight", role="tier-nano") == held
                )

            [(_, text)] = await poll(http, [f"{ready_url}/metrics"], held_in_flight, 60, "requests held in flight")
            assert sample(text, "tierstream_guardrail_paused") == 1
            assert sample(text, "tierstream_guardrail_hour_limit_usd") == 0
            assert sample(text, "tierstream_consumer_assigned_partitions", topic=nano_topic) == 1
            assert sample(text, "tierstream_client_pool_size", provider="openai") >= 1
            assert (await get(http, f"{ready_url}/ready"))[0] == 200
            promtool = shutil.which("promtool") or (str(LOCAL_PROMTOOL) if LOCAL_PROMTOOL.is_file() else None)
            if promtool is not None:  # the real worker's output, collectors included
                check = await asyncio.create_subprocess_exec(
                    promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                )
                out, _ = await check.communicate(text.encode())
                assert check.returncode == 0, out.decode()

            # Raising the limit lets the held calls through: the lag drains.
            await set_limit(pipeline.settings, "hour", 50.0, "test: resume")

            def drained(answers: list[Answer]) -> bool:
                text = answers[0][1]
                return (
                    sample(text, "tierstream_consumer_lag_messages", topic=nano_topic) == 0
                    and sample(text, "tierstream_guardrail_paused") == 0
                    and sample(text, "tierstream_requests_processed_total", role="tier-nano", tier="nano", status="ok") == held
                )

            await poll(http, [f"{ready_url}/metrics"], drained, 60, "lag drained after the resume")
            pipeline.assert_workers_alive()
        finally:
            if simulator is not None:
                processes.stop(simulator)
