"""Batch-path benchmark: the same work answered online and through the batch APIs.

What it costs and how long it takes, answered online and through the providers' batch
APIs (OpenAI's Batch API, Anthropic's Message Batches API).

``python -m benchmarks.batch --requests 1000 --repeats 1`` (or ``tierstream bench-batch
...``). One pipeline, each role its own process, then per repeat two phases on fresh
workflow ids:

1. a broker: ``--bootstrap``, else ``$KAFKA_BOOTSTRAP_SERVERS``, else a local KRaft broker
   on free ports (stopped at the end);
2. the provider simulator in a subprocess, started as ``python -c`` on
   ``streams.simulator.run(SimulatorConfig(...))`` (``tierstream provider-sim`` has no
   option for it) with ``batch_delay_seconds`` = ``--batch-delay-seconds`` (a simulated
   batch ends that long after its creation) and ``--sim-latency-ms`` per online call;
3. an isolated topology (its own topic prefix and app id) and six worker processes:
   ``classifier``, ``cost``, ``tier:nano``, ``tier:standard``, ``tier:premium`` and
   ``batch`` (``batch.max_age_seconds`` = ``--max-age-seconds``, ``batch.poll_seconds`` =
   ``--poll-seconds``); rate limits off and the cost guardrails far above what a run
   spends (so that neither paces nor refuses a call); wait until every role's consumer
   group is Stable;
4. the online phase: ``--requests`` requests, ``latency_class: interactive``, produced in
   one burst to the requests topic; their ``tier_hint`` cycles nano/standard/premium (in
   the default configuration openai gpt-4o-mini, anthropic claude-sonnet-4-6, openai o3:
   both providers); wait until each is answered (a result or a dead letter), then
   ``--settle-s`` more to catch duplicates;
5. the batch phase: the same prompts, tiers and ``max_output_tokens``,
   ``latency_class: batch``, new request and workflow ids; the same wait.

Per phase: requests answered, ``answered_by`` counts, total cost (the sum of the results'
``cost_usd``, one per request; the cost events on the costs topic are summed too, as a
check), cost per 1,000 answered requests, end-to-end latency (the result's
``timings.finished_at`` minus the request's ``created_at``, both stamped on this machine;
also, as ``read_s``, the time this benchmark read the result minus ``created_at``), the
provider batches used (distinct ``batch_id`` of the results, and batches the simulator
created during the phase), and, per repeat, the ratio batch / online of the cost per
1,000. Nothing is assumed: the ratio is of measured sums, and each batch request is also
compared with its online twin (same prompt and tier).

Prints a table and writes every figure, the machine and the worker logs' warnings to
``benchmarks/results/batch-<ts>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.table import Table

from benchmarks.harness import RESULTS_DIR, machine_info
from benchmarks.measure import distribution
from benchmarks.topic_io import produce_requests, read_to_end
from schemas.codec import is_cost_event
from schemas.models import AgentRequest, Tier
from streams import processes
from streams.admin import ensure_topics, wait_for_roles
from streams.kafka_security import aiokafka_kwargs
from topologies.config import Settings, load_settings
from topologies.topics import topology_of

PHASES = ("online", "batch")
LATENCY_CLASS = {"online": "interactive", "batch": "batch"}
TIERS = (Tier.NANO, Tier.STANDARD, Tier.PREMIUM)
AGENT_TYPE = "writer"  # min_tier nano: every tier_hint is kept
ROLES = ("classifier", "cost", "tier:nano", "tier:standard", "tier:premium", "batch")
STARTUP_GRACE_S = 2.0
LOG_EXCERPTS = 8  # warning/error lines kept per worker log
# The simulator, in a process of its own, with the batch delay set (the CLI has no option).
SIM_CODE = (
    "import sys\n"
    "from streams.simulator import SimulatorConfig, run\n"
    "run(SimulatorConfig.model_validate_json(sys.argv[1]))\n"
)
DEFINITIONS = {
    "answered": "distinct request ids of the phase with a result or a dead letter",
    "cost_usd": "sum of cost_usd over the phase's results, the first result of each request id",
    "costs_topic_usd": "sum of cost_usd over the costs topic's cost events (budget lease records skipped) of "
                       "the phase's request ids, read after the last phase: a check of cost_usd",
    "cost_per_1000_usd": "cost_usd / results (first per request id) x 1000",
    "latency_s": "result timings.finished_at minus the request's created_at (set by this benchmark just before "
                 "it produced the burst), first result per request id; same clock",
    "read_s": "time this benchmark's consumer read the result minus the request's created_at",
    "classified_to_started_s": "result timings.started_at - classified_at: online, the wait in the tier worker; "
                               "batch, the wait in the batch role until its batch was recorded as submitted "
                               "(started_at is the job's submitted_at)",
    "started_to_finished_s": "result timings.finished_at - started_at: online, the model call; batch, from "
                             "submission to the answer being written (batch delay + polling)",
    "makespan_s": "from the start of the phase's burst to the last answer read",
    "provider_batches": "distinct batch_id values of the phase's results",
    "sim": "simulator /stats difference over the phase: online calls, batches created and batch items "
           "submitted, per API",
    "cost_ratio": "batch cost_per_1000_usd / online cost_per_1000_usd of the same repeat",
    "pairs": "each batch request against its online twin (same prompt, tier, max_output_tokens): how many had "
             "the same tokens, and min/max of batch cost_usd / online cost_usd",
}


# --------------------------------------------------------------------------- requests
def _requests(phase: str, repeat: int, count: int, workflows: int, max_output_tokens: int) -> list[AgentRequest]:
    """The phase's burst. Prompts, tiers and max_output_tokens depend on ``n`` only, so the
    two phases ask for the same work; ids and workflows are new for each phase."""
    created = datetime.now(UTC)
    return [
        AgentRequest(
            request_id=f"{phase}-r{repeat}-{n}", workflow_id=f"{phase}-r{repeat}-wf{n % workflows}",
            agent_type=AGENT_TYPE, task=f"Summarise backlog item {n} and list its open questions.",
            max_output_tokens=max_output_tokens, tier_hint=TIERS[n % len(TIERS)],
            latency_class=LATENCY_CLASS[phase],  # type: ignore[arg-type]
            created_at=created,
        )
        for n in range(count)
    ]


def _twin(request_id: str) -> str:
    """The online request of a batch request's prompt."""
    return "online-" + request_id.removeprefix("batch-")


# --------------------------------------------------------------------------- kafka io
async def _await_answers(
    settings: Settings, ids: set[str], *, settle_s: float, timeout: float, check: Callable[[], None]
) -> dict:
    """Results and dead letters of ``ids``, read from the start of their topics, until every
    one is answered and ``settle_s`` more seconds passed (duplicates would show then)."""
    topology = topology_of(settings)
    consumer = AIOKafkaConsumer(
        topology.results.name, topology.dead_letters.name, group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False, **aiokafka_kwargs(settings.kafka),
    )
    results: list[tuple[float, dict]] = []
    dead_letters: list[dict] = []
    answered: set[str] = set()
    last_at: float | None = None
    await consumer.start()
    started = time.monotonic()
    try:
        settle_until: float | None = None
        while settle_until is None or time.monotonic() < settle_until:
            batch = await consumer.getmany(timeout_ms=250)
            read_at = time.time()
            for records in batch.values():
                for record in records:
                    value = orjson.loads(record.value)
                    if value.get("request_id") not in ids:
                        continue
                    if record.topic == topology.results.name:
                        results.append((read_at, value))
                    else:
                        dead_letters.append(value)
                    if value["request_id"] not in answered:
                        answered.add(value["request_id"])
                        last_at = read_at
            check()
            if settle_until is None and answered >= ids:
                settle_until = time.monotonic() + settle_s
            if settle_until is None and time.monotonic() - started > timeout:
                raise TimeoutError(f"{len(answered)} of {len(ids)} requests answered after {timeout:.0f} s")
    finally:
        await consumer.stop()
    return {"results": results, "dead_letters": dead_letters, "last_answer_at": last_at}


# --------------------------------------------------------------------------- simulator
def _start_simulator(port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    from streams.simulator import SimulatorConfig

    config = SimulatorConfig(port=port, latency_ms_median=args.sim_latency_ms,
                             batch_delay_seconds=args.batch_delay_seconds)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", SIM_CODE, config.model_dump_json()],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _sim_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return orjson.loads(response.read())


def _sim_delta(before: dict, after: dict) -> dict:
    def diff(a: dict, b: dict) -> dict:
        return {k: v - a.get(k, 0) for k, v in b.items() if v - a.get(k, 0)}

    return {
        "online_calls": after["requests_total"] - before["requests_total"],
        "online_calls_by_api": diff(before["by_api"], after["by_api"]),
        "batches_created": diff(before["batches"]["created"], after["batches"]["created"]),
        "batch_items_submitted": diff(before["batches"]["items_submitted"], after["batches"]["items_submitted"]),
        "batches_rejected": diff(before["batches"]["rejected"], after["batches"]["rejected"]),
    }


# --------------------------------------------------------------------------- logs, processes
def _log_findings(log: Path) -> dict:
    """Warning and error lines of a worker log (JSON lines; other lines counted as 'other')."""
    levels: Counter[str] = Counter()
    excerpts: list[str] = []
    crashes = 0
    if not log.exists():
        return {"levels": {}, "excerpts": [], "agent_crashes": 0}
    for line in log.read_text(errors="replace").splitlines():
        if "Crashed reason=" in line:
            crashes += 1
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            level = str(entry.get("level", "?")).lower()
            text = f"{entry.get('ts', '?')} {level} {entry.get('logger', '')}: {entry.get('msg', '')}"
        else:
            lowered = line.lower()
            level = next((lv for lv in ("critical", "error", "warning") if lv in lowered), "other")
            text = line
        if level in ("warning", "error", "critical"):
            levels[level] += 1
            if len(excerpts) < LOG_EXCERPTS:
                excerpts.append(text[:400])
    return {"levels": dict(levels), "excerpts": excerpts, "agent_crashes": crashes}


# --------------------------------------------------------------------------- measuring
def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _usd(x: Decimal) -> float:
    return float(round(x, 9))


def _phase_figures(phase: str, requests: list[AgentRequest], answers: dict, started: float, sim: dict) -> dict:
    created = {r.request_id: r.created_at.timestamp() for r in requests}
    first: dict[str, tuple[float, dict]] = {}
    for read_at, result in answers["results"]:
        first.setdefault(result["request_id"], (read_at, result))
    ids = [r["request_id"] for _, r in answers["results"]]
    dead_ids = {d["request_id"] for d in answers["dead_letters"]}
    unique = [r for _, r in first.values()]
    cost = sum((Decimal(str(r.get("cost_usd", 0))) for r in unique), Decimal(0))
    latency = [_seconds(r["timings"]["finished_at"]) - created[r["request_id"]] for r in unique]
    read = [read_at - created[r["request_id"]] for read_at, r in first.values()]
    timings = [r["timings"] for r in unique]
    waited = [_seconds(t["started_at"]) - _seconds(t["classified_at"]) for t in timings]
    served = [_seconds(t["finished_at"]) - _seconds(t["started_at"]) for t in timings]
    last = answers["last_answer_at"]
    return {
        "phase": phase,
        "latency_class": LATENCY_CLASS[phase],
        "produced": len(requests),
        "answered": len(set(first) | dead_ids),
        "unanswered": len(requests) - len(set(first) | dead_ids),
        "results": len(ids),
        "unique_results": len(first),
        "duplicates": len(ids) - len(first),
        "dead_letters": len(answers["dead_letters"]),
        "dead_letter_codes": dict(Counter(str(d.get("code")) for d in answers["dead_letters"])),
        "statuses": dict(Counter(str(r.get("status")) for r in unique)),
        "answered_by": dict(Counter(str(r.get("answered_by", "online")) for r in unique)),
        "providers": dict(Counter(str(r.get("provider")) for r in unique)),
        "tiers": dict(Counter(str(r.get("tier")) for r in unique)),
        "input_tokens": sum(int(r.get("input_tokens", 0)) for r in unique),
        "output_tokens": sum(int(r.get("output_tokens", 0)) for r in unique),
        "cost_usd": _usd(cost),
        "cost_per_1000_usd": _usd(cost / len(first) * 1000) if first else None,
        "latency_s": distribution(latency),
        "read_s": distribution(read),
        "classified_to_started_s": distribution(waited),
        "started_to_finished_s": distribution(served),
        "makespan_s": None if last is None else round(last - started, 3),
        "provider_batches": len({r["batch_id"] for r in unique if r.get("batch_id")}),
        "provider_batches_by_provider": dict(Counter(
            p for p, _ in {(r.get("provider"), r["batch_id"]) for r in unique if r.get("batch_id")})),
        "sim": sim,
        "_by_id": {r["request_id"]: r for r in unique},
    }


def _pairs(online: dict, batch: dict) -> dict:
    """Each batch result against its online twin's."""
    same_tokens, ratios = 0, []
    compared = 0
    for rid, b in batch["_by_id"].items():
        o = online["_by_id"].get(_twin(rid))
        if o is None:
            continue
        compared += 1
        if (o.get("input_tokens"), o.get("output_tokens")) == (b.get("input_tokens"), b.get("output_tokens")):
            same_tokens += 1
        if o.get("cost_usd"):
            ratios.append(Decimal(str(b.get("cost_usd", 0))) / Decimal(str(o["cost_usd"])))
    return {
        "compared": compared,
        "same_tokens": same_tokens,
        "cost_ratio_min": float(round(min(ratios), 6)) if ratios else None,
        "cost_ratio_max": float(round(max(ratios), 6)) if ratios else None,
    }


# --------------------------------------------------------------------------- the run
def run(args: argparse.Namespace, logs: Path, console: Console) -> dict:
    from streams.broker import LocalBroker, free_ports

    out: dict = {"ok": False, "repeats": []}
    external = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    started = time.monotonic()
    names: list[str] = []
    stop_codes: list[int | None] = []
    costs: list[dict] = []
    with contextlib.ExitStack() as cleanup:
        try:
            if external:
                bootstrap = external
            else:
                broker = LocalBroker.on_free_ports(data_dir=logs / "kafka")
                cleanup.callback(broker.stop)
                bootstrap = broker.start(timeout=120)
            out["broker_ready_s"] = round(time.monotonic() - started, 2)
            (sim_port,) = free_ports(1)
            sim = _start_simulator(sim_port, args, logs / "simulator.log")
            cleanup.callback(processes.stop, sim)
            processes.wait_http_ok(f"http://127.0.0.1:{sim_port}/health", 30, sim)

            run_id = uuid.uuid4().hex[:10]
            env = {
                "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "TIERSTREAM__KAFKA__TOPIC_PREFIX": f"bb{run_id}",
                "TIERSTREAM__APP_ID": f"bb-{run_id}",
                **processes.simulator_env(sim_port),
                "TIERSTREAM__WORKER__HEALTH_PORT": "0",  # six workers on one host: free ports
                "TIERSTREAM__RATE_LIMITS": "null",
                "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_HOUR_USD": "100000",
                "TIERSTREAM__COST_GUARDRAILS__ALERT_THRESHOLD_USD": "100000",
                "TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD": "100000",
                "TIERSTREAM__BATCH__MAX_AGE_SECONDS": str(args.max_age_seconds),
                "TIERSTREAM__BATCH__POLL_SECONDS": str(args.poll_seconds),
                **({"TIERSTREAM__BATCH__MAX_ITEMS": str(args.max_items)} if args.max_items else {}),
            }
            settings = load_settings(environ={**os.environ, **env})  # what the workers see
            out["topic_prefix"] = settings.kafka.topic_prefix
            out["batch_settings"] = settings.batch.model_dump(mode="json")
            out["tiers"] = {t.value: f"{c.provider}/{c.model}" for t, c in settings.tiers.items()}
            asyncio.run(ensure_topics(settings))
            names = [spec.replace(":", "-") for spec in ROLES]
            procs = [
                processes.spawn(["worker", "--roles", spec], env, logs / f"worker-{name}.log")
                for spec, name in zip(ROLES, names, strict=True)
            ]
            cleanup.callback(lambda: stop_codes.extend(processes.stop_all(procs)))

            def check_alive() -> None:
                dead = [n for n, p in zip(names, procs, strict=True) if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"worker(s) exited early: {dead}; logs in {logs}")

            asyncio.run(wait_for_roles(settings, names, timeout=180))
            check_alive()
            time.sleep(STARTUP_GRACE_S)
            out["startup_ready_s"] = round(time.monotonic() - started, 2)

            for repeat in range(1, args.repeats + 1):
                figures: dict[str, dict] = {}
                for phase in PHASES:
                    console.print(f"repeat {repeat}/{args.repeats}: {phase} phase, {args.requests} requests ...")
                    before = _sim_stats(sim_port)
                    load = [round(x, 2) for x in os.getloadavg()]
                    requests = _requests(phase, repeat, args.requests, args.workflows, args.max_output_tokens)
                    t0 = time.time()
                    asyncio.run(produce_requests(settings, [
                        (r.workflow_id.encode(), r.model_dump_json(exclude_none=True).encode()) for r in requests
                    ]))
                    produced_s = time.time() - t0
                    answers = asyncio.run(_await_answers(
                        settings, {r.request_id for r in requests}, settle_s=args.settle_s,
                        timeout=args.phase_timeout_s, check=check_alive,
                    ))
                    figures[phase] = _phase_figures(phase, requests, answers, t0, _sim_delta(before, _sim_stats(sim_port)))
                    figures[phase]["produce_s"] = round(produced_s, 3)
                    figures[phase]["loadavg_1_5_15_before"] = load
                    f = figures[phase]
                    console.print(f"  answered {f['answered']}/{f['produced']}, ${f['cost_usd']:.7f}, "
                                  f"latency p50 {f['latency_s']['p50']:.3f} s p99 {f['latency_s']['p99']:.3f} s, "
                                  f"provider batches {f['provider_batches']}")
                online, batch = figures["online"], figures["batch"]
                ratio = None
                if online["cost_per_1000_usd"] and batch["cost_per_1000_usd"] is not None:
                    ratio = round(batch["cost_per_1000_usd"] / online["cost_per_1000_usd"], 6)
                out["repeats"].append({"repeat": repeat, "phases": figures, "cost_ratio": ratio,
                                       "pairs": _pairs(online, batch)})
            costs = [orjson.loads(value) for _at, value in asyncio.run(read_to_end(settings, topology_of(settings).costs.name))
                     if value is not None and is_cost_event(value)]
            out["sim_stats_end"] = _sim_stats(sim_port)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON, the run fails
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()
        # leaving the ExitStack stops the workers (their logs are complete), the simulator and the broker
    out["worker_exit_codes"] = dict(zip(names, stop_codes, strict=False))
    out["logs"] = {path.stem: _log_findings(path) for path in sorted(logs.glob("*.log"))}

    by_request: dict[str, Decimal] = {}
    events: Counter[str] = Counter()
    for c in costs:
        by_request[c["request_id"]] = by_request.get(c["request_id"], Decimal(0)) + Decimal(str(c["cost_usd"]))
        events[c["request_id"]] += 1
    errors = [out["error"]] if "error" in out else []
    for r in out["repeats"]:
        for phase, f in r["phases"].items():
            ids = list(f.pop("_by_id"))
            f["cost_events"] = sum(events[i] for i in ids)
            f["costs_topic_usd"] = _usd(sum((by_request.get(i, Decimal(0)) for i in ids), Decimal(0)))
            if f["unanswered"] or f["duplicates"] or f["dead_letters"]:
                errors.append(f"repeat {r['repeat']} {phase}: {f['unanswered']} unanswered, "
                              f"{f['duplicates']} duplicates, {f['dead_letters']} dead letters")
        if r["phases"]["batch"]["answered_by"] != {"batch": r["phases"]["batch"]["unique_results"]}:
            errors.append(f"repeat {r['repeat']}: batch phase answered_by {r['phases']['batch']['answered_by']}")
    crashes = {name: f["agent_crashes"] for name, f in out["logs"].items() if f["agent_crashes"]}
    if crashes:
        errors.append(f"agent crashes logged: {crashes}")
    out["ok"] = not errors and bool(out["repeats"])
    if errors:
        out["errors"] = errors
    return out


def _summary(repeats: list[dict]) -> dict:
    """Per phase over every repeat: sums, and latencies pooled (their distributions are
    not kept per request, so the pooled p50/p99 is the mean of the repeats' when >1)."""
    summary: dict[str, dict] = {}
    for phase in PHASES:
        fs = [r["phases"][phase] for r in repeats]
        answered = sum(f["unique_results"] for f in fs)
        cost = sum(Decimal(str(f["cost_usd"])) for f in fs)
        summary[phase] = {
            "repeats": len(fs),
            "answered": answered,
            "cost_usd": _usd(cost),
            "cost_per_1000_usd": _usd(cost / answered * 1000) if answered else None,
            "latency_p50_s_mean": round(sum(f["latency_s"]["p50"] for f in fs) / len(fs), 3) if fs else None,
            "latency_p99_s_mean": round(sum(f["latency_s"]["p99"] for f in fs) / len(fs), 3) if fs else None,
        }
    ratios = [r["cost_ratio"] for r in repeats if r["cost_ratio"] is not None]
    summary["cost_ratio"] = {"per_repeat": ratios, "min": min(ratios, default=None), "max": max(ratios, default=None)}
    return summary


# --------------------------------------------------------------------------- reporting
def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


def print_report(console: Console, report: dict) -> None:
    cfg = report["config"]
    table = Table(title=f"Batch path vs online: {cfg['requests']} requests a phase, tiers nano/standard/premium, "
                        f"max_output_tokens {cfg['max_output_tokens']}; simulator {cfg['sim_latency_ms']} ms a call, "
                        f"batches end {cfg['batch_delay_seconds']} s after creation; batch role max_age "
                        f"{cfg['max_age_seconds']} s, poll {cfg['poll_seconds']} s")
    for col in ("rep", "phase", "answered", "answered_by", "providers", "provider batches",
                "cost $", "$ / 1,000", "latency p50 s", "p99 s", "makespan s"):
        table.add_column(col, justify="left" if col in ("phase", "answered_by", "providers") else "right")
    for r in report["run"]["repeats"]:
        for phase in PHASES:
            f = r["phases"][phase]
            batches = f["provider_batches"]
            sim_batches = sum(f["sim"]["batches_created"].values())
            table.add_row(
                str(r["repeat"]), phase, f"{f['answered']}/{f['produced']}", _counts(f["answered_by"]),
                _counts(f["providers"]),
                f"{batches} ({_counts(f['provider_batches_by_provider'])})" if batches or sim_batches else "0",
                f"{f['cost_usd']:.7f}", f"{f['cost_per_1000_usd']:.7f}" if f["cost_per_1000_usd"] else "-",
                f"{f['latency_s']['p50']:.3f}", f"{f['latency_s']['p99']:.3f}",
                "-" if f["makespan_s"] is None else f"{f['makespan_s']:.2f}",
            )
        table.add_row(str(r["repeat"]), "[bold]batch / online[/]", "", "", "", "", "",
                      "-" if r["cost_ratio"] is None else f"[bold]{r['cost_ratio']:.4f}[/]", "", "", "")
    console.print(table)
    for r in report["run"]["repeats"]:
        p = r["pairs"]
        console.print(f"repeat {r['repeat']}: {p['compared']} batch requests against their online twins: "
                      f"{p['same_tokens']} same tokens, cost ratio min {p['cost_ratio_min']} max {p['cost_ratio_max']}; "
                      f"costs topic ${r['phases']['online']['costs_topic_usd']:.7f} online, "
                      f"${r['phases']['batch']['costs_topic_usd']:.7f} batch")
    for r in report["run"]["repeats"]:
        for phase in PHASES:
            f = r["phases"][phase]
            wait, served = f["classified_to_started_s"], f["started_to_finished_s"]
            console.print(f"repeat {r['repeat']} {phase}: classified -> started p50 {wait['p50']:.3f} s, max "
                          f"{wait['max']:.3f} s; started -> finished p50 {served['p50']:.3f} s, max {served['max']:.3f} s")
    console.print("latency = result timings.finished_at - request created_at (same host clock); cost = sum of the "
                  "results' cost_usd; $ / 1,000 = per 1,000 answered requests; provider batches = distinct "
                  "batch_id of the results")
    for name, f in report["run"]["logs"].items():
        if f["levels"] or f["agent_crashes"]:
            console.print(f"[yellow]{name}: {_counts(f['levels'])}, agent crashes {f['agent_crashes']}[/]")
            for line in f["excerpts"][:3]:
                console.print(f"    {line[:200]}", markup=False)
    codes = report["run"].get("worker_exit_codes") or {}
    if any(c not in (0, None) for c in codes.values()):
        console.print(f"[yellow]worker exit codes on SIGTERM: {codes}[/]")
    for error in report["run"].get("errors", []):
        console.print(f"[red]{error}[/]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="requests per phase")
    p.add_argument("--repeats", type=int, default=1, help="online + batch phase pairs on the same pipeline")
    p.add_argument("--batch-delay-seconds", type=float, default=2.0,
                   help="simulator: a batch ends this long after its creation")
    p.add_argument("--max-age-seconds", type=float, default=5.0,
                   help="batch role: a batch is submitted at most this long after its first request")
    p.add_argument("--poll-seconds", type=float, default=1.0, help="batch role: how often open batches are polled")
    p.add_argument("--max-items", type=int, default=None, help="batch role: requests per batch (default: config)")
    p.add_argument("--sim-latency-ms", type=float, default=50.0, help="simulator: median latency of an online call")
    p.add_argument("--max-output-tokens", type=int, default=200)
    p.add_argument("--workflows", type=int, default=50, help="workflows per phase")
    p.add_argument("--settle-s", type=float, default=2.0, help="read this long after the last answer (duplicates)")
    p.add_argument("--phase-timeout-s", type=float, default=300.0)
    p.add_argument("--bootstrap", default=None,
                   help="an external broker (default: $KAFKA_BOOTSTRAP_SERVERS, else a local one)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/batch-<ts>.json)")
    args = p.parse_args(argv)
    if args.requests < len(TIERS) or args.repeats < 1 or args.workflows < 1:
        p.error(f"--requests must be >= {len(TIERS)}, --repeats and --workflows >= 1")
    if args.max_age_seconds <= 0 or args.poll_seconds <= 0 or args.batch_delay_seconds < 0:
        p.error("--max-age-seconds and --poll-seconds must be > 0, --batch-delay-seconds >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True)
    external = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    started_at = datetime.now(UTC)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    logs = Path(tempfile.mkdtemp(prefix="tierstream-bench-batch-"))
    err.print(f"broker: {'external ' + external if external else 'local'}; logs in {logs}; "
              f"load average {load_at_start}")
    result = run(args, logs, err)
    report = {
        "schema": 1,
        "kind": "batch",
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "command": " ".join(["python -m benchmarks.batch", *(sys.argv[1:] if argv is None else argv)]),
        "config": {
            "requests": args.requests, "repeats": args.repeats, "tier_hints": [t.value for t in TIERS],
            "agent_type": AGENT_TYPE, "workflows_per_phase": args.workflows,
            "max_output_tokens": args.max_output_tokens, "sim_latency_ms": args.sim_latency_ms,
            "batch_delay_seconds": args.batch_delay_seconds, "max_age_seconds": args.max_age_seconds,
            "poll_seconds": args.poll_seconds, "max_items": args.max_items, "settle_s": args.settle_s,
            "processes": ", ".join(ROLES) + " (one process each)",
            "simulator": "subprocess: python -c streams.simulator.run(SimulatorConfig(batch_delay_seconds=...))",
            "broker": "external" if external else "local",
            "rate_limits": None, "cost_guardrails": "limits 100000 USD (never bind)",
        },
        "definitions": DEFINITIONS,
        "machine": {
            **machine_info(bool(external)),
            "loadavg_1_5_15_at_start": load_at_start,
            "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "summary": _summary(result["repeats"]) if result["repeats"] else None,
        "run": result,
        "log_dir": str(logs),
    }
    output = args.output or RESULTS_DIR / f"batch-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    out = Console(width=None if sys.stdout.isatty() else 220)  # piped: do not squeeze to 80 columns
    if result["repeats"]:
        print_report(out, report)
    else:
        out.print(f"[red]no measurement: {result.get('error')}[/]")
    machine = report["machine"]
    out.print(f"machine: {machine['nproc']} cores, {machine['memory_gb']} GB, Python {machine['python']}, "
              f"Kafka {machine['kafka']}; load average at start {machine['loadavg_1_5_15_at_start']}, "
              f"at end {machine['loadavg_1_5_15_at_end']}")
    out.print(f"results: {output}; worker logs: {logs}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)
    sys.exit(main())
