"""Graceful shutdown on a real broker: SIGTERM lets the model calls in flight finish
within ``worker.shutdown_grace_seconds``; what cannot finish is handed back, not lost."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streams import processes
from streams.broker import free_ports
from tests.support import Pipeline, collect, new_pipeline, produce_raw, read_to_end, wait_until

pytestmark = pytest.mark.e2e
REQUESTS = 20
LATENCY_MS = 3000  # long enough for every call to be in flight when the signal lands


@pytest.fixture
def slow_simulator(tmp_path: Path) -> Iterator[int]:
    (port,) = free_ports(1)
    proc = processes.spawn(
        ["provider-sim", "--port", str(port), "--latency-ms", str(LATENCY_MS)],
        log_path=tmp_path / "simulator.log",
    )
    try:
        processes.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, proc)
        yield port
    finally:
        processes.stop(proc)


def simulator_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
        return json.load(response)


async def start_and_load(pipeline: Pipeline, port: int) -> None:
    """A classifier, the cost role (it grants the budget leases calls are made under) and
    one nano worker (last: the one :func:`sigterm` stops), with every request's call in flight."""
    await pipeline.start_workers("classifier", "cost", "tier:nano")
    calls_before = simulator_stats(port)["requests_total"]
    await produce_raw(
        pipeline.settings.kafka.bootstrap_servers, pipeline.topology.requests.name,
        [(f"wf-{n % 4}".encode(), orjson.dumps({
            "request_id": f"s-{n}", "workflow_id": f"wf-{n % 4}", "agent_type": "writer",
            "task": f"Summarise chapter {n}.", "max_output_tokens": 32, "tier_hint": "nano",
        })) for n in range(REQUESTS)],
    )

    def calls_made() -> int:
        pipeline.assert_workers_alive()
        return simulator_stats(port)["requests_total"] - calls_before

    await wait_until(calls_made, 120, f"all {REQUESTS} calls to reach the simulator",
                     accept=lambda calls: calls >= REQUESTS, interval=0.1)


def sigterm(pipeline: Pipeline) -> tuple[int, float]:
    worker = pipeline.workers.pop()
    started = time.monotonic()
    code = processes.stop(worker, grace=90)
    return code, time.monotonic() - started


async def test_sigterm_lets_calls_in_flight_finish(kafka_bootstrap: str, slow_simulator: int, tmp_path: Path) -> None:
    pipeline = new_pipeline(kafka_bootstrap, slow_simulator, tmp_path)
    await start_and_load(pipeline, slow_simulator)
    calls = simulator_stats(slow_simulator)["requests_total"]
    try:
        code, took = sigterm(pipeline)
        # Every call in flight finished and was answered by the worker that made it.
        answered = await collect(pipeline, expected=REQUESTS, timeout=30, settle=0)
        print(f"SIGTERM with {REQUESTS} calls in flight: exit {code} after {took:.1f}s, "
              f"{len(answered.results)} answered before exit")
        assert code == 0
        assert sorted(r["request_id"] for r in answered.results) == sorted(f"s-{n}" for n in range(REQUESTS))
        # ... and their offsets were committed: a new worker repeats no call.
        await pipeline.start_workers("tier:nano")
        again = await collect(pipeline, expected=REQUESTS, timeout=20, settle=8)
        assert len(again.results) == REQUESTS
        assert simulator_stats(slow_simulator)["requests_total"] == calls, "a finished call was made again"
    finally:
        pipeline.stop_workers()


async def test_calls_over_the_grace_period_are_handed_back(
    kafka_bootstrap: str, slow_simulator: int, tmp_path: Path
) -> None:
    pipeline = new_pipeline(kafka_bootstrap, slow_simulator, tmp_path, TIERSTREAM__WORKER__SHUTDOWN_GRACE_SECONDS="0")
    await start_and_load(pipeline, slow_simulator)
    try:
        code, took = sigterm(pipeline)
        assert code == 0
        early = await read_to_end(pipeline, pipeline.topology.results.name)
        assert len(early) < REQUESTS, "with no grace, calls in flight cannot all have finished"
        # Their offsets were not committed: the next worker answers every request.
        await pipeline.start_workers("tier:nano")
        collected = await collect(pipeline, expected=REQUESTS, timeout=120)
        ids = {r["request_id"] for r in collected.results}
        print(f"SIGTERM, no grace: exit after {took:.1f}s, {len(early)} answered before exit, "
              f"{len(ids)} after a new worker took over")
        assert ids == {f"s-{n}" for n in range(REQUESTS)}, "a request handed back was lost"
    finally:
        pipeline.stop_workers()
