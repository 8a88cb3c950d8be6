"""Throughput benchmark: tierstream against a raw aiokafka baseline, in the same run.

``python -m benchmarks.harness --requests 20000 --workers 1 --latency-ms 0`` (or
``tierstream bench ...``):

1. a broker: ``$KAFKA_BOOTSTRAP_SERVERS``, else a local KRaft broker on free ports;
2. the provider simulator as a subprocess (``--latency-ms`` median; 0 answers at once);
3. for each pipeline, in turn, on its own topics and consumer groups:

   * ``tierstream``: N x ``tierstream worker --roles all`` (Faust, one process per role);
   * ``raw-fake``: N x the four roles as plain aiokafka loops that make NO model call
     (a local fake completion of the simulator's shape), see :mod:`benchmarks.baseline`;
   * ``raw-sdk``: the same loops calling the simulator through the same SDK clients;

   wait until every role's consumer group is Stable, produce the workload in one burst
   (aiokafka, each request stamped as it is sent) and measure from the consumer side;
4. print a table, write every figure and the machine to ``benchmarks/results/<ts>.json``,
   and with ``--compare old.json`` print the ratios to a saved run.

All requests are produced in one burst, so latencies include queueing: they describe
this burst, not a service level at a given arrival rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.measure import drive, figures
from benchmarks.procstats import TreeSampler
from streams import processes
from streams.admin import ensure_topics, wait_for_roles
from topologies.config import load_settings
from topologies.topics import ALL_ROLES, COST_ROLE

# The raw baselines do the request path only; tierstream's cost role is part of its figures.
BASELINE_ROLES = [role for role in ALL_ROLES if role != COST_ROLE]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PIPELINES = ("tierstream", "raw-fake", "raw-sdk")
DESCRIPTIONS = {
    "tierstream": "Faust workers (tierstream worker --roles all), model called via SDKs -> simulator",
    "raw-fake": "plain aiokafka, same handlers, NO model call (fake completion, no HTTP, no SDK)",
    "raw-sdk": "plain aiokafka, same handlers, model called via the same SDK clients -> simulator",
}
NOTES = [
    "raw-fake skips the HTTP model call: tierstream/raw-fake includes the SDK + simulator cost, not only Faust's.",
    "tierstream/raw-sdk compares like with like (same SDK calls to the same simulator): it isolates the Faust overhead.",
    "raw-sdk/raw-fake is the cost of the SDK + simulator round trip in the plain aiokafka pipeline.",
    "All requests are produced in one burst; latencies include queueing behind the burst.",
    "The simulator shares the machine's cores with the workers and the broker.",
]


def kafka_version(bootstrap_external: bool) -> str:
    if bootstrap_external:
        return "unknown (external cluster from KAFKA_BOOTSTRAP_SERVERS)"
    script = (Path(__file__).resolve().parents[1] / "deploy" / "local" / "kafka.sh").read_text()
    default = next(
        (ln.split("=", 1)[1].strip('"') for ln in script.splitlines() if ln.startswith("DEFAULT_KAFKA_VERSION=")),
        "unknown",
    )
    return os.environ.get("KAFKA_VERSION", default)


def machine_info(external: bool) -> dict[str, object]:
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu_model = ""
    with contextlib.suppress(OSError):
        cpu_model = next(
            (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
            "",
        )
    versions = {}
    for dist in ("tierstream", "faust-streaming", "aiokafka", "openai", "anthropic", "httpx", "orjson", "pydantic"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(mem_kb / 1024 / 1024, 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kafka": kafka_version(external),
        "packages": versions,
    }


def _spawn_pipeline(kind: str, workers: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for w in range(workers):
        if kind == "tierstream":
            procs.append(processes.spawn(["worker", "--roles", "all"], env, logs / f"{kind}-worker{w}.log"))
            continue
        mode = kind.split("-", 1)[1]
        for role in BASELINE_ROLES:
            out = open(logs / f"{kind}-{role}-{w}.log", "ab")  # noqa: SIM115 - owned by the child
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.baseline", "--role", role, "--mode", mode],
                    env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            )
            out.close()
    return procs


def run_pipeline(
    kind: str, bootstrap: str, sim_port: int, sim_pid: int, args: argparse.Namespace,
    logs: Path, progress: Progress, stoppers: list[threading.Thread],
) -> dict[str, object]:
    run = uuid.uuid4().hex[:8]
    env = {
        "TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TIERSTREAM__KAFKA__TOPIC_PREFIX": f"bench{run}-{kind}",
        "TIERSTREAM__APP_ID": f"bench{run}-{kind}",
        "TIERSTREAM__SIMULATOR__PORT": str(sim_port),
        "TIERSTREAM__PROVIDERS__OPENAI__USE_SIMULATOR": "always",
        "TIERSTREAM__PROVIDERS__ANTHROPIC__USE_SIMULATOR": "always",
        "TIERSTREAM__WORKER__LOG_LEVEL": "warning",
        "TIERSTREAM__RATE_LIMITS": "null",  # throughput, not the rate limiter (bench-ratelimit)
    }
    settings = load_settings(environ={**os.environ, **env})
    asyncio.run(ensure_topics(settings))
    started = time.monotonic()
    procs = _spawn_pipeline(kind, args.workers, env, logs)
    try:
        def check_alive() -> None:
            dead = [p.args for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{kind}: process(es) exited early: {dead}; logs in {logs}")

        roles = list(ALL_ROLES) if kind == "tierstream" else BASELINE_ROLES
        asyncio.run(wait_for_roles(settings, roles, timeout=180, members=args.workers))
        ready_s = time.monotonic() - started
        for stopper in stoppers:  # the previous pipeline is gone before measuring this one
            stopper.join()
        check_alive()
        workers = TreeSampler([p.pid for p in procs])
        simulator = TreeSampler([sim_pid])
        produced = progress.add_task(f"{kind} produced", total=args.requests)
        answered = progress.add_task(f"{kind} answered", total=args.requests)

        def complete() -> None:
            workers.sample()
            simulator.sample()

        workers.sample()
        simulator.sample()
        seen = asyncio.run(
            drive(
                settings, args.requests, args.timeout,
                on_produced=lambda n: progress.advance(produced, n),
                on_answered=lambda n: progress.update(answered, completed=n),
                on_complete=complete,
                check_alive=check_alive,
            )
        )
        if seen.answered < args.requests:  # timed out: measure up to now
            complete()
        out = figures(seen, args.requests)
        out["description"] = DESCRIPTIONS[kind]
        out["startup_ready_s"] = round(ready_s, 3)
        out["resources"] = {"workers": workers.figures(), "simulator": simulator.figures()}
        cpu = out["resources"]["workers"]["cpu_s"]  # type: ignore[index]
        results = out["counts"]["results"]  # type: ignore[index]
        out["resources"]["workers"]["cpu_ms_per_result"] = round(cpu * 1000 / results, 3) if results else None  # type: ignore[index]
        out["topic_prefix"] = env["TIERSTREAM__KAFKA__TOPIC_PREFIX"]
        return out
    finally:
        # Stop in the background: the next pipeline's start-up (not measured) may overlap
        # this shutdown; its measurement starts only once all its roles are ready.
        for p in procs:
            stopper = threading.Thread(target=processes.stop, args=(p,), daemon=True)
            stopper.start()
            stoppers.append(stopper)


def _ratio(a: object, b: object) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 4)
    return None


def ratios(pipelines: dict[str, dict]) -> dict[str, float | None]:
    def rps(kind: str) -> object:
        return pipelines.get(kind, {}).get("throughput", {}).get("results_per_s")

    return {
        "tierstream_over_raw_fake": _ratio(rps("tierstream"), rps("raw-fake")),
        "tierstream_over_raw_sdk": _ratio(rps("tierstream"), rps("raw-sdk")),
        "raw_sdk_over_raw_fake": _ratio(rps("raw-sdk"), rps("raw-fake")),
    }


def print_report(console: Console, report: dict) -> None:
    table = Table(title=f"{report['config']['requests']} requests, {report['config']['workers']} worker(s), "
                        f"simulated latency {report['config']['latency_ms']} ms")
    table.add_column("figure")
    kinds = list(report["pipelines"])
    for kind in kinds:
        table.add_column(kind, justify="right")
    rows: list[tuple[str, callable]] = [
        ("throughput results/s", lambda p: p["throughput"]["results_per_s"]),
        ("first->last answer s", lambda p: p["throughput"]["first_to_last_s"]),
        ("produce->last answer s", lambda p: p["throughput"]["produce_start_to_last_s"]),
        ("produce rate msg/s", lambda p: p["throughput"]["produce_per_s"]),
        ("e2e p50 ms", lambda p: p["latency_ms"]["end_to_end"]["p50"]),
        ("e2e p95 ms", lambda p: p["latency_ms"]["end_to_end"]["p95"]),
        ("e2e p99 ms", lambda p: p["latency_ms"]["end_to_end"]["p99"]),
        ("recv-produce p50 ms", lambda p: p["latency_ms"]["receive_minus_produce"]["p50"]),
        ("recv-produce p95 ms", lambda p: p["latency_ms"]["receive_minus_produce"]["p95"]),
        ("recv-produce p99 ms", lambda p: p["latency_ms"]["receive_minus_produce"]["p99"]),
        ("model p50 ms", lambda p: p["latency_ms"]["model"]["p50"]),
        ("model p99 ms", lambda p: p["latency_ms"]["model"]["p99"]),
        ("produced", lambda p: p["counts"]["produced"]),
        ("results", lambda p: p["counts"]["results"]),
        ("dead letters", lambda p: p["counts"]["dead_letters"]),
        ("duplicates", lambda p: p["counts"]["duplicates"]),
        ("lost", lambda p: p["counts"]["lost"]),
        ("worker processes", lambda p: p["resources"]["workers"]["processes"]),
        ("worker CPU s", lambda p: p["resources"]["workers"]["cpu_s"]),
        ("worker CPU ms/result", lambda p: p["resources"]["workers"]["cpu_ms_per_result"]),
        ("worker peak RSS MB (sum)", lambda p: p["resources"]["workers"]["peak_rss_mb_sum"]),
        ("simulator CPU s", lambda p: p["resources"]["simulator"]["cpu_s"]),
        ("startup to ready s", lambda p: p["startup_ready_s"]),
    ]
    for name, get in rows:
        table.add_row(name, *(str(get(report["pipelines"][k])) for k in kinds))
    console.print(table)
    r = report["ratios"]
    console.print(f"tierstream / raw-fake (baseline makes NO model call; ratio includes SDK+simulator cost): "
                  f"{r['tierstream_over_raw_fake']}")
    console.print(f"tierstream / raw-sdk  (both call the simulator through the SDKs; Faust overhead): "
                  f"{r['tierstream_over_raw_sdk']}")
    console.print(f"raw-sdk / raw-fake    (SDK + simulator cost without Faust): {r['raw_sdk_over_raw_fake']}")


COMPARED = (
    ("results_per_s", ("throughput", "results_per_s")),
    ("e2e_p50_ms", ("latency_ms", "end_to_end", "p50")),
    ("e2e_p99_ms", ("latency_ms", "end_to_end", "p99")),
    ("recv_p99_ms", ("latency_ms", "receive_minus_produce", "p99")),
    ("worker_cpu_s", ("resources", "workers", "cpu_s")),
    ("worker_peak_rss_mb_sum", ("resources", "workers", "peak_rss_mb_sum")),
)


def compare(current: dict, saved: dict) -> dict[str, dict[str, dict[str, object]]]:
    out: dict[str, dict[str, dict[str, object]]] = {}
    for kind, now in current["pipelines"].items():
        then = saved.get("pipelines", {}).get(kind)
        if then is None:
            continue
        out[kind] = {}
        for name, path in COMPARED:
            a, b = now, then
            for key in path:
                a = a.get(key) if isinstance(a, dict) else None
                b = b.get(key) if isinstance(b, dict) else None
            out[kind][name] = {"now": a, "saved": b, "ratio": _ratio(a, b)}
    return out


def print_compare(console: Console, diff: dict, saved_path: Path) -> None:
    table = Table(title=f"compared with {saved_path} (ratio = now / saved)")
    for column in ("pipeline", "figure", "now", "saved", "ratio"):
        table.add_column(column, justify="left" if column in ("pipeline", "figure") else "right")
    for kind, rows in diff.items():
        for name, row in rows.items():
            table.add_row(kind, name, str(row["now"]), str(row["saved"]), str(row["ratio"]))
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=1, help="worker sets per pipeline")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="simulator median latency (0: at once)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/<ts>.json)")
    parser.add_argument("--compare", type=Path, default=None, help="a saved run's JSON to print ratios against")
    parser.add_argument("--timeout", type=float, default=900.0, help="per pipeline, seconds to wait for answers")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated subset of {','.join(PIPELINES)}")
    args = parser.parse_args(argv)
    args.pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = [p for p in args.pipelines if p not in PIPELINES]
    if unknown or args.requests < 1 or args.workers < 1:
        parser.error(f"bad --pipelines {unknown}" if unknown else "--requests and --workers must be >= 1")
    return args


def run(args: argparse.Namespace, console: Console | None = None) -> dict:
    from streams.broker import LocalBroker, free_ports

    console = console or Console(stderr=True)
    started_at = datetime.now(UTC)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    logs = Path(tempfile.mkdtemp(prefix="tierstream-bench-"))
    external = bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    with contextlib.ExitStack() as cleanup:
        if external:
            bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        else:
            broker = LocalBroker.on_free_ports(data_dir=logs / "kafka")
            console.print(f"broker: starting Apache Kafka (KRaft) on {broker.bootstrap_servers} ...")
            bootstrap = broker.start(timeout=120)
            cleanup.callback(broker.stop)
        console.print(f"broker: {bootstrap}")
        (sim_port,) = free_ports(1)
        sim = processes.spawn(
            ["provider-sim", "--port", str(sim_port), "--latency-ms", str(args.latency_ms)],
            log_path=logs / "simulator.log",
        )
        cleanup.callback(processes.stop, sim)
        processes.wait_http_ok(f"http://127.0.0.1:{sim_port}/health", 30, sim)
        console.print(f"simulator: 127.0.0.1:{sim_port}, median latency {args.latency_ms} ms; logs in {logs}")
        pipelines: dict[str, dict] = {}
        progress = Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        )
        stoppers: list[threading.Thread] = []
        try:
            with progress:
                for kind in args.pipelines:
                    pipelines[kind] = run_pipeline(kind, bootstrap, sim_port, sim.pid, args, logs, progress, stoppers)
        finally:
            for stopper in stoppers:
                stopper.join()
    report = {
        "schema": 1,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {
            "requests": args.requests, "workers": args.workers, "latency_ms": args.latency_ms,
            "timeout_s": args.timeout, "pipelines": args.pipelines,
            "broker": "external" if external else "local (started by the harness)",
        },
        "machine": {
            **machine_info(external),
            # Other processes on the machine skew every figure; the load average shows it.
            "loadavg_1_5_15_at_start": load_at_start,
            "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "pipelines": pipelines,
        "ratios": ratios(pipelines),
        "notes": NOTES,
        "logs": str(logs),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    report = run(args, console)
    if args.compare is not None:
        saved = orjson.loads(args.compare.read_bytes())
        report["compare"] = {"file": str(args.compare), "figures": compare(report, saved)}
    output = args.output or RESULTS_DIR / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    out = Console()
    print_report(out, report)
    if args.compare is not None:
        print_compare(out, report["compare"]["figures"], args.compare)
        keys = ("requests", "workers", "latency_ms")
        then = saved.get("config", {})
        if any(then.get(k) != report["config"][k] for k in keys):
            out.print(f"[yellow]warning: the saved run used {[then.get(k) for k in keys]}, this one "
                      f"{[report['config'][k] for k in keys]} (requests, workers, latency_ms)[/]")
    machine = report["machine"]
    out.print(f"machine: {machine['nproc']} cores, {machine['memory_gb']} GB, Python {machine['python']}, "
              f"Kafka {machine['kafka']}; load average at start {machine['loadavg_1_5_15_at_start']}, "
              f"at end {machine['loadavg_1_5_15_at_end']}")
    out.print(f"results: {output}")
    counts_ok = all(
        p["counts"]["lost"] == 0 and p["counts"]["duplicates"] == 0 for p in report["pipelines"].values()
    )
    return 0 if counts_ok else 1


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)
    sys.exit(main())
