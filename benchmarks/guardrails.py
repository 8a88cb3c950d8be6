"""Guardrail benchmark: how fast the hourly limit pauses each tier worker, and the overspend.

``python -m benchmarks.guardrails --workers 1,3 --repeats 3`` (or ``tierstream
bench-guardrails ...``). For each worker count W and each repeat, from scratch:

1. a broker: ``$KAFKA_BOOTSTRAP_SERVERS``, else a local KRaft broker on free ports (one
   per repeat, stopped at its end);
2. the provider simulator as a subprocess (``--latency-ms 5``);
3. an isolated topology (its own topic prefix and app id, as ``tests/support.py``
   ``new_pipeline`` does) with an hourly limit (default $0.03) and workers ``classifier``,
   ``cost`` and W x ``tier:standard``, one process each; wait until their consumer groups
   are Stable with W tier members;
4. not within ``--hour-margin-s`` (150 s) of the end of an hour window: wait it out;
5. produce ``--requests`` standard-tier requests (``tier_hint`` standard,
   ``max_output_tokens`` 200) in one burst, wait until the guardrail view says paused, then
   until no new result arrived for 3 s;
6. measure:

   * reaction time, per tier worker: from the Kafka record time of the cost event that
     took the hour's cumulative spend (cost events in record-time order) to the limit or
     over it, to the ``ts`` of that worker's first "hourly budget spent: pausing
     consumption" log line;
   * overspend: the sum of every cost event of the hour minus the limit, as a fraction of
     the limit; beside it the bound of docs/guardrails.md, W x ``max_concurrent_tasks`` x
     the worst case of one request (which leaves out what was spent during the cost role's lag);

7. stop every process of the repeat.

An attempt in which the pipeline cannot count the hour at all (a worker's agent crashed
at start-up, or the classifier's or the cost role's agent crashed before the pause) is
not a measurement: the repeat is run afresh (``--retries``, default 2) and every failed
attempt is kept in the JSON and printed. A tier worker's agent crash logged during a
measured repeat is reported with that repeat.

Prints a table per repeat and a summary per W, and writes every figure and the machine to
``benchmarks/results/guardrails-<ts>.json``. Nothing is estimated: a figure that could not
be measured is reported as missing, and a repeat that failed says why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import threading
import time
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from benchmarks.harness import RESULTS_DIR, machine_info
from benchmarks.measure import distribution
from schemas.models import AgentRequest, Tier
from streams import processes
from streams.admin import ensure_topics, wait_for_roles
from streams.guardrails.money import HOUR_SECONDS, hour_window, nanos_to_usd, usd_to_nanos
from streams.guardrails.operator import read_state
from streams.kafka_security import aiokafka_kwargs
from streams.pricing import PriceBook
from streams.tokens import estimate_input_tokens
from topologies.config import Settings, load_settings
from topologies.topics import topology_of

PAUSE_LINE = "hourly budget spent: pausing"
MAX_OUTPUT_TOKENS = 200
SIM_LATENCY_MS = 5.0
SETTLE_S = 3.0
STARTUP_GRACE_S = 2.0
WORKFLOWS = 7
DEFINITIONS = {
    "reaction_s": "per tier worker: ts of its first 'hourly budget spent: pausing' log line "
                  "minus the Kafka record timestamp (CreateTime, ms) of the cost event that took the "
                  "hour's cumulative spend, cost events ordered by record time, to >= the limit",
    "overspend_fraction": "(sum of the hour's cost events once no result arrived for 3 s while paused "
                          "- limit) / limit",
    "bound_fraction": "docs/guardrails.md bound: workers x max_concurrent_tasks x worst case of one request "
                      "(PriceBook.worst_case with the tier worker's input estimate), / limit; the "
                      "docs/guardrails.md adds what was spent during the cost role's lag, not included here",
}


# --------------------------------------------------------------------------- kafka io
def _request(n: int) -> tuple[bytes, bytes, AgentRequest]:
    workflow = f"wf-{n % WORKFLOWS}"
    request = AgentRequest(
        request_id=f"g-{n}", workflow_id=workflow, agent_type="writer",
        task=f"Keep going, step g-{n}.", max_output_tokens=MAX_OUTPUT_TOKENS, tier_hint=Tier.STANDARD,
    )
    return workflow.encode(), request.model_dump_json(exclude_none=True).encode(), request


async def _produce(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(acks="all", **aiokafka_kwargs(settings.kafka))
    await producer.start()
    try:
        futures = [await producer.send(topology_of(settings).requests.name, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _wait_paused(settings: Settings, timeout: float, check_alive) -> float:
    """Poll the guardrail view (as `tierstream guardrail status` reads it) until it says
    paused; returns the wall-clock time it was first seen paused."""
    deadline = time.monotonic() + timeout
    while True:
        check_alive()
        view = await read_state(settings)
        if view.hour_paused():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guardrail view did not say paused within {timeout:.0f}s")
        await asyncio.sleep(0.25)


async def _settle_results(settings: Settings, settle_s: float, timeout: float, check_alive) -> dict:
    """Read results and dead letters from the start until none arrived for ``settle_s``."""
    topology = topology_of(settings)
    consumer = AIOKafkaConsumer(
        topology.results.name, topology.dead_letters.name, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False, **aiokafka_kwargs(settings.kafka),
    )
    results: list[dict] = []
    dead_letters = 0
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while True:
            batch = await consumer.getmany(timeout_ms=250)
            for records in batch.values():
                for record in records:
                    if record.topic == topology.results.name:
                        results.append(orjson.loads(record.value))
                    else:
                        dead_letters += 1
                    last_new = time.monotonic()
            check_alive()
            if time.monotonic() - last_new >= settle_s:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"results still arriving after {timeout:.0f}s while paused")
    finally:
        await consumer.stop()
    return {"results": results, "dead_letters": dead_letters, "settled_at": time.time()}


async def _read_all(settings: Settings, topic: str) -> list[tuple[float, dict]]:
    """Every message of ``topic`` up to its current end: (record timestamp s, JSON value)."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **aiokafka_kwargs(settings.kafka))
    await consumer.start()
    out: list[tuple[float, dict]] = []
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp, end in ends.items() if end > 0}
        while pending:
            for records in (await consumer.getmany(*pending, timeout_ms=500)).values():
                out.extend((r.timestamp / 1000, orjson.loads(r.value)) for r in records)
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return out


# ------------------------------------------------------------------------- measuring
def _pause_lines(log: Path) -> list[float]:
    """Times (epoch s) of the worker's pause log lines; non-JSON lines are skipped."""
    times = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and PAUSE_LINE in str(entry.get("msg", "")) and "ts" in entry:
            times.append(datetime.fromisoformat(entry["ts"]).timestamp())
    return times


def _crashes(run_dir: Path, pattern: str = "worker-*.log") -> list[str]:
    """The first agent crash logged by each worker, with its time and how many it logged
    (Faust restarts a crashed agent; one that crashes on every start counts nothing while
    its consumer group looks Stable)."""
    found = []
    for log in sorted(run_dir.glob(pattern)):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if "Crashed reason=" in ln]
        if not lines:
            continue
        try:
            entry = orjson.loads(lines[0])
            ts, msg = str(entry.get("ts", "?")), str(entry.get("msg", ""))
        except orjson.JSONDecodeError:
            ts, msg = "?", lines[0]
        found.append(f"{log.stem} at {ts} ({len(lines)} crash(es)): {msg[msg.find('Crashed reason='):][:200]}")
    return found


def _crossing(costs: list[tuple[float, dict]], limit_nanos: int) -> tuple[float, int, int] | None:
    """(record time, index in record-time order, cumulative nanos) of the cost event that
    took the cumulative spend to the limit or over it; None if it never did."""
    running = 0
    ordered = sorted(costs, key=lambda c: (c[0], c[1]["timestamp"]))
    for index, (ts, cost) in enumerate(ordered):
        running += usd_to_nanos(cost["cost_usd"])
        if running >= limit_nanos:
            return ts, index, running
    return None


def _worst_case_nanos(settings: Settings, requests: list[AgentRequest]) -> int:
    choice = settings.tiers[Tier.STANDARD]
    prices = PriceBook(settings)
    return max(
        usd_to_nanos(prices.worst_case(choice.provider, choice.model, estimate_input_tokens(r), r.max_output_tokens))
        for r in requests
    )


def _wait_inside_hour(margin_s: float, console: Console) -> float:
    """Sleep past the hour boundary if fewer than ``margin_s`` seconds are left in this
    hour window; returns the seconds waited."""
    left = HOUR_SECONDS - time.time() % HOUR_SECONDS
    if left >= margin_s:
        return 0.0
    wait = left + 2.0  # into the next window, clear of the boundary
    console.print(f"  {left:.0f} s to the hour boundary (< {margin_s:.0f} s): waiting {wait:.0f} s")
    time.sleep(wait)
    return round(wait, 1)


def _stop_all(procs: list) -> list[int | None]:
    """Stop processes in parallel (SIGTERM, SIGKILL after 30 s); their exit codes."""
    codes: list[int | None] = [None] * len(procs)

    def stop(i: int) -> None:
        codes[i] = processes.stop(procs[i])

    threads = [threading.Thread(target=stop, args=(i,), daemon=True) for i in range(len(procs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def run_repeat(
    workers: int, repeat: int, attempt: int, args: argparse.Namespace, logs: Path, console: Console
) -> dict:
    from streams.broker import LocalBroker, free_ports

    out: dict[str, object] = {"workers": workers, "repeat": repeat, "attempt": attempt, "ok": False}
    run_dir = logs / f"w{workers}-r{repeat}-a{attempt}"
    run_dir.mkdir(parents=True)
    out["logs"] = str(run_dir)
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        try:
            if external:
                bootstrap = external
            else:
                broker = LocalBroker.on_free_ports(data_dir=run_dir / "kafka")
                cleanup.callback(broker.stop)  # a no-op if it never started
                bootstrap = broker.start(timeout=120)
            out["broker_ready_s"] = round(time.monotonic() - started, 2)
            (sim_port,) = free_ports(1)
            sim = processes.spawn(
                ["provider-sim", "--port", str(sim_port), "--latency-ms", str(SIM_LATENCY_MS)],
                log_path=run_dir / "simulator.log",
            )
            cleanup.callback(processes.stop, sim)
            processes.wait_http_ok(f"http://127.0.0.1:{sim_port}/health", 30, sim)

            run = uuid.uuid4().hex[:10]
            env = {
                "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "TIERSTREAM__KAFKA__TOPIC_PREFIX": f"gb{run}",
                "TIERSTREAM__APP_ID": f"gb-{run}",
                **processes.simulator_env(sim_port),
                "TIERSTREAM__WORKER__HEALTH_PORT": "0",
                "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": str(args.limit_usd),
                "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": str(args.limit_usd / 2),
                "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD": "1000",
                "TIERSTREAM__WORKER__MAX_CONCURRENT_TASKS": str(args.max_concurrent_tasks),
                "TIERSTREAM__RATE_LIMITS": "null",  # the guardrail, not the rate limiter
            }
            settings = load_settings(environ={**os.environ, **env})  # what the workers see
            out["topic_prefix"] = env["TIERSTREAM__KAFKA__TOPIC_PREFIX"]
            asyncio.run(ensure_topics(settings))
            specs = ["classifier", "cost"] + ["tier:standard"] * workers
            names = ["classifier", "cost"] + [f"tier-standard-{i}" for i in range(workers)]
            procs = [
                processes.spawn(["worker", "--roles", spec], env, run_dir / f"worker-{name}.log")
                for spec, name in zip(specs, names, strict=True)
            ]
            cleanup.callback(_stop_all, procs)

            def check_alive() -> None:
                dead = [n for n, p in zip(names, procs, strict=True) if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"worker(s) exited early: {dead}; logs in {run_dir}")

            def check_pipeline() -> None:
                """Before the pause: a crashed classifier or cost agent (Faust restarts it, and
                one that crashes on its first message does so every time) means the hour can
                never be counted to its limit: no measurement, start afresh."""
                check_alive()
                crashed = _crashes(run_dir, "worker-c*.log")  # classifier, cost
                if crashed:
                    out["pipeline_failure"] = crashed
                    raise RuntimeError(f"a worker's agent crashed before the pause: {crashed[0]}")

            asyncio.run(wait_for_roles(settings, ["tier-standard"], timeout=180, members=workers))
            asyncio.run(wait_for_roles(settings, ["classifier", "cost"], timeout=180))
            check_alive()
            out["startup_ready_s"] = round(time.monotonic() - started, 2)
            time.sleep(STARTUP_GRACE_S)
            crashed = _crashes(run_dir)
            if crashed:
                out["pipeline_failure"] = crashed
                raise RuntimeError(f"a worker's agent crashed at start-up: {crashed[0]}")

            out["waited_for_hour_boundary_s"] = _wait_inside_hour(args.hour_margin_s, console)
            made = [_request(n) for n in range(args.requests)]
            worst = _worst_case_nanos(settings, [r for _, _, r in made])
            limit_nanos = usd_to_nanos(args.limit_usd)
            load_before = [round(x, 2) for x in os.getloadavg()]
            produce_start = time.time()
            asyncio.run(_produce(settings, [(k, v) for k, v, _ in made]))
            produce_end = time.time()
            paused_seen = asyncio.run(_wait_paused(settings, args.pause_timeout_s, check_pipeline))
            settled = asyncio.run(_settle_results(settings, SETTLE_S, args.pause_timeout_s, check_alive))
            costs = asyncio.run(_read_all(settings, topology_of(settings).costs.name))
            view = asyncio.run(read_state(settings))
            load_after = [round(x, 2) for x in os.getloadavg()]
        except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next repeat
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()
            return out
        # leaving the ExitStack stops the workers, the simulator and the broker
    out["stopped_s"] = round(time.monotonic() - started, 2)

    window = hour_window(produce_start)
    in_window = [c for c in costs if hour_window(c[0]) == window]
    crossing = _crossing(in_window, limit_nanos)
    spent = sum(usd_to_nanos(c["cost_usd"]) for _, c in in_window)
    results = settled["results"]
    ids = [r["request_id"] for r in results]
    reactions: list[float | None] = []
    pause_lines: list[int] = []
    for i in range(workers):
        lines = _pause_lines(run_dir / f"worker-tier-standard-{i}.log")
        pause_lines.append(len(lines))
        reactions.append(round(min(lines) - crossing[0], 3) if lines and crossing else None)
    bound = workers * args.max_concurrent_tasks * worst
    crashed = _crashes(run_dir)
    out.update({
        "ok": crossing is not None and len(in_window) == len(costs) and all(r is not None for r in reactions),
        # Reported, not hidden: an agent crash (Faust restarts the agent) during the run.
        "agent_crashes": crashed,
        "loadavg_1_5_15_before_produce": load_before,
        "loadavg_1_5_15_after": load_after,
        "produce_s": round(produce_end - produce_start, 3),
        "paused_seen_after_produce_start_s": round(paused_seen - produce_start, 3),
        "crossing": None if crossing is None else {
            "record_time": datetime.fromtimestamp(crossing[0], UTC).isoformat(timespec="milliseconds"),
            "after_produce_start_s": round(crossing[0] - produce_start, 3),
            "event_index": crossing[1],
            "cumulative_usd": nanos_to_usd(crossing[2]),
        },
        "reaction_s": reactions,
        "pause_log_lines": pause_lines,
        "spend": {
            "limit_usd": args.limit_usd,
            "final_usd": nanos_to_usd(spent),
            "overspend_usd": nanos_to_usd(spent - limit_nanos),
            "overspend_fraction": round((spent - limit_nanos) / limit_nanos, 4),
            "worst_case_per_request_usd": nanos_to_usd(worst),
            "bound_usd": nanos_to_usd(bound),
            "bound_fraction": round(bound / limit_nanos, 4),
            "within_bound": spent - limit_nanos <= bound,
            "view_hour_spent_usd": view.status()["hour_spent_usd"],
            "view_paused": view.hour_paused(),
        },
        "counts": {
            "produced": args.requests,
            "results": len(results),
            "results_ok": sum(1 for r in results if r.get("status") == "ok"),
            "unique_results": len(set(ids)),
            "duplicates": len(ids) - len(set(ids)),
            "dead_letters": settled["dead_letters"],
            "cost_events": len(costs),
            "cost_events_in_window": len(in_window),
            "unanswered": args.requests - len(set(ids)),
        },
    })
    if len(in_window) != len(costs):
        out["error"] = "cost events fell in two hour windows; the spend was reset mid-run"
    elif crossing is None:
        out["error"] = "the cost events never reached the limit"
    elif any(r is None for r in reactions):
        out["error"] = f"a tier worker logged no pause (pause lines per worker: {pause_lines})"
    return out


def summarize(repeats: list[dict], workers: int) -> dict:
    mine = [r for r in repeats if r["workers"] == workers]
    ok = [r for r in mine if r["ok"]]
    reactions = [x for r in ok for x in r["reaction_s"]]
    overspend = [r["spend"]["overspend_fraction"] for r in ok]
    return {
        "workers": workers,
        "repeats": len(mine),
        "repeats_ok": len(ok),
        "reaction_s": distribution(reactions),
        "overspend_fraction": {
            "n": len(overspend),
            "mean": round(sum(overspend) / len(overspend), 4) if overspend else None,
            "max": max(overspend) if overspend else None,
            "min": min(overspend) if overspend else None,
        },
        "bound_fraction": max((r["spend"]["bound_fraction"] for r in ok), default=None),
        "all_within_bound": all(r["spend"]["within_bound"] for r in ok) if ok else None,
    }


# -------------------------------------------------------------------------- reporting
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def print_report(console: Console, report: dict) -> None:
    cfg = report["config"]
    per = Table(title=f"Guardrail repeats: hourly limit ${cfg['limit_usd']}, {cfg['requests']} requests, "
                      f"max_concurrent_tasks {cfg['max_concurrent_tasks']}, simulator {cfg['sim_latency_ms']} ms")
    for col in ("W", "rep", "try", "reaction s (per worker)", "final spend $", "overspend", "bound",
                "results/produced", "cost events", "load 1m", "status"):
        per.add_column(col, justify="left" if col in ("reaction s (per worker)", "status") else "right")
    for r in report["repeats"]:
        if "spend" not in r:
            per.add_row(str(r["workers"]), str(r["repeat"]), str(r["attempt"]), "-", "-", "-", "-", "-", "-", "-",
                        f"[red]{r.get('error')}[/]")
            continue
        s, c = r["spend"], r["counts"]
        per.add_row(
            str(r["workers"]), str(r["repeat"]), str(r["attempt"]),
            ", ".join("-" if x is None else f"{x:.3f}" for x in r["reaction_s"]),
            f"{s['final_usd']:.6f}", _pct(s["overspend_fraction"]), _pct(s["bound_fraction"]),
            f"{c['results']}/{c['produced']}", str(c["cost_events"]),
            str(r["loadavg_1_5_15_before_produce"][0]),
            ("ok" + (" [yellow](agent crash, below)[/]" if r["agent_crashes"] else "")) if r["ok"]
            else f"[red]{r.get('error')}[/]",
        )
    console.print(per)
    summary = Table(title="Summary per worker count (reaction: pooled over workers and repeats)")
    for col in ("W", "repeats ok", "reaction n", "p50 s", "p99 s", "max s",
                "overspend mean", "overspend max", "bound", "within bound"):
        summary.add_column(col, justify="right")
    for s in report["summary"]:
        dist, over = s["reaction_s"], s["overspend_fraction"]
        has = dist["n"] > 0
        summary.add_row(
            str(s["workers"]), f"{s['repeats_ok']}/{s['repeats']}", str(dist["n"]),
            f"{dist['p50']:.3f}" if has else "-", f"{dist['p99']:.3f}" if has else "-",
            f"{dist['max']:.3f}" if has else "-",
            _pct(over["mean"]), _pct(over["max"]), _pct(s["bound_fraction"]),
            "-" if s["all_within_bound"] is None else str(s["all_within_bound"]),
        )
    console.print(summary)
    for r in report["repeats"]:
        for crash in r.get("agent_crashes") or []:
            console.print(f"[yellow]W={r['workers']} repeat {r['repeat']}: agent crash logged during the run "
                          f"(crossing at {(r.get('crossing') or {}).get('record_time')}): {crash}[/]")
    for r in report["failed_attempts"]:
        console.print(f"[yellow]failed attempt (not a measurement; the repeat was run afresh), W={r['workers']} "
                      f"repeat {r['repeat']} attempt {r['attempt']}: {r['error']}[/]")
    console.print("overspend and bound are fractions of the hourly limit; the bound leaves out the "
                  "spend during the cost role's lag (docs/guardrails.md, 'The overspend bound').")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guardrails", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,3", help="comma-separated tier:standard worker counts")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default benchmarks/results/guardrails-<ts>.json)")
    parser.add_argument("--limit-usd", type=float, default=0.03, help="max_cost_per_hour_usd")
    parser.add_argument("--requests", type=int, default=300, help="requests produced per repeat")
    parser.add_argument("--max-concurrent-tasks", type=int, default=64, help="per tier worker process")
    parser.add_argument("--hour-margin-s", type=float, default=150.0,
                        help="wait for the next hour window if fewer seconds than this are left")
    parser.add_argument("--retries", type=int, default=2,
                        help="run a repeat afresh (new broker and topics) up to this often if a worker's "
                             "agent crashed at start-up or the classifier's or cost role's agent crashed "
                             "before the pause; every such attempt is kept in the JSON and printed")
    parser.add_argument("--pause-timeout-s", type=float, default=180.0,
                        help="give up on a repeat if not paused (or not settled) within this")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers: comma-separated integers, e.g. 1,3")
    if not args.workers or min(args.workers) < 1 or args.repeats < 1 or args.requests < 1:
        parser.error("--workers, --repeats and --requests must be >= 1")
    if args.limit_usd <= 0 or args.max_concurrent_tasks < 1 or args.retries < 0:
        parser.error("--limit-usd must be > 0, --max-concurrent-tasks >= 1, --retries >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True)
    external = bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    started_at = datetime.now(UTC)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    logs = Path(tempfile.mkdtemp(prefix="tierstream-bench-guardrails-"))
    err.print(f"broker: {'external ' + os.environ['KAFKA_BOOTSTRAP_SERVERS'] if external else 'local, one per repeat'}; "
              f"logs in {logs}; load average {load_at_start}")
    repeats: list[dict] = []
    failed_attempts: list[dict] = []
    for workers in args.workers:
        for repeat in range(1, args.repeats + 1):
            for attempt in range(1, args.retries + 2):
                err.print(f"W={workers} repeat {repeat}/{args.repeats}, attempt {attempt} ...")
                result = run_repeat(workers, repeat, attempt, args, logs, err)
                if "pipeline_failure" not in result or attempt > args.retries:
                    break
                # Not a measurement: the pipeline never worked. Recorded, then tried afresh.
                failed_attempts.append(result)
                err.print(f"  [yellow]pipeline failed, trying again afresh: {result['error']}[/]")
            repeats.append(result)
            if result["ok"]:
                err.print(f"  reaction s {result['reaction_s']}, final spend ${result['spend']['final_usd']:.6f}, "
                          f"{result['counts']['results']}/{result['counts']['produced']} answered")
            else:
                err.print(f"  [red]failed: {result.get('error')}[/]")
    report = {
        "schema": 1,
        "kind": "guardrails",
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {
            "workers": args.workers, "repeats": args.repeats, "limit_usd": args.limit_usd,
            "alert_threshold_usd": args.limit_usd / 2, "requests": args.requests,
            "max_output_tokens": MAX_OUTPUT_TOKENS, "max_concurrent_tasks": args.max_concurrent_tasks,
            "sim_latency_ms": SIM_LATENCY_MS, "settle_s": SETTLE_S, "hour_margin_s": args.hour_margin_s,
            "broker": "external" if external else "local, started per repeat",
        },
        "definitions": DEFINITIONS,
        "machine": {
            **machine_info(external),
            # Other processes on the machine skew the figures; the load average shows it.
            "loadavg_1_5_15_at_start": load_at_start,
            "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "summary": [summarize(repeats, w) for w in args.workers],
        "repeats": repeats,
        "failed_attempts": failed_attempts,
        "logs": str(logs),
    }
    output = args.output or RESULTS_DIR / f"guardrails-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    out = Console(width=None if sys.stdout.isatty() else 150)  # piped: do not squeeze to 80 columns
    print_report(out, report)
    machine = report["machine"]
    out.print(f"machine: {machine['nproc']} cores, {machine['memory_gb']} GB, Python {machine['python']}, "
              f"Kafka {machine['kafka']}; load average at start {machine['loadavg_1_5_15_at_start']}, "
              f"at end {machine['loadavg_1_5_15_at_end']}")
    out.print(f"results: {output}")
    return 0 if all(r["ok"] for r in repeats) else 1


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)
    sys.exit(main())
