"""The official SDKs' own memory per call in flight: the floor under every pipeline's figure.

``python -m benchmarks.sdk_memory --calls N`` starts a provider simulator that holds every
call for minutes (median latency 600 s), then, in this process and with no Kafka at all,
opens N calls through :class:`streams.providers.ProviderRegistry` (the client pools and
official SDKs a tier worker uses, configured like a worker from ``TIERSTREAM__*``), one
per request of the benchmark workload, each to its tier's provider and model. Once the
simulator counts N calls in flight, this process's RSS growth since before the first call,
divided by N, is the SDKs' memory per in-flight call. It prints one JSON object.

The harness runs it for scenario 2 (``sdk_alone`` in the report), so a pipeline's KB per
in-flight call can be read against what the SDK calls alone take.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from benchmarks.procstats import status_kb
from streams import processes
from streams.broker import free_ports
from streams.providers import ProviderRegistry
from streams.routing.rules import rules_tier
from streams.workload import sample_requests
from topologies.config import load_settings

HOLD_LATENCY_MS = 600_000.0  # simulator median; its log-normal tail below 60 s is negligible


def rss_kb() -> int:
    rss = status_kb(os.getpid(), "VmRSS")
    if rss is None:
        raise RuntimeError("no VmRSS in /proc/self/status")
    return rss


async def simulator_in_flight(http: httpx.AsyncClient, url: str) -> int:
    """The simulator's count of calls open now (0 while this busy loop cannot reach it)."""
    try:
        return int((await http.get(f"{url}/stats")).json()["in_flight"])
    except httpx.TransportError:  # a loop opening thousands of calls can be slow to connect
        return 0


async def measure(calls: int, sim_url: str, timeout: float) -> dict[str, object]:
    settings = load_settings()
    registry = ProviderRegistry(settings)
    requests = list(sample_requests(calls, run_id="sdk-memory"))
    routes = [
        settings.tiers[rules_tier(r.prompt_text(), settings.classifier.rules)] for r in requests
    ]
    await registry.start()
    async with httpx.AsyncClient(timeout=10) as http:
        gc.collect()
        rss_start = rss_kb()
        tasks = [
            asyncio.create_task(
                registry.complete(route.provider, route.model, request.chat(), request.max_output_tokens)
            )
            for request, route in zip(requests, routes, strict=True)
        ]
        deadline = time.monotonic() + timeout
        in_flight = await simulator_in_flight(http, sim_url)
        while in_flight < calls and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # poll interval; the deadline bounds the wait
            in_flight = await simulator_in_flight(http, sim_url)
        rss_peak = rss_kb()
        finished_early = sum(task.done() for task in tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await registry.close()
    return {
        "calls": calls,
        "in_flight_seen": in_flight,
        "finished_early": finished_early,
        "providers": sorted({route.provider for route in routes}),
        "rss_start_mb": round(rss_start / 1024, 1),
        "rss_in_flight_mb": round(rss_peak / 1024, 1),
        "kb_per_in_flight_call": round((rss_peak - rss_start) / max(1, in_flight), 2),
        "basis": "RSS growth of one process making the calls through ProviderRegistry "
                 "(official SDKs, no Kafka), over the calls the simulator held at once",
    }


def run(calls: int, timeout: float = 120.0) -> dict[str, object]:
    """Start a holding simulator, measure in a child process (a clean RSS), stop it."""
    (port,) = free_ports(1)
    logs = Path(tempfile.mkdtemp(prefix="tierstream-sdk-memory-"))
    sim = processes.spawn(
        ["provider-sim", "--port", str(port), "--latency-ms", str(HOLD_LATENCY_MS)],
        log_path=logs / "simulator.log",
    )
    try:
        processes.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, sim)
        env = {
            **os.environ,
            **processes.simulator_env(port),
            "MAX_CONCURRENT_TASKS": str(calls),  # the pools grow to it, as a tier worker's do
        }
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.sdk_memory", "--calls", str(calls),
             "--timeout", str(timeout), "--child", "--simulator-port", str(port)],
            env=env, capture_output=True, timeout=timeout + 120, check=False,
        )
        (logs / "measure.log").write_bytes(child.stderr)
        if child.returncode != 0:
            raise RuntimeError(f"sdk_memory exited {child.returncode}; log: {logs / 'measure.log'}")
        return orjson.loads(child.stdout.strip().splitlines()[-1])
    finally:
        processes.stop(sim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sdk_memory", description=__doc__)
    parser.add_argument("--calls", type=int, default=1000, help="calls to hold in flight at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for them all to open")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--simulator-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    if args.child:
        sim_url = f"http://127.0.0.1:{args.simulator_port}"
        print(orjson.dumps(asyncio.run(measure(args.calls, sim_url, args.timeout))).decode(), flush=True)
    else:
        print(orjson.dumps(run(args.calls, args.timeout), option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
