"""Admission benchmark: what the budget gate adds to a call at a given call rate.

``python -m benchmarks.admission --rate 500 --holders 3 --seconds 30``. The tier workers'
model calls take most of a 2-core machine's CPU (scenario 1 answers about 350 calls a
second here), so the gate's own cost at 500 calls/s cannot be read from a full pipeline
on this machine. This benchmark runs the gate alone, with everything it talks to real:

1. a broker (``$KAFKA_BOOTSTRAP_SERVERS``, else a local KRaft broker on free ports) and
   an isolated topology (its own topic prefix and app id);
2. the cost role (``tierstream worker --roles cost``), which grants and counts leases;
3. ``--holders`` processes, each what a tier worker's gate is: a
   :class:`~streams.guardrails.view.GuardrailView` following the spend topic, a
   :class:`~streams.guardrails.budget.BudgetGate` writing its lease records to the costs
   topic, ticking every ``TICK_SECONDS``. Each makes ``rate / holders`` calls a second,
   open loop (call *i* starts *i* / rate after the first, whether or not earlier ones
   were admitted), over the same ``--workflows`` workflows in turn. A call is: ``admit`` its worst
   case (``--worst-usd``), hold it ``--call-ms`` (the model call, not made), ``settle``
   at a quarter of the worst case, and write its cost event (naming its lease) to the
   costs topic, as a tier worker does.

Measured per call: the admission time (``admit`` returning, from the call's start), and
how many calls were admitted under an opening or refused; and per workflow, what its
calls spent over every holder (against ``--workflow-usd``). Reported: p50/p99/max of the
admission time over every holder, the achieved call rate, and the CPU seconds of the
holders, the cost role and the broker over the measured window. The first
``--warmup-s`` seconds of calls (leases and openings being granted the first time) are
made but not measured, and are reported apart.

Limits: ``--hour-usd`` and ``--workflow-usd`` default to budgets far from what the run
spends (the steady state of a pipeline within its budgets); lower them to measure
admission near a limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from benchmarks.harness import RESULTS_DIR, machine_info
from benchmarks.measure import distribution
from benchmarks.procstats import cpu_seconds
from schemas.codec import encode
from schemas.models import CostEvent, Tier
from streams import processes
from streams.admin import ensure_topics, wait_for_roles
from streams.guardrails.budget import TICK_SECONDS, BudgetExceeded, BudgetGate
from streams.guardrails.money import nanos_to_usd, usd_to_nanos
from streams.guardrails.view import GuardrailView
from streams.kafka_security import aiokafka_kwargs
from streams.runtime.worker import producer_linger_seconds
from topologies.config import Settings, load_settings
from topologies.topics import topology_of

PROVIDER, MODEL = "openai", "gpt-5-mini"


# ------------------------------------------------------------------ one holder process
async def hold(settings: Settings, args: argparse.Namespace) -> dict[str, object]:
    """Make this holder's calls; return every call's admission time and outcome."""
    topology = topology_of(settings)
    producer = AIOKafkaProducer(
        acks="all", linger_ms=round(producer_linger_seconds() * 1000), **aiokafka_kwargs(settings.kafka)
    )
    await producer.start()
    costs = topology.costs.name

    async def send(key: bytes | None, value: bytes) -> tuple[int, int]:
        metadata = await (await producer.send(costs, value, key=key))
        return metadata.partition, metadata.offset

    view = GuardrailView(settings)
    gate = BudgetGate(view, send, f"bench-holder-{args.holder}")
    await view.start()
    stop = asyncio.Event()

    async def ticking() -> None:
        while not stop.is_set():
            await gate.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)

    ticker = asyncio.create_task(ticking())
    await view.caught_up.wait()
    worst = usd_to_nanos(args.worst_usd)
    workflows = [f"wf-{n}" for n in range(args.workflows)]  # every holder calls every workflow
    rate = args.rate / args.holders
    calls: list[tuple[float, float, str, str]] = []  # (start offset s, admission ms, outcome, workflow)
    in_flight: set[asyncio.Task[None]] = set()
    ids = itertools.count()

    async def call(n: int, workflow_id: str, start: float) -> None:
        opened_before = gate.opened
        try:
            reservation = await gate.admit(workflow_id, worst)
        except BudgetExceeded:
            calls.append((start - t0, (time.perf_counter() - start) * 1000, "exceeded", workflow_id))
            return
        admitted_ms = (time.perf_counter() - start) * 1000
        calls.append((start - t0, admitted_ms, "opened" if gate.opened > opened_before else "admitted", workflow_id))
        if args.call_ms:
            await asyncio.sleep(args.call_ms / 1000)  # the model call, not made
        actual = worst // 4
        gate.settle(reservation, actual)
        event = CostEvent(
            request_id=f"r-{args.holder}-{n}", workflow_id=workflow_id, agent_type="writer", tier=Tier.STANDARD,
            provider=PROVIDER, model=MODEL, attempt=1, input_tokens=100, output_tokens=50,
            cost_usd=nanos_to_usd(actual), lease_id=reservation.workflow_lease.lease_id,
        )
        await send(workflow_id.encode(), encode(event))
        gate.delivered(reservation)

    t0 = time.perf_counter()
    total = int(rate * (args.warmup_s + args.seconds))
    for n in range(total):
        due = t0 + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(call(next(ids), workflows[n % len(workflows)], time.perf_counter()))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=60)
    elapsed = time.perf_counter() - t0
    stop.set()
    await ticker
    await gate.stop()
    await view.stop()
    await producer.stop()
    return {"holder": args.holder, "calls": calls, "elapsed_s": elapsed, "unfinished": len(in_flight)}


# ------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict[str, object]:
    from streams.broker import LocalBroker

    logs = Path(tempfile.mkdtemp(prefix="tierstream-bench-admission-"))
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    with contextlib.ExitStack() as cleanup:
        if external:
            bootstrap, broker_pid = external, None
        else:
            broker = LocalBroker.on_free_ports(data_dir=logs / "kafka")
            cleanup.callback(broker.stop)
            bootstrap = broker.start(timeout=120)
            broker_pid = broker.pid()
        run_id = uuid.uuid4().hex[:10]
        env = {
            "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "TIERSTREAM__KAFKA__TOPIC_PREFIX": f"ab{run_id}",
            "TIERSTREAM__APP_ID": f"ab-{run_id}",
            "TIERSTREAM__WORKER__HEALTH_PORT": "0",
            "TIERSTREAM__WORKER__LOG_LEVEL": "warning",
            "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": str(args.hour_usd),
            "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": str(args.hour_usd / 2),
            "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD": str(args.workflow_usd),
            **({"TIERSTREAM__COST_GUARDRAILS__OPENING_SHARE": str(args.opening_share)}
               if args.opening_share is not None else {}),
        }
        settings = load_settings(environ={**os.environ, **env})
        asyncio.run(ensure_topics(settings))
        cost = processes.spawn(["worker", "--roles", "cost"], env, logs / "worker-cost.log")
        cleanup.callback(processes.stop, cost)
        asyncio.run(wait_for_roles(settings, ["cost"], timeout=120))
        holders = []
        for h in range(args.holders):
            command = [sys.executable, "-m", "benchmarks.admission", "--holder", str(h),
                       "--output", str(logs / f"holder-{h}.json"), *_passed_on(args)]
            log_file = (logs / f"holder-{h}.log").open("wb")
            cleanup.callback(log_file.close)
            holders.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=log_file,
                                            stderr=subprocess.STDOUT))
        cleanup.callback(processes.stop_all, holders)
        pids = {"holders": [p.pid for p in holders], "cost": [cost.pid], "broker": [broker_pid] if broker_pid else []}
        # CPU over the measured window: sampled when it starts and when it ends.
        time.sleep(args.warmup_s + _START_SLACK_S)
        cpu_start = _cpu(pids)
        time.sleep(args.seconds)
        cpu_end = _cpu(pids)
        codes = [p.wait(timeout=args.seconds + 120) for p in holders]
        if any(codes):
            raise SystemExit(f"a holder failed (exit codes {codes}); logs in {logs}")
        results = [orjson.loads((logs / f"holder-{h}.json").read_bytes()) for h in range(args.holders)]
    measured = [c for r in results for c in r["calls"] if c[0] >= args.warmup_s]
    warmup = [c for r in results for c in r["calls"] if c[0] < args.warmup_s]
    span = max((c[0] for c in measured), default=args.warmup_s) - args.warmup_s
    spent: dict[str, int] = {}  # nanos per workflow, every holder's calls (each costs a quarter of its worst case)
    for c in (c for r in results for c in r["calls"] if c[2] != "exceeded"):
        spent[c[3]] = spent.get(c[3], 0) + usd_to_nanos(args.worst_usd) // 4
    return {
        "kind": "admission",
        "started_at": datetime.now(UTC).isoformat(),
        "command": " ".join(["python -m benchmarks.admission", *sys.argv[1:]]),
        "config": {k: v for k, v in vars(args).items() if k not in ("holder", "output")},
        "machine": machine_info(bool(external)),
        "admission_ms": distribution([c[1] for c in measured if c[2] != "exceeded"]),
        "warmup_admission_ms": distribution([c[1] for c in warmup if c[2] != "exceeded"]),
        "calls": len(measured),
        "calls_per_s": round(len(measured) / span, 1) if span > 0 else None,
        "opened": sum(c[2] == "opened" for c in measured),
        "exceeded": sum(c[2] == "exceeded" for c in measured),
        "unfinished": sum(r["unfinished"] for r in results),
        "workflow_spend_usd_max": nanos_to_usd(max(spent.values(), default=0)),
        "cpu_s": {k: round(cpu_end[k] - cpu_start[k], 2) for k in cpu_start},
        "measured_window_s": args.seconds,
        "logs": str(logs),
    }


_START_SLACK_S = 3.0  # holders' start-up (imports, catching up with the spend topic) before their first call


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {k: sum(cpu_seconds(p) or 0.0 for p in ps) for k, ps in pids.items()}


def _passed_on(args: argparse.Namespace) -> list[str]:
    return [
        "--rate", str(args.rate), "--holders", str(args.holders), "--seconds", str(args.seconds),
        "--warmup-s", str(args.warmup_s), "--workflows", str(args.workflows), "--worst-usd", str(args.worst_usd),
        "--call-ms", str(args.call_ms),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.admission", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="calls per second, all holders together")
    parser.add_argument("--holders", type=int, default=3, help="gate processes (tier workers)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds of calls")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="seconds of calls made first, not measured")
    parser.add_argument("--workflows", type=int, default=150, help="workflows, called in turn by every holder")
    parser.add_argument("--worst-usd", type=float, default=0.0005, help="a call's worst case")
    parser.add_argument("--call-ms", type=float, default=200.0, help="how long a call holds its reservation")
    parser.add_argument("--hour-usd", type=float, default=1000.0)
    parser.add_argument("--workflow-usd", type=float, default=10.0)
    parser.add_argument("--opening-share", type=float, default=None, help="cost_guardrails.opening_share")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--holder", type=int, default=None, help=argparse.SUPPRESS)  # a holder process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.holder is not None:
        result = asyncio.run(hold(load_settings(), args))
        args.output.write_bytes(orjson.dumps(result))
        return 0
    report = run(args)
    output = args.output or RESULTS_DIR / f"admission-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    adm, warm = report["admission_ms"], report["warmup_admission_ms"]
    print(f"{report['calls']} calls measured at {report['calls_per_s']}/s over {args.holders} holders "
          f"({report['opened']} under an opening, {report['exceeded']} over budget, "
          f"{report['unfinished']} unfinished)")
    print(f"admission ms: p50 {adm['p50']}  p95 {adm['p95']}  p99 {adm['p99']}  max {adm['max']}")
    print(f"first {args.warmup_s:g} s (not measured): p50 {warm['p50']}  p99 {warm['p99']}  max {warm['max']}")
    print(f"most any workflow spent: ${report['workflow_spend_usd_max']:.6f} of ${args.workflow_usd:g}")
    print(f"CPU s over the measured {args.seconds:g} s: {report['cpu_s']}")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
