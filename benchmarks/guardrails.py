"""Guardrail benchmark: does the cluster overspend its budget leases, whatever the replica count?

``python -m benchmarks.guardrails --workers 1,3,6 --repeats 3`` (or ``tierstream
bench-guardrails ...``). Cost guardrails are cluster-wide budget leases
(:mod:`streams.guardrails.budget`): a call is admitted only if its worst case fits in the
leases its process holds for its workflow and for the hour, so the cluster should spend
past the hourly limit and past a workflow budget at most the one call that overdraws it
(``cost_guardrails.overdraft``, on by default; nothing at all without it, as with
``TIERSTREAM__COST_GUARDRAILS__OVERDRAFT=false`` in the environment, which the workers
inherit). For each replica count W
(tier:standard worker processes) and each repeat, from scratch:

1. a broker: ``$KAFKA_BOOTSTRAP_SERVERS``, else a local KRaft broker on free ports (one
   per repeat, stopped at its end);
2. the provider simulator as a subprocess (``--latency-ms 5``);
3. an isolated topology (its own topic prefix and app id, as ``tests/support.py``
   ``new_pipeline`` does) with an hourly limit (``--limit-usd``, default $0.05) and a
   budget per workflow (``--workflow-limit-usd``, default $0.02); worker processes
   ``classifier``, ``cost``, W x ``tier:standard``, one ``tier:nano`` and one
   ``tier:premium`` (W replicas of every tier would be too heavy for a 2-core machine
   at W=6: the nano and premium processes are there for the runaway workflow), each tier
   worker serving ``/metrics`` on a port of its own; wait until their consumer groups
   are Stable (W tier-standard members) and every tier worker's ``/health`` answers;
4. not within ``--hour-margin-s`` (150 s) of the end of an hour window: wait it out;
5. the workflow phase: ``--runaway-requests`` (90) requests of one workflow,
   ``runaway``, in one burst, their ``tier_hint`` cycling nano/standard/premium, so that
   three processes (the nano one, the premium one and the standard replica that owns
   the workflow's partition) hold leases of its budget at once; wait until every one is
   answered (``ok``, or ``budget_exceeded`` once its budget has no room for a call);
6. the hour phase, at once (the nano and premium processes may still hold hourly
   leases: idle holders among a busy one): ``--requests`` (300) standard requests of 60
   other workflows (so that no workflow budget binds: only the hour's) in one burst;
   wait until no result came for ``--quiet-s`` (default the lease time, 10 s: an idle
   holder returns its leases after half of it, so room still held then is free again
   before the end);
7. read the costs topic (budget lease records skipped) and the guardrails topic, scrape
   every tier worker's ``/metrics``, stop every process, read the worker logs;
8. measure:

   * overspend past the hourly limit: the sum of every cost event of the hour (both
     phases) minus the limit, if positive; in dollars and in worst-case calls (the
     worst case of one standard request, ``PriceBook.worst_case`` with the tier
     worker's input estimate, the largest of any request of the run);
   * overspend past the workflow budget: the runaway workflow's cost events minus its
     budget, if positive; in dollars and in worst-case calls (the largest worst case of
     its requests' tiers: standard);
   * usable share of the hourly limit: the hour's spend / the limit (what the leases
     let the cluster spend of it; without overdraft a lease is never smaller than the
     worst case of a call, so up to one worst-case call of the limit can stay unusable);
   * reaction, per tier worker: from the Kafka record time (CreateTime) of the hour's
     first ``limit_reached`` guardrail event (scope ``hour``, published when an hourly
     lease request is denied, or the spend reached the limit) to the ``ts`` of the
     worker's first "hourly budget spent: pausing" log line. No event, or no pause
     line, is reported as missing, never as zero;
   * admission wait: the ``tierstream_budget_admission_seconds`` histograms of the tier
     workers' ``/metrics`` (time a call waited for its leases), scraped after each
     phase: the workflow phase (every tier worker) and the hour phase (the standard
     replicas, the difference of the two scrapes), pooled over workers; p50 and p99 as
     Prometheus' ``histogram_quantile`` (linear inside a bucket). Only admitted calls are
     in it: calls still waiting when the phase ended are not;
   * for comparison, the old per-process bound of docs/guardrails.md: W x
     ``max_concurrent_tasks`` x the worst case of one request.

An attempt in which the pipeline cannot count at all (a worker's agent crashed at
start-up, or the classifier's or the cost role's agent crashed during a phase) is not a
measurement: the repeat is run afresh (``--retries``, default 2) and every failed attempt
is kept in the JSON and printed. A tier worker's agent crash logged during a measured
repeat is reported with that repeat. A repeat whose runaway workflow never reached its
budget (no ``budget_exceeded`` answer) measures nothing about it and fails.

Prints a table per repeat and summaries per W, and writes every figure and the machine to
``benchmarks/results/guardrails-<ts>.json``. Nothing is estimated: a figure that could not
be measured is reported as missing, and a repeat that failed says why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from benchmarks.harness import RESULTS_DIR, machine_info
from benchmarks.measure import distribution
from benchmarks.topic_io import produce_requests, read_to_end
from schemas.codec import is_cost_event
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
ADMISSION_METRIC = "tierstream_budget_admission_seconds"
MAX_OUTPUT_TOKENS = 200
SIM_LATENCY_MS = 5.0
STARTUP_GRACE_S = 2.0
# Many workflows in the hour phase, so that no workflow budget binds there: with few, a
# replica owning a partition of one workflow could spend its budget within the hour's room.
WORKFLOWS = 60
RUNAWAY = "runaway"
RUNAWAY_TIERS = (Tier.NANO, Tier.STANDARD, Tier.PREMIUM)
DEFINITIONS = {
    "hour.spent_usd": "sum of the cost_usd of every cost event (costs-topic records without a 'budget' key) of "
                      "the hour window, both phases, read once the hour phase was quiet",
    "hour.overspend_usd": "max(hour.spent_usd - limit, 0)",
    "hour.overspend_calls": "hour.overspend_usd / the worst case of one standard request (PriceBook.worst_case, "
                            "the tier worker's input estimate, max_output_tokens 200): the largest of the run",
    "hour.usable_share": "hour.spent_usd / limit",
    "workflow.spent_usd": "sum of the cost_usd of the runaway workflow's cost events",
    "workflow.overspend_usd": "max(workflow.spent_usd - workflow budget, 0)",
    "workflow.overspend_calls": "workflow.overspend_usd / the largest worst case over the runaway's requests' tiers",
    "reaction_s": "per tier worker (standard replicas, then nano, then premium): ts of its first 'hourly budget "
                  "spent: pausing' log line minus the Kafka record timestamp (CreateTime) of the hour's first "
                  "guardrail event with scope 'hour' and kind 'limit_reached'; null when either is missing",
    "admission": "tierstream_budget_admission_seconds histograms scraped from each tier worker's /metrics after "
                 "each phase, bucket counts summed over workers (hour phase: standard replicas, second scrape "
                 "minus first); p50/p99 as Prometheus histogram_quantile (linear inside a bucket), null if no "
                 "call was admitted; calls still waiting at the scrape are not in it",
    "old_per_process_bound_usd": "the old docs/guardrails.md bound, for comparison only: W x max_concurrent_tasks "
                                 "x the worst case of one standard request",
}


# --------------------------------------------------------------------------- requests
def _hour_request(n: int) -> tuple[bytes, bytes, AgentRequest]:
    workflow = f"wf-{n % WORKFLOWS}"
    request = AgentRequest(
        request_id=f"g-{n}", workflow_id=workflow, agent_type="writer",
        task=f"Keep going, step g-{n}.", max_output_tokens=MAX_OUTPUT_TOKENS, tier_hint=Tier.STANDARD,
    )
    return workflow.encode(), request.model_dump_json(exclude_none=True).encode(), request


def _runaway_request(n: int) -> tuple[bytes, bytes, AgentRequest]:
    request = AgentRequest(
        request_id=f"w-{n}", workflow_id=RUNAWAY, agent_type="writer",
        task=f"Keep going, step w-{n}.", max_output_tokens=MAX_OUTPUT_TOKENS,
        tier_hint=RUNAWAY_TIERS[n % len(RUNAWAY_TIERS)],
    )
    return RUNAWAY.encode(), request.model_dump_json(exclude_none=True).encode(), request


def _worst_case_nanos(settings: Settings, requests: list[AgentRequest]) -> int:
    """The largest worst case of ``requests``, each priced for its hinted tier."""
    prices = PriceBook(settings)
    worst = 0
    for r in requests:
        choice = settings.tiers[r.tier_hint or Tier.STANDARD]
        cost = prices.worst_case(choice.provider, choice.model, estimate_input_tokens(r), r.max_output_tokens)
        worst = max(worst, usd_to_nanos(cost))
    return worst


# --------------------------------------------------------------------------- kafka io
async def _await_answers(
    settings: Settings, ids: set[str], *, quiet_s: float | None, timeout: float, check: Callable[[], None]
) -> dict:
    """Read results and dead letters from the start, keeping those of ``ids``. Returns
    when every one of ``ids`` is answered (``quiet_s`` None), or once at least one was and
    none came for ``quiet_s`` seconds."""
    topology = topology_of(settings)
    consumer = AIOKafkaConsumer(
        topology.results.name, topology.dead_letters.name, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False, **aiokafka_kwargs(settings.kafka),
    )
    results: list[dict] = []
    dead_letters: list[dict] = []
    answered: set[str] = set()
    await consumer.start()
    started = time.monotonic()
    try:
        last_new: float | None = None
        while True:
            batch = await consumer.getmany(timeout_ms=250)
            for records in batch.values():
                for record in records:
                    value = orjson.loads(record.value)
                    if value.get("request_id") not in ids:
                        continue
                    (results if record.topic == topology.results.name else dead_letters).append(value)
                    answered.add(value["request_id"])
                    last_new = time.monotonic()
            check()
            now = time.monotonic()
            if quiet_s is None and answered >= ids:
                break
            if quiet_s is not None and last_new is not None and now - last_new >= quiet_s:
                break
            if now - started > timeout:
                raise TimeoutError(
                    f"{len(answered)} of {len(ids)} requests answered after {timeout:.0f}s"
                    + ("" if quiet_s is None else f" and results still arriving (quiet {quiet_s:.0f}s wanted)")
                )
    finally:
        await consumer.stop()
    return {"results": results, "dead_letters": dead_letters, "ended_at": time.time()}


# ------------------------------------------------------------------------- /metrics
Histogram = dict[str, float]  # le (as exposed) -> cumulative count


def _scrape(port: int) -> dict[str, Histogram] | str:
    """The admission histograms (per tier label) of one worker's /metrics, or why not."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        return f"scrape of port {port} failed: {exc}"
    found: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.name != ADMISSION_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                found.setdefault(sample.labels.get("tier", "?"), {})[sample.labels["le"]] = sample.value
    return found if found else f"no {ADMISSION_METRIC} on port {port}"


def _pool(histograms: list[Histogram], minus: list[Histogram] | None = None) -> Histogram:
    pooled: Histogram = {}
    for h in histograms:
        for le, count in h.items():
            pooled[le] = pooled.get(le, 0.0) + count
    for h in minus or []:
        for le, count in h.items():
            pooled[le] = pooled.get(le, 0.0) - count
    return pooled


def _quantile(q: float, histogram: Histogram) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket holding the rank; the
    highest finite bound if the rank is in the +Inf bucket; None if empty."""
    buckets = sorted((float(le), count) for le, count in histogram.items())
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _admission(histogram: Histogram) -> dict:
    count = max(histogram.values(), default=0.0)  # the +Inf bucket: every admitted call
    p50, p99 = _quantile(0.5, histogram), _quantile(0.99, histogram)
    return {
        "calls": int(count),
        "p50_s": None if p50 is None else round(p50, 6),
        "p99_s": None if p99 is None else round(p99, 6),
        "buckets": {le: int(c) for le, c in sorted(histogram.items(), key=lambda kv: float(kv[0]))},
    }


# ------------------------------------------------------------------------- measuring
def _pause_lines(log: Path) -> list[float]:
    """Times (epoch s) of the worker's pause log lines; non-JSON lines are skipped."""
    if not log.exists():
        return []
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


def _limit_reached(events: list[tuple[float, dict]], window: int) -> list[tuple[float, dict]]:
    """The hour's ``limit_reached`` guardrail events of ``window``, in record-time order."""
    found = []
    for ts, event in events:
        start = event.get("window_start")
        if (event.get("scope") == "hour" and event.get("kind") == "limit_reached" and start
                and int(datetime.fromisoformat(start).timestamp()) == window):
            found.append((ts, event))
    return sorted(found, key=lambda e: e[0])


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


def _answer_counts(produced: int, answers: dict) -> dict:
    results, dead = answers["results"], answers["dead_letters"]
    ids = [r["request_id"] for r in results]
    answered = set(ids) | {d["request_id"] for d in dead}
    return {
        "produced": produced,
        "results": len(results),
        "unique_results": len(set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "statuses": dict(Counter(str(r.get("status")) for r in results)),
        "dead_letters": len(dead),
        "unanswered": produced - len(answered),
    }


def _usd(nanos: int) -> float:
    return nanos_to_usd(nanos)


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
    tier_names = [f"tier-standard-{i}" for i in range(workers)] + ["tier-nano", "tier-premium"]
    with contextlib.ExitStack() as cleanup:
        try:
            if external:
                bootstrap = external
            else:
                broker = LocalBroker.on_free_ports(data_dir=run_dir / "kafka")
                cleanup.callback(broker.stop)  # a no-op if it never started
                bootstrap = broker.start(timeout=120)
            out["broker_ready_s"] = round(time.monotonic() - started, 2)
            sim_port, *tier_ports = free_ports(1 + len(tier_names))
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
                "TIERSTREAM__WORKER__HEALTH_PORT": "0",  # any free port; the tier workers get theirs below
                "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": str(args.limit_usd),
                "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": str(args.limit_usd / 2),
                "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD": str(args.workflow_limit_usd),
                "TIERSTREAM__WORKER__MAX_CONCURRENT_TASKS": str(args.max_concurrent_tasks),
                "TIERSTREAM__RATE_LIMITS": "null",  # the guardrail, not the rate limiter
            }
            settings = load_settings(environ={**os.environ, **env})  # what the workers see
            quiet_s = args.quiet_s if args.quiet_s is not None else settings.cost_guardrails.lease_seconds
            out["topic_prefix"] = env["TIERSTREAM__KAFKA__TOPIC_PREFIX"]
            out["quiet_s"] = quiet_s
            asyncio.run(ensure_topics(settings))
            specs = ["classifier", "cost"] + ["tier:standard"] * workers + ["tier:nano", "tier:premium"]
            names = ["classifier", "cost", *tier_names]
            ports = [None, None, *tier_ports]
            procs = [
                processes.spawn(
                    ["worker", "--roles", spec],
                    {**env, **({"TIERSTREAM__WORKER__HEALTH_PORT": str(port)} if port else {})},
                    run_dir / f"worker-{name}.log",
                )
                for spec, name, port in zip(specs, names, ports, strict=True)
            ]
            cleanup.callback(processes.stop_all, procs)

            def check_alive() -> None:
                dead = [n for n, p in zip(names, procs, strict=True) if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"worker(s) exited early: {dead}; logs in {run_dir}")

            def check_pipeline() -> None:
                """During a phase: a crashed classifier or cost agent (Faust restarts it, and
                one that crashes on its first message does so every time) means the spend
                can never be counted: no measurement, start afresh."""
                check_alive()
                crashed = _crashes(run_dir, "worker-c*.log")  # classifier, cost
                if crashed:
                    out["pipeline_failure"] = crashed
                    raise RuntimeError(f"a worker's agent crashed during a phase: {crashed[0]}")

            asyncio.run(wait_for_roles(settings, ["tier-standard"], timeout=180, members=workers))
            asyncio.run(wait_for_roles(settings, ["classifier", "cost", "tier-nano", "tier-premium"], timeout=180))
            for proc, port in zip(procs[2:], tier_ports, strict=True):  # /metrics is up
                processes.wait_http_ok(f"http://127.0.0.1:{port}/health", 60, proc)
            check_alive()
            out["startup_ready_s"] = round(time.monotonic() - started, 2)
            time.sleep(STARTUP_GRACE_S)
            crashed = _crashes(run_dir)
            if crashed:
                out["pipeline_failure"] = crashed
                raise RuntimeError(f"a worker's agent crashed at start-up: {crashed[0]}")

            def scrape() -> dict[str, dict[str, Histogram] | str]:
                return {name: _scrape(port) for name, port in zip(tier_names, tier_ports, strict=True)}

            out["waited_for_hour_boundary_s"] = _wait_inside_hour(args.hour_margin_s, console)
            runaway = [_runaway_request(n) for n in range(args.runaway_requests)]
            hourly = [_hour_request(n) for n in range(args.requests)]
            load_before = [round(x, 2) for x in os.getloadavg()]
            scraped_start = scrape()
            runaway_start = time.time()
            asyncio.run(produce_requests(settings, [(k, v) for k, v, _ in runaway]))
            runaway_answers = asyncio.run(_await_answers(
                settings, {r.request_id for _, _, r in runaway}, quiet_s=None,
                timeout=args.phase_timeout_s, check=check_pipeline,
            ))
            scraped_mid = scrape()
            hour_start = time.time()
            asyncio.run(produce_requests(settings, [(k, v) for k, v, _ in hourly]))
            hour_produced = time.time()
            hour_answers = asyncio.run(_await_answers(
                settings, {r.request_id for _, _, r in hourly}, quiet_s=quiet_s,
                timeout=args.phase_timeout_s, check=check_pipeline,
            ))
            scraped_end = scrape()
            costs_raw = asyncio.run(read_to_end(settings, topology_of(settings).costs.name))
            guardrails_raw = asyncio.run(read_to_end(settings, topology_of(settings).guardrails.name))
            view = asyncio.run(read_state(settings))
            load_after = [round(x, 2) for x in os.getloadavg()]
        except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next repeat
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()
            return out
        # leaving the ExitStack stops the workers (their logs are complete), the simulator and the broker
    out["stopped_s"] = round(time.monotonic() - started, 2)

    limit_nanos = usd_to_nanos(args.limit_usd)
    wf_limit_nanos = usd_to_nanos(args.workflow_limit_usd)
    worst = _worst_case_nanos(settings, [r for _, _, r in hourly + runaway])
    wf_worst = _worst_case_nanos(settings, [r for _, _, r in runaway])

    costs = [(ts, orjson.loads(raw)) for ts, raw in costs_raw if raw is not None and is_cost_event(raw)]
    budget_records = sum(1 for _, raw in costs_raw if raw is not None and not is_cost_event(raw))
    window = hour_window(runaway_start)
    in_window = [c for c in costs if hour_window(c[0]) == window]
    spent = sum(usd_to_nanos(c["cost_usd"]) for _, c in in_window)
    runaway_costs = [c for _, c in costs if c["workflow_id"] == RUNAWAY]
    wf_spent = sum(usd_to_nanos(c["cost_usd"]) for c in runaway_costs)
    wf_results_spent = sum(usd_to_nanos(r.get("cost_usd", 0)) for r in runaway_answers["results"])
    crossing = _crossing(in_window, limit_nanos)
    wf_view = view.workflow_spend(RUNAWAY)

    events = [(ts, orjson.loads(raw)) for ts, raw in guardrails_raw if raw is not None]
    reached = _limit_reached(events, window)
    event_ts = reached[0][0] if reached else None
    wf_events = sorted(ts for ts, e in events if e.get("scope") == f"workflow:{RUNAWAY}"
                       and e.get("kind") == "limit_reached")

    reactions: dict[str, float | None] = {}
    first_pause: dict[str, float | None] = {}
    pause_lines: dict[str, int] = {}
    for name in tier_names:
        lines = _pause_lines(run_dir / f"worker-{name}.log")
        pause_lines[name] = len(lines)
        first_pause[name] = round(min(lines) - hour_start, 3) if lines else None
        reactions[name] = round(min(lines) - event_ts, 3) if lines and event_ts is not None else None
    if event_ts is None:
        reaction_missing = (f"no 'limit_reached' guardrail event for the hour: spent ${_usd(spent):.6f} of "
                            f"${args.limit_usd}")
    elif any(r is None for r in reactions.values()):
        reaction_missing = f"tier worker(s) logged no pause: {[n for n, r in reactions.items() if r is None]}"
    else:
        reaction_missing = None

    def pooled(scraped: dict, tiers: set[str] | None, only: list[str]) -> list[Histogram]:
        return [h for name in only if isinstance(scraped.get(name), dict)
                for tier, h in scraped[name].items() if tiers is None or tier in tiers]

    scrape_errors = sorted({v for s in (scraped_start, scraped_mid, scraped_end) for v in s.values()
                            if isinstance(v, str)})
    standard_names = tier_names[:workers]
    admission = None if scrape_errors else {
        "workflow_phase_all_tiers": _admission(_pool(pooled(scraped_mid, None, tier_names),
                                                     pooled(scraped_start, None, tier_names))),
        "hour_phase_standard": _admission(_pool(pooled(scraped_end, {"standard"}, standard_names),
                                                pooled(scraped_mid, {"standard"}, standard_names))),
    }

    hour_counts = _answer_counts(args.requests, hour_answers)
    runaway_counts = _answer_counts(args.runaway_requests, runaway_answers)
    hour_counts["cost_events"] = sum(1 for _, c in costs if c["workflow_id"] != RUNAWAY)
    runaway_counts["cost_events"] = len(runaway_costs)
    crashed = _crashes(run_dir)
    bound = workers * args.max_concurrent_tasks * worst
    out.update({
        # Reported, not hidden: an agent crash (Faust restarts the agent) during the run.
        "agent_crashes": crashed,
        "loadavg_1_5_15_before_produce": load_before,
        "loadavg_1_5_15_after": load_after,
        "workflow_phase_s": round(runaway_answers["ended_at"] - runaway_start, 3),
        "hour_phase_s": round(hour_answers["ended_at"] - hour_start, 3),
        "hour_produce_s": round(hour_produced - hour_start, 3),
        "worst_case_per_request_usd": _usd(worst),
        "hour": {
            "limit_usd": args.limit_usd,
            "spent_usd": _usd(spent),
            "spent_workflow_phase_usd": _usd(sum(usd_to_nanos(c["cost_usd"]) for _, c in in_window
                                                 if c["workflow_id"] == RUNAWAY)),
            "spent_hour_phase_usd": _usd(sum(usd_to_nanos(c["cost_usd"]) for _, c in in_window
                                             if c["workflow_id"] != RUNAWAY)),
            "over_limit_usd": _usd(spent - limit_nanos),  # signed: below the limit is negative
            "overspend_usd": _usd(max(spent - limit_nanos, 0)),
            "overspend_calls": round(max(spent - limit_nanos, 0) / worst, 3),
            "usable_share": round(spent / limit_nanos, 4),
            "spend_crossed_limit_at": None if crossing is None
            else datetime.fromtimestamp(crossing[0], UTC).isoformat(timespec="milliseconds"),
            "limit_reached_events": len(reached),
            "limit_reached_record_time": None if event_ts is None
            else datetime.fromtimestamp(event_ts, UTC).isoformat(timespec="milliseconds"),
            "limit_reached_after_hour_phase_start_s": None if event_ts is None else round(event_ts - hour_start, 3),
            "limit_reached_spent_usd": reached[0][1].get("spent_usd") if reached else None,
            "view_hour_spent_usd": view.status()["hour_spent_usd"],
            "view_paused": view.hour_paused(),
            "old_per_process_bound_usd": _usd(bound),
        },
        "workflow": {
            "workflow_id": RUNAWAY,
            "limit_usd": args.workflow_limit_usd,
            "spent_usd": _usd(wf_spent),
            "spent_results_usd": _usd(wf_results_spent),
            "worst_case_per_request_usd": _usd(wf_worst),
            "over_limit_usd": _usd(wf_spent - wf_limit_nanos),
            "overspend_usd": _usd(max(wf_spent - wf_limit_nanos, 0)),
            "overspend_calls": round(max(wf_spent - wf_limit_nanos, 0) / wf_worst, 3),
            "used_share": round(wf_spent / wf_limit_nanos, 4),
            "view_spent_usd": None if wf_view is None else _usd(wf_view.nanos),
            "limit_reached_events": len(wf_events),
            "cost_events_by_tier": dict(Counter(c["tier"] for c in runaway_costs)),
        },
        "reaction_s": reactions,
        "reaction_missing": reaction_missing,
        "first_pause_after_hour_phase_start_s": first_pause,
        "pause_log_lines": pause_lines,
        "admission": admission,
        "admission_missing": "; ".join(scrape_errors) or None,
        "counts": {
            "workflow_phase": runaway_counts,
            "hour_phase": hour_counts,
            "cost_events": len(costs),
            "cost_events_in_window": len(in_window),
            "budget_records": budget_records,
        },
    })
    errors = []
    if len(in_window) != len(costs):
        errors.append("cost events fell in two hour windows; the spend was reset mid-run")
    if runaway_counts["statuses"].get("budget_exceeded", 0) == 0:
        errors.append(f"the runaway workflow never reached its budget (spent ${_usd(wf_spent):.6f}): "
                      "raise --runaway-requests")
    if hour_counts["results"] == 0:
        errors.append("the hour phase answered nothing")
    out["ok"] = not errors
    if errors:
        out["error"] = "; ".join(errors)
    return out


# ------------------------------------------------------------------------- summaries
def _stats(values: list[float], digits: int = 9) -> dict:
    return {
        "n": len(values),
        "mean": round(sum(values) / len(values), digits) if values else None,
        "max": max(values) if values else None,
        "min": min(values) if values else None,
    }


def summarize(repeats: list[dict], workers: int) -> dict:
    mine = [r for r in repeats if r["workers"] == workers]
    ok = [r for r in mine if r["ok"]]
    reactions = [x for r in ok for x in r["reaction_s"].values()]
    admission: dict[str, dict | None] = {}
    for phase in ("workflow_phase_all_tiers", "hour_phase_standard"):
        scraped = [r["admission"][phase]["buckets"] for r in ok if r.get("admission")]
        admission[phase] = _admission({le: float(c) for le, c in _pool(scraped).items()}) if scraped else None
        if admission[phase] is not None:
            admission[phase]["repeats"] = len(scraped)
    return {
        "workers": workers,
        "repeats": len(mine),
        "repeats_ok": len(ok),
        "hour_overspend_usd": _stats([r["hour"]["overspend_usd"] for r in ok]),
        "hour_overspend_calls": _stats([r["hour"]["overspend_calls"] for r in ok], 3),
        "worst_case_usd": {
            "hour": max((r["worst_case_per_request_usd"] for r in ok), default=None),
            "workflow": max((r["workflow"]["worst_case_per_request_usd"] for r in ok), default=None),
        },
        "workflow_overspend_usd": _stats([r["workflow"]["overspend_usd"] for r in ok]),
        "workflow_overspend_calls": _stats([r["workflow"]["overspend_calls"] for r in ok], 3),
        "hour_usable_share": _stats([r["hour"]["usable_share"] for r in ok], 4),
        "workflow_used_share": _stats([r["workflow"]["used_share"] for r in ok], 4),
        "reaction_s": distribution([x for x in reactions if x is not None]),
        "reaction_missing": sum(1 for x in reactions if x is None),
        "reaction_expected": len(reactions),
        "admission": admission,
        "old_per_process_bound_usd": max((r["hour"]["old_per_process_bound_usd"] for r in ok), default=None),
    }


# -------------------------------------------------------------------------- reporting
def _money(x: float | None, calls: float | None = None) -> str:
    if x is None:
        return "-"
    return f"${x:.6f}" + ("" if calls is None else f" ({calls:.2f})")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def print_report(console: Console, report: dict) -> None:
    cfg = report["config"]
    per = Table(title=f"Guardrail repeats: hourly limit ${cfg['limit_usd']}, workflow budget "
                      f"${cfg['workflow_limit_usd']}, {cfg['runaway_requests']} runaway + {cfg['requests']} hour "
                      f"requests, max_concurrent_tasks {cfg['max_concurrent_tasks']}, simulator "
                      f"{cfg['sim_latency_ms']} ms")
    for col in ("W", "rep", "try", "hour spent (of limit)", "hour over $ (calls)", "wf spent (of budget)",
                "wf over $ (calls)", "runaway ok/exceeded", "hour answered", "reaction s (std..., nano, prem)",
                "admit ms p50/p99", "load 1m", "status"):
        per.add_column(col, justify="left" if col.startswith(("reaction", "status")) else "right")
    for r in report["repeats"]:
        if "hour" not in r:
            per.add_row(str(r["workers"]), str(r["repeat"]), str(r["attempt"]), *["-"] * 9,
                        f"[red]{r.get('error')}[/]")
            continue
        h, w, c = r["hour"], r["workflow"], r["counts"]
        statuses = c["workflow_phase"]["statuses"]
        adm = (r.get("admission") or {}).get("hour_phase_standard")
        note = "ok" if r["ok"] else f"[red]{r.get('error')}[/]"
        if r["reaction_missing"]:
            note += f" [yellow](reaction missing: {r['reaction_missing']})[/]"
        if r["agent_crashes"]:
            note += " [yellow](agent crash, below)[/]"
        per.add_row(
            str(r["workers"]), str(r["repeat"]), str(r["attempt"]),
            f"${h['spent_usd']:.6f} ({_pct(h['usable_share'])})",
            _money(h["overspend_usd"], h["overspend_calls"]),
            f"${w['spent_usd']:.6f} ({_pct(w['used_share'])})",
            _money(w["overspend_usd"], w["overspend_calls"]),
            f"{statuses.get('ok', 0)}/{statuses.get('budget_exceeded', 0)}",
            f"{c['hour_phase']['unique_results']}/{c['hour_phase']['produced']}",
            ", ".join("-" if x is None else f"{x:.3f}" for x in r["reaction_s"].values()),
            "-" if not adm else f"{_ms(adm['p50_s'])}/{_ms(adm['p99_s'])}",
            str(r["loadavg_1_5_15_before_produce"][0]), note,
        )
    console.print(per)

    spend = Table(title="Spend per replica count W (tier:standard replicas; plus one nano and one premium process)")
    for col in ("W", "repeats ok", "hour over max $ (calls)", "hour over mean $ (calls)",
                "wf over max $ (calls)", "wf over mean $ (calls)", "hour spent/limit min", "mean", "max",
                "old per-process bound $"):
        spend.add_column(col, justify="right")
    for s in report["summary"]:
        ho, hc = s["hour_overspend_usd"], s["hour_overspend_calls"]
        wo, wc = s["workflow_overspend_usd"], s["workflow_overspend_calls"]
        share = s["hour_usable_share"]
        spend.add_row(
            str(s["workers"]), f"{s['repeats_ok']}/{s['repeats']}",
            _money(ho["max"], hc["max"]), _money(ho["mean"], hc["mean"]),
            _money(wo["max"], wc["max"]), _money(wo["mean"], wc["mean"]),
            _pct(share["min"]), _pct(share["mean"]), _pct(share["max"]),
            "-" if s["old_per_process_bound_usd"] is None else f"${s['old_per_process_bound_usd']:.4f}",
        )
    console.print(spend)

    timing = Table(title="Timing per replica count W (reaction pooled over tier workers and repeats; "
                         "admission pooled histograms)")
    for col in ("W", "reaction n", "missing", "p50 s", "p99 s", "max s", "hour admit n", "p50 ms", "p99 ms",
                "wf-phase admit n", "p50 ms", "p99 ms"):
        timing.add_column(col, justify="right")
    for s in report["summary"]:
        dist = s["reaction_s"]
        has = dist["n"] > 0
        hour_adm, wf_adm = s["admission"]["hour_phase_standard"], s["admission"]["workflow_phase_all_tiers"]
        timing.add_row(
            str(s["workers"]), str(dist["n"]), f"{s['reaction_missing']}/{s['reaction_expected']}",
            f"{dist['p50']:.3f}" if has else "-", f"{dist['p99']:.3f}" if has else "-",
            f"{dist['max']:.3f}" if has else "-",
            *(cell for a in (hour_adm, wf_adm)
              for cell in (("-", "-", "-") if not a else (str(a["calls"]), _ms(a["p50_s"]), _ms(a["p99_s"])))),
        )
    console.print(timing)
    for r in report["repeats"]:
        for crash in r.get("agent_crashes") or []:
            console.print(f"[yellow]W={r['workers']} repeat {r['repeat']}: agent crash logged during the run: "
                          f"{crash}[/]")
        if r.get("admission_missing"):
            console.print(f"[yellow]W={r['workers']} repeat {r['repeat']}: admission wait missing: "
                          f"{r['admission_missing']}[/]")
    for r in report["failed_attempts"]:
        console.print(f"[yellow]failed attempt (not a measurement; the repeat was run afresh), W={r['workers']} "
                      f"repeat {r['repeat']} attempt {r['attempt']}: {r['error']}[/]")
    worst = {kind: max((s["worst_case_usd"][kind] or 0 for s in report["summary"]), default=0)
             for kind in ("hour", "workflow")}
    console.print(
        "over = spend past the limit, 0 if within it; (calls) = in worst-case calls of one request "
        f"(hour ${worst['hour']}, workflow ${worst['workflow']}). "
        "Hour spent/limit: the share of the hourly limit the cluster could spend. Reaction: hour's limit_reached "
        "event (record time) -> each tier worker's first pause log line; missing = no event or no line. "
        "Old per-process bound: W x max_concurrent_tasks x worst case, for comparison only."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guardrails", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,3,6", help="comma-separated tier:standard replica counts W")
    parser.add_argument("--repeats", type=int, default=3, help="runs per replica count")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default benchmarks/results/guardrails-<ts>.json)")
    parser.add_argument("--limit-usd", type=float, default=0.05,
                        help="max_cost_per_hour_usd (the workflow phase spends up to --workflow-limit-usd of it)")
    parser.add_argument("--workflow-limit-usd", type=float, default=0.02,
                        help="max_cost_per_workflow_usd: the runaway workflow's budget (below --limit-usd)")
    parser.add_argument("--requests", type=int, default=300, help="standard requests of the hour phase")
    parser.add_argument("--runaway-requests", type=int, default=90,
                        help="requests of the runaway workflow (tiers nano/standard/premium in turn)")
    parser.add_argument("--max-concurrent-tasks", type=int, default=64, help="per tier worker process")
    parser.add_argument("--quiet-s", type=float, default=None,
                        help="the hour phase ends once no result came for this long (default: lease_seconds)")
    parser.add_argument("--hour-margin-s", type=float, default=150.0,
                        help="wait for the next hour window if fewer seconds than this are left")
    parser.add_argument("--retries", type=int, default=2,
                        help="run a repeat afresh (new broker and topics) up to this often if a worker's "
                             "agent crashed at start-up or the classifier's or cost role's agent crashed "
                             "during a phase; every such attempt is kept in the JSON and printed")
    parser.add_argument("--phase-timeout-s", type=float, default=180.0,
                        help="give up on a repeat if a phase is not answered (or not quiet) within this")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers: comma-separated integers, e.g. 1,3")
    if not args.workers or min(args.workers) < 1 or args.repeats < 1 or args.requests < 1:
        parser.error("--workers, --repeats and --requests must be >= 1")
    if args.runaway_requests < len(RUNAWAY_TIERS):
        parser.error(f"--runaway-requests must be >= {len(RUNAWAY_TIERS)} (one per tier)")
    if args.limit_usd <= 0 or args.max_concurrent_tasks < 1 or args.retries < 0:
        parser.error("--limit-usd must be > 0, --max-concurrent-tasks >= 1, --retries >= 0")
    if not 0 < args.workflow_limit_usd < args.limit_usd:
        parser.error("--workflow-limit-usd must be > 0 and below --limit-usd (the runaway must not spend the hour)")
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
            if "hour" in result:
                h, w = result["hour"], result["workflow"]
                err.print(f"  hour ${h['spent_usd']:.6f} of ${h['limit_usd']} ({_pct(h['usable_share'])}), "
                          f"workflow ${w['spent_usd']:.6f} of ${w['limit_usd']}, reaction s "
                          f"{list(result['reaction_s'].values())}"
                          + ("" if result["ok"] else f"; [red]failed: {result.get('error')}[/]"))
            else:
                err.print(f"  [red]failed: {result.get('error')}[/]")
    guard = load_settings().cost_guardrails
    lease_seconds = guard.lease_seconds
    report = {
        "schema": 2,
        "kind": "guardrails",
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {
            "workers": args.workers, "repeats": args.repeats, "limit_usd": args.limit_usd,
            "workflow_limit_usd": args.workflow_limit_usd,
            "alert_threshold_usd": args.limit_usd / 2, "requests": args.requests,
            "runaway_requests": args.runaway_requests, "runaway_tiers": [t.value for t in RUNAWAY_TIERS],
            "hour_workflows": WORKFLOWS, "max_output_tokens": MAX_OUTPUT_TOKENS,
            "max_concurrent_tasks": args.max_concurrent_tasks, "sim_latency_ms": SIM_LATENCY_MS,
            "quiet_s": args.quiet_s if args.quiet_s is not None else lease_seconds,
            "lease_seconds": lease_seconds, "overdraft": guard.overdraft, "hour_margin_s": args.hour_margin_s,
            "processes": "classifier, cost, W x tier:standard, tier:nano, tier:premium",
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
    out = Console(width=None if sys.stdout.isatty() else 200)  # piped: do not squeeze to 80 columns
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
