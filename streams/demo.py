"""``tierstream demo``: broker, simulator and workers started for you, a sample workload
through the whole pipeline, and a summary you can read."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.codec import DecodeError, decode
from schemas.models import AgentResult, DeadLetter
from streams import processes
from streams.admin import ensure_topics, wait_for_roles
from streams.client import follow, produce_requests, result_topics
from streams.summary import RunSummary, percentile
from streams.workload import sample_requests
from topologies.config import Settings, load_settings
from topologies.topics import ALL_ROLES


async def run_workload(
    settings: Settings, count: int, timeout: float, console: Console | None = None
) -> RunSummary:
    """Produce ``count`` sample requests and collect their results and dead letters."""
    run_id = uuid.uuid4().hex[:8]
    requests = list(sample_requests(count, run_id=run_id))
    wanted = {r.request_id for r in requests}
    summary = RunSummary(produced=count)
    results_topic, dlq_topic = result_topics(settings)
    ready = asyncio.Event()
    progress = Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=console is None,
    )

    async def collect() -> None:
        async for topic, value in follow(settings, [results_topic, dlq_topic], ready=ready):
            try:
                if topic == results_topic:
                    result = decode(value, AgentResult)
                    if result.request_id in wanted:
                        summary.add_result(result)
                else:
                    letter = decode(value, DeadLetter)
                    if letter.request_id in wanted:
                        summary.dead_letters.append(letter)
            except DecodeError:
                continue
            progress.update(answered, completed=len(summary.results) + len(summary.dead_letters))
            if len(summary.results) + len(summary.dead_letters) >= count:
                return

    with progress:
        produced = progress.add_task("produced", total=count)
        answered = progress.add_task("answered", total=count)
        start = time.monotonic()
        collector = asyncio.create_task(collect())
        await asyncio.wait_for(ready.wait(), 60)
        await produce_requests(settings, requests, lambda n: progress.advance(produced, n))
        try:
            await asyncio.wait_for(collector, timeout)
        except TimeoutError:
            pass
        summary.elapsed_s = time.monotonic() - start
    return summary


def print_pacing(console: Console, summary: RunSummary, settings: Settings) -> None:
    """What held the requests back before their model call, per agent type: with rate
    limits on, the limited types wait for permits; without, only for the tier queue."""
    table = Table(title="Waiting before the model call, by agent type")
    for column in ("agent type", "rate limit", "requests", "wait p50 ms", "wait max ms", "waited s"):
        table.add_column(column, justify="left" if column in ("agent type", "rate limit") else "right")
    for agent_type, waits in sorted(summary.waits_before_call_ms().items()):
        limit = settings.rate_limits.get(agent_type)
        held = f"{limit.requests_per_minute}/min, burst {limit.burst}" if limit else "none"
        table.add_row(agent_type, held, str(len(waits)), f"{percentile(waits, 50):.0f}",
                      f"{percentile(waits, 100):.0f}", f"{sum(waits) / 1000:.1f}")
    console.print(table)
    if settings.rate_limits:
        console.print("rate limits on: the agent types with a limit waited for permits; the "
                      "run's length is set by those limits, not by the pipeline")
    else:
        console.print("rate limits off: the pipeline at speed (--with-rate-limits applies the "
                      "configured rate_limits)")


def print_summary(console: Console, summary: RunSummary) -> None:
    table = Table(title="Requests by tier")
    for column in ("tier", "requests", "model", "input tok", "output tok", "cost USD"):
        table.add_column(column, justify="right" if column not in ("tier", "model") else "left", no_wrap=True)
    for tier, f in summary.by_tier.items():
        models = ", ".join(sorted(m.split("/", 1)[1] for m in f.models)) or "-"
        table.add_row(tier.value, str(f.requests), models, f"{f.input_tokens:,}",
                      f"{f.output_tokens:,}", f"{f.cost_usd:.4f}")
    console.print(table)
    e2e, model = summary.end_to_end_ms(), summary.model_ms()
    lat = Table(title="Latency (ms)")
    for column in ("", "p50", "p95", "p99", "max"):
        lat.add_column(column, justify="right")
    for name, values in (("end to end", e2e), ("model call", model)):
        lat.add_row(name, *(f"{percentile(values, q):.0f}" for q in (50, 95, 99, 100)))
    console.print(lat)
    statuses = ", ".join(f"{k}={v}" for k, v in sorted(summary.statuses.items())) or "none"
    console.print(
        f"produced {summary.produced}, results {len(summary.results)} ({statuses}), "
        f"dead letters {len(summary.dead_letters)}, lost {summary.lost}, "
        f"duplicates {summary.duplicates}, in {summary.elapsed_s:.1f}s; "
        f"total cost ${summary.total_cost_usd:.4f}"
    )
    for letter in summary.dead_letters[:5]:
        console.print(f"  dead letter {letter.request_id}: {letter.code}: {letter.reason}")


def demo(
    config_path: Path | None, count: int, latency_ms: float, timeout: float, keep_broker: bool,
    with_rate_limits: bool = False,
) -> int:
    from streams.broker import LocalBroker

    console = Console()
    settings = load_settings(config_path)
    logs = Path(tempfile.mkdtemp(prefix="tierstream-demo-"))
    with ExitStack() as cleanup:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = LocalBroker(port=int(settings.kafka.bootstrap_servers.rsplit(":", 1)[1]))
            console.print(f"[bold]broker[/]: starting Apache Kafka (KRaft) on {broker.bootstrap_servers} ...")
            bootstrap = broker.start()
            if broker.reused:
                console.print("[bold]broker[/]: already running; it is left running afterwards")
            elif not keep_broker:
                cleanup.callback(broker.stop)
        env = {"TIERSTREAM__KAFKA__BOOTSTRAP_SERVERS": bootstrap}
        if not with_rate_limits:
            env["TIERSTREAM__RATE_LIMITS"] = "null"
        settings = load_settings(config_path, environ={**os.environ, **env})

        sim_port = settings.simulator.port
        console.print(f"[bold]simulator[/]: OpenAI + Anthropic APIs on 127.0.0.1:{sim_port}, "
                      f"~{latency_ms:.0f} ms per call")
        sim = processes.spawn(
            ["provider-sim", "--port", str(sim_port), "--latency-ms", str(latency_ms)],
            env, logs / "simulator.log",
        )
        cleanup.callback(processes.stop, sim)
        processes.wait_http_ok(f"http://127.0.0.1:{sim_port}/health", 30, sim)

        created = asyncio.run(ensure_topics(settings))
        if created:
            console.print(f"[bold]topics[/]: created {', '.join(created)}")
        console.print(f"[bold]workers[/]: {', '.join(ALL_ROLES)}, one process each")
        args = ["worker", "--roles", "all"] + (["--config", str(config_path)] if config_path else [])
        worker = processes.spawn(args, env, logs / "worker.log")
        cleanup.callback(processes.stop, worker)
        # Produce once every role holds its partitions, so latencies measure the pipeline,
        # not the workers' start-up.
        asyncio.run(wait_for_roles(settings, list(ALL_ROLES), timeout=120))

        console.print(f"[bold]workload[/]: {count} requests across "
                      f"{len(settings.agent_types)} agent types")
        summary = asyncio.run(run_workload(settings, count, timeout, console))
        print_summary(console, summary)
        print_pacing(console, summary, settings)
        console.print(f"logs: {logs}")
        if worker.poll() is not None:
            console.print(f"[red]the worker exited early with {worker.returncode}[/]")
            return 1
        ok = summary.lost == 0 and summary.duplicates == 0
        return 0 if ok else 1
    return 1



