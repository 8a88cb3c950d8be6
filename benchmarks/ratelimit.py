"""Rate-limit benchmark: how much of a provider limit N tier worker replicas use, and how
many requests they send over it, with tierstream's cluster-wide limiter and, in the same
run, a naive per-process one.

``python -m benchmarks.ratelimit --replicas 1,2,4 --steady-seconds 60`` (or ``tierstream
bench-ratelimit ...``). For each replica count and each limiter (``partitions``: shares
that follow partition assignment; ``process``: every replica enforces the whole limit):

1. the provider simulator as a subprocess with its server-side limits on (``--rpm``,
   ``--tpm``: an exact sliding 60 s window that answers 429 above the limit);
2. an isolated topology on the broker (``$KAFKA_BOOTSTRAP_SERVERS``, else a local KRaft
   broker on free ports for the whole run), a backlog of ``researcher`` requests written
   straight to the premium tier topic, spread evenly over its partitions, and the
   researcher limit (``rate_limits.researcher``, tiers [premium]) equal to the simulator's;
3. N ``worker --roles tier:premium`` processes; wait until their group is Stable with N
   members and (cluster limiter) their shares add up to 1;
4. over ``--steady-seconds``: requests (and tokens) the simulator answered 200 per
   minute, as a fraction of the limit (utilisation); then over the whole run the 429s
   the simulator gave for going over its limit, and its peak count in any 60 s window.

The same :func:`run_scenario` is what ``tests/test_ratelimit_e2e.py`` asserts on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import orjson
from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from benchmarks.harness import RESULTS_DIR, machine_info
from schemas.models import Tier, TieredRequest
from streams import processes
from streams.admin import ensure_topics, wait_for_roles
from streams.broker import LocalBroker, free_ports
from streams.kafka_security import aiokafka_kwargs
from topologies.config import Settings, load_settings
from topologies.topics import topology_of

Sharing = Literal["partitions", "process"]
AGENT_TYPE = "researcher"
_SHARE_RE = re.compile(r'^tierstream_ratelimit_share\{agent_type="researcher".*\} (\S+)$', re.M)


@dataclass(frozen=True)
class Scenario:
    replicas: int
    sharing: Sharing = "partitions"
    requests_per_minute: int = 600
    tokens_per_minute: int = 10_000_000
    burst: int = 10
    sim_rpm: int | None = 600
    sim_tpm: int | None = None
    steady_seconds: float = 40.0
    max_output_tokens: int = 16
    task_chars: int = 120
    latency_ms: float = 20.0
    backlog: int | None = None  # default: twice what the run can send
    ready_timeout: float = 180.0


@dataclass
class Outcome:
    scenario: Scenario
    produced: int
    steady_seconds: float
    ok_per_minute: float
    tokens_per_minute: float
    request_utilisation: float
    token_utilisation: float
    over_limit_429: int
    other_429: int
    peak_requests_in_60s: int
    peak_tokens_in_60s: int
    sim_requests_total: int
    worker_rss_mb: list[float]
    unanswered_at_end: int


def _request(n: int, scenario: Scenario) -> TieredRequest:
    filler = "Summarise the findings on vector search and their trade-offs. "
    task = (f"Request {n}. " + filler * (scenario.task_chars // len(filler) + 1))[: scenario.task_chars]
    return TieredRequest(
        request_id=f"rl-{n}", workflow_id=f"wf-{n % 97}", agent_type=AGENT_TYPE, task=task,
        max_output_tokens=scenario.max_output_tokens, tier=Tier.PREMIUM, routed_by="hint",
    )


async def produce_backlog(settings: Settings, scenario: Scenario, count: int) -> None:
    """Write ``count`` requests round-robin over the premium partitions (an even load:
    the shares follow partitions, so the benchmark measures the limiter, not the keys)."""
    spec = topology_of(settings).tiers[Tier.PREMIUM]
    producer = AIOKafkaProducer(acks="all", linger_ms=20, **aiokafka_kwargs(settings.kafka))
    await producer.start()
    try:
        futures = []
        for n in range(count):
            request = _request(n, scenario)
            value = orjson.dumps(request.model_dump(mode="json"))
            futures.append(await producer.send(spec.name, value, key=request.workflow_id.encode(), partition=n % spec.partitions))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def sim_stats(port: int) -> dict:
    return orjson.loads(_get(f"http://127.0.0.1:{port}/stats"))


def _shares(ports: list[int]) -> list[float]:
    shares = []
    for port in ports:
        try:
            match = _SHARE_RE.search(_get(f"http://127.0.0.1:{port}/metrics").decode())
        except OSError:
            match = None
        shares.append(float(match.group(1)) if match else 0.0)
    return shares


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _ok(stats: dict) -> int:
    return int(stats["by_status"].get("200", 0))


def _backlog_size(s: Scenario) -> int:
    per_request = s.task_chars // 3 + 24 + s.max_output_tokens
    per_minute = min(s.requests_per_minute, s.tokens_per_minute / per_request)
    if s.sharing == "process":
        per_minute *= s.replicas
    return int(2 * per_minute * (s.steady_seconds + 90) / 60) + 100


def run_scenario(bootstrap: str, scenario: Scenario, run_dir: Path) -> Outcome:
    """Run one scenario end to end (see the module docstring); every process is stopped."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sim_port, *health = free_ports(1 + scenario.replicas)
    sim_args = ["provider-sim", "--port", str(sim_port), "--latency-ms", str(scenario.latency_ms)]
    sim_args += ["--rpm", str(scenario.sim_rpm)] if scenario.sim_rpm else []
    sim_args += ["--tpm", str(scenario.sim_tpm)] if scenario.sim_tpm else []
    run = uuid.uuid4().hex[:10]
    limit = f"TIERSTREAM__RATE_LIMITS__{AGENT_TYPE.upper()}__"
    env = {
        "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "TIERSTREAM__KAFKA__TOPIC_PREFIX": f"rl{run}",
        "TIERSTREAM__APP_ID": f"rl-{run}",
        **processes.simulator_env(sim_port),
        "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": "100000",
        "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": "100000",
        "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD": "100000",
        "TIERSTREAM__WORKER__RATE_LIMIT_SHARING": scenario.sharing,
        limit + "REQUESTS_PER_MINUTE": str(scenario.requests_per_minute),
        limit + "TOKENS_PER_MINUTE": str(scenario.tokens_per_minute),
        limit + "BURST": str(scenario.burst),
        limit + "TIERS": "[premium]",
    }
    settings = load_settings(environ={**os.environ, **env})
    produced = scenario.backlog if scenario.backlog is not None else _backlog_size(scenario)
    with contextlib.ExitStack() as cleanup:
        sim = processes.spawn(sim_args, log_path=run_dir / "simulator.log")
        cleanup.callback(processes.stop, sim)
        processes.wait_http_ok(f"http://127.0.0.1:{sim_port}/health", 30, sim)
        asyncio.run(ensure_topics(settings))
        asyncio.run(produce_backlog(settings, scenario, produced))
        workers = [
            processes.spawn(
                ["worker", "--roles", "tier:premium"], {**env, "TIERSTREAM__WORKER__HEALTH_PORT": str(port)},
                run_dir / f"worker-{i}.log",
            )
            for i, port in enumerate(health)
        ]
        # The cost role grants the budget leases every model call is made under.
        cost = processes.spawn(["worker", "--roles", "cost"], env, run_dir / "worker-cost.log")
        cleanup.callback(processes.stop, cost)
        for worker in workers:
            cleanup.callback(processes.stop, worker)

        def check_alive() -> None:
            dead = [i for i, w in enumerate(workers) if w.poll() is not None]
            if dead:
                raise RuntimeError(f"worker(s) {dead} exited early; logs in {run_dir}")

        asyncio.run(wait_for_roles(settings, ["tier-premium"], scenario.ready_timeout, members=scenario.replicas))
        deadline = time.monotonic() + scenario.ready_timeout
        expected = 1.0 if scenario.sharing == "partitions" else float(scenario.replicas)
        while abs(sum(shares := _shares(health)) - expected) > 1e-6 or min(shares) <= 0:
            check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"rate-limit shares never settled: {shares}; logs in {run_dir}")
            time.sleep(0.25)
        before, t1 = sim_stats(sim_port), time.monotonic()
        end = t1 + scenario.steady_seconds
        while (now := time.monotonic()) < end:  # a measurement window: its length is the point
            check_alive()
            time.sleep(min(0.5, end - now))
        after, t2 = sim_stats(sim_port), time.monotonic()
        if _shares(health) != shares:
            raise RuntimeError(f"a rebalance during the measurement: {shares} -> {_shares(health)}")
        rss = [round(_rss_mb(w.pid), 1) for w in workers]
    elapsed = t2 - t1
    ok = _ok(after) - _ok(before)
    tokens = (after["input_tokens"] - before["input_tokens"]) + ok * scenario.max_output_tokens
    window = (after.get("windows", {}).get("openai") or {}).get(settings.tiers[Tier.PREMIUM].model, {})
    total_429 = int(after["by_status"].get("429", 0))
    return Outcome(
        scenario=scenario,
        produced=produced,
        steady_seconds=round(elapsed, 2),
        ok_per_minute=round(ok / elapsed * 60, 1),
        tokens_per_minute=round(tokens / elapsed * 60, 1),
        request_utilisation=round(ok / elapsed * 60 / scenario.requests_per_minute, 4),
        token_utilisation=round(tokens / elapsed * 60 / scenario.tokens_per_minute, 4),
        over_limit_429=int(after["rate_limited"]),
        other_429=total_429 - int(after["rate_limited"]),
        peak_requests_in_60s=int(window.get("max_requests_in_window", 0)),
        peak_tokens_in_60s=int(window.get("max_tokens_in_window", 0)),
        sim_requests_total=int(after["requests_total"]),
        worker_rss_mb=rss,
        unanswered_at_end=produced - _ok(after),
    )


def print_table(console: Console, outcomes: list[Outcome]) -> None:
    table = Table(title="Rate limit: utilisation and over-limit requests")
    for col in ("replicas", "limiter", "limit/min", "sent ok/min", "utilisation", "429 over limit", "peak in 60 s"):
        table.add_column(col, justify="right")
    for o in outcomes:
        s = o.scenario
        name = "cluster (partitions)" if s.sharing == "partitions" else "naive (per process)"
        table.add_row(
            str(s.replicas), name, str(s.requests_per_minute), f"{o.ok_per_minute:.0f}",
            f"{o.request_utilisation:.1%}", str(o.over_limit_429), str(o.peak_requests_in_60s),
        )
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.ratelimit", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", default="1,2,4", help="comma-separated tier worker counts")
    p.add_argument("--limiters", default="partitions,process", help="partitions (cluster-wide), process (naive)")
    p.add_argument("--rpm", type=int, default=600, help="the limit, in tierstream and in the simulator")
    p.add_argument("--burst", type=int, default=10)
    p.add_argument("--steady-seconds", type=float, default=60.0)
    p.add_argument("--backlog", type=int, default=None, help="requests produced per run (default: enough)")
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"tierstream-bench-ratelimit-{uuid.uuid4().hex[:6]}"
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as cleanup:
        if external:
            bootstrap = external
        else:
            broker = LocalBroker.on_free_ports(data_dir=logs / "kafka")
            cleanup.callback(broker.stop)
            bootstrap = broker.start(timeout=120)
        for replicas in [int(r) for r in args.replicas.split(",")]:
            for sharing in args.limiters.split(","):
                scenario = Scenario(
                    replicas, sharing, requests_per_minute=args.rpm, burst=args.burst, sim_rpm=args.rpm,  # type: ignore[arg-type]
                    steady_seconds=args.steady_seconds, backlog=args.backlog,
                )
                console.print(f"running {replicas} replica(s), {sharing} limiter ...")
                outcomes.append(run_scenario(bootstrap, scenario, logs / f"{sharing}-{replicas}"))
    print_table(console, outcomes)
    report = {
        "started": datetime.now(UTC).isoformat(),
        "command": "python -m benchmarks.ratelimit " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine_info(bool(external)), "loadavg_1_5_15_at_end": os.getloadavg()},
        "outcomes": [asdict(o) for o in outcomes],
        "logs": str(logs),
    }
    output = args.output or RESULTS_DIR / f"ratelimit-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"report: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
