"""The ``tierstream`` command."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress

from topologies.config import ConfigError, load_settings
from topologies.topics import parse_roles, topology_of

app = typer.Typer(
    help="Tiered, cost-guarded LLM agent workloads on Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
broker_app = typer.Typer(help="A local single-node Apache Kafka broker (KRaft) for development.")
guardrail_app = typer.Typer(help="Cost guardrails: read the state, resume the hour, change limits.")
app.add_typer(guardrail_app, name="guardrail")
topics_app = typer.Typer(help="The topology's topics.")
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")
batch_app = typer.Typer(help="The batch path: requests answered through the providers' batch APIs.")
app.add_typer(batch_app, name="batch")
router_app = typer.Typer(help="The learned router: train it, and evaluate any routing strategy on labelled data.")
app.add_typer(router_app, name="router")

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML configuration (default: $TIERSTREAM_CONFIG or the packaged default)."),
]
err = Console(stderr=True)


def _settings(config: Path | None):
    try:
        return load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


@app.command()
def worker(
    roles: Annotated[str, typer.Option(help="Comma-separated: all, classifier, tiers, tier:nano, tier:standard, tier:premium.")] = "all",
    config: ConfigOption = None,
) -> None:
    """Run workers: one Faust app (and consumer group) per role, one process per role."""
    settings = _settings(config)
    try:
        role_list = parse_roles(roles)
    except ValueError as exc:
        err.print(f"[red]--roles: {exc}[/]")
        raise typer.Exit(2) from None
    # Validate everything a worker needs (prices, provider keys) before starting anything.
    from streams.pricing import PriceBook
    from streams.providers.registry import resolve_endpoint

    try:
        PriceBook(settings)
        for provider in {t.provider for t in settings.tiers.values()}:
            resolve_endpoint(settings, provider)
    except (ConfigError, ValueError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if len(role_list) == 1:
        from streams.roles import build_role
        from streams.runtime.worker import run_app

        run_app(settings, role_list[0], build_role)
    else:
        from streams.supervisor import supervise

        raise typer.Exit(supervise(role_list, config))


@app.command("provider-sim")
def provider_sim(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8700,
    host: Annotated[str, typer.Option(help="Address to bind (keep it on loopback).")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Median simulated model latency (0: answer at once).")] = 50.0,
    rpm: Annotated[Optional[int], typer.Option(help="Requests per minute per model (429 above).")] = None,
    tpm: Annotated[Optional[int], typer.Option(help="Tokens per minute per model (429 above).")] = None,
    error_rate: Annotated[float, typer.Option(help="Fraction of calls answered 500/503.")] = 0.0,
    timeout_rate: Annotated[float, typer.Option(help="Fraction of calls that hang --hang-seconds first.")] = 0.0,
    hang_seconds: Annotated[float, typer.Option(help="How long a hanging call hangs.")] = 30.0,
    burst_429_every: Annotated[Optional[float], typer.Option(help="Start a burst of 429s every this many seconds.")] = None,
    burst_429_seconds: Annotated[float, typer.Option(help="How long each 429 burst lasts.")] = 1.0,
    retry_after: Annotated[float, typer.Option(help="Retry-After (seconds) on burst 429s.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed latency and fault draws.")] = None,
) -> None:
    """Serve the OpenAI and Anthropic HTTP APIs locally, for the demo and the tests."""
    from pydantic import ValidationError

    from streams.simulator import SimulatorConfig, run

    try:
        config = SimulatorConfig(
            host=host, port=port, latency_ms_median=latency_ms, requests_per_minute=rpm,
            tokens_per_minute=tpm, error_rate=error_rate, timeout_rate=timeout_rate,
            hang_seconds=hang_seconds, burst_429_every_seconds=burst_429_every,
            burst_429_seconds=burst_429_seconds, burst_429_retry_after_seconds=retry_after, seed=seed,
        )
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            err.print(f"[red]{'.'.join(map(str, e['loc'])) or 'provider-sim'}: {e['msg']}[/]")
        raise typer.Exit(2) from None
    run(config)


@app.command()
def produce(
    count: Annotated[int, typer.Option(help="How many generated requests (ignored with --file).")] = 100,
    file: Annotated[Optional[Path], typer.Option(help="A JSON-lines file of AgentRequest objects.")] = None,
    workflows: Annotated[int, typer.Option(help="Spread generated requests over this many workflows.")] = 20,
    config: ConfigOption = None,
) -> None:
    """Write requests to the requests topic, with a progress bar."""
    from streams.client import produce_requests, read_jsonl
    from streams.workload import sample_requests

    settings = _settings(config)
    if file is not None:
        try:
            requests = list(read_jsonl(file))
        except (OSError, ValueError) as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
    else:
        requests = list(sample_requests(count, workflows=workflows))
    with Progress(console=err) as progress:
        task = progress.add_task("produced", total=len(requests))
        sent = asyncio.run(
            produce_requests(settings, requests, lambda n: progress.advance(task, n))
        )
    err.print(f"produced {sent} requests to {topology_of(settings).requests.name}")


@app.command()
def results(
    from_beginning: Annotated[bool, typer.Option(help="Read from the start instead of new messages only.")] = False,
    idle_timeout: Annotated[Optional[float], typer.Option(help="Stop after this many idle seconds.")] = None,
    raw: Annotated[bool, typer.Option(help="Print the JSON as it is on the topic.")] = False,
    config: ConfigOption = None,
) -> None:
    """Follow the results and dead-letter topics."""
    from streams.client import follow, render, result_topics

    settings = _settings(config)
    results_topic, dlq_topic = result_topics(settings)

    async def run() -> None:
        async for topic, value in follow(
            settings, [results_topic, dlq_topic], from_beginning=from_beginning, idle_timeout=idle_timeout
        ):
            kind = "result" if topic == results_topic else "dead_letter"
            print(value.decode(errors="replace") if raw else render(kind, value), flush=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


@app.command()
def demo(
    count: Annotated[int, typer.Option(help="Requests in the sample workload.")] = 300,
    latency_ms: Annotated[float, typer.Option(help="Simulated model latency.")] = 80.0,
    timeout: Annotated[float, typer.Option(help="Give up waiting for results after this many seconds.")] = 180.0,
    keep_broker: Annotated[bool, typer.Option(help="Leave the local broker running afterwards.")] = False,
    with_rate_limits: Annotated[bool, typer.Option(help="Apply the configured rate_limits (off: the pipeline at speed).")] = False,
    config: ConfigOption = None,
) -> None:
    """Start a broker, the simulator and the workers; run a sample workload; summarise it."""
    from streams.demo import demo as run_demo

    _settings(config)
    raise typer.Exit(run_demo(config, count, latency_ms, timeout, keep_broker, with_rate_limits))


# The benchmark commands hand every argument to their module's own parser (its --help
# included), so each option is defined once, next to the code that uses it.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=PASS_THROUGH)
def bench(ctx: typer.Context) -> None:
    """Throughput benchmark: tierstream against raw aiokafka baselines and the broker's own
    perf tools, in the same run (`tierstream bench --help` for its options)."""
    from benchmarks.harness import main as bench_main

    raise typer.Exit(bench_main(ctx.args))


@app.command("bench-guardrails", context_settings=PASS_THROUGH)
def bench_guardrails(ctx: typer.Context) -> None:
    """Guardrail benchmark: overspend past the hourly limit and a workflow budget per replica
    count, the usable share of the hourly limit, pause reaction and admission wait."""
    from benchmarks.guardrails import main as bench_guardrails_main

    raise typer.Exit(bench_guardrails_main(ctx.args))


@app.command("bench-ratelimit", context_settings=PASS_THROUGH)
def bench_ratelimit(ctx: typer.Context) -> None:
    """Rate-limit benchmark: utilisation and over-limit requests, cluster-wide vs naive limiter."""
    from benchmarks.ratelimit import main as bench_ratelimit_main

    raise typer.Exit(bench_ratelimit_main(ctx.args))


@app.command("bench-batch", context_settings=PASS_THROUGH)
def bench_batch(ctx: typer.Context) -> None:
    """Batch-path benchmark: cost per 1,000 requests and end-to-end latency, the same work
    answered online and through the providers' batch APIs."""
    from benchmarks.batch import main as bench_batch_main

    raise typer.Exit(bench_batch_main(ctx.args))


@app.command()
def status(
    url: Annotated[Optional[list[str]], typer.Option(help="A worker's health server, e.g. http://127.0.0.1:8080 (repeatable).")] = None,
    config: ConfigOption = None,
) -> None:
    """Client pools and rate limiters of running workers, read from their /metrics (JSON)."""
    import orjson

    from streams.ratelimit_metrics import read_status

    urls = url or [f"http://127.0.0.1:{_settings(config).worker.health_port}"]
    report = read_status(urls)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    raise typer.Exit(0 if all("error" not in w for w in report) else 1)


@topics_app.command("create")
def topics_create(config: ConfigOption = None) -> None:
    """Create every topic of the topology that does not exist yet."""
    from streams.admin import ensure_topics

    created = asyncio.run(ensure_topics(_settings(config)))
    print("created: " + (", ".join(created) if created else "nothing (all exist)"))


@topics_app.command("list")
def topics_list(config: ConfigOption = None) -> None:
    """Print the topology: topics, partitions, keys and who reads and writes what."""
    topology = topology_of(_settings(config))
    for spec in topology.all():
        extra = " compacted" if spec.compacted else ""
        print(f"{spec.name:<28} partitions={spec.partitions:<3} key={spec.key:<12} {spec.value.__name__}{extra}")
    for flow in topology.flows():
        print(f"{flow.role:<14} reads {', '.join(flow.reads)} -> writes {', '.join(flow.writes)}")


@app.command()
def acls(
    config: ConfigOption = None,
    principal: Annotated[str, typer.Option(help="Principal per role; {app_id} and {role} are filled in.")] = "User:{app_id}-{role}",
) -> None:
    """Print the least-privilege Kafka ACLs of every role as kafka-acls.sh commands."""
    from topologies.acls import acls_script

    settings = _settings(config)
    print(acls_script(topology_of(settings), settings.app_id, principal), end="")


@guardrail_app.command("status")
def guardrail_status(config: ConfigOption = None) -> None:
    """Spend this hour against its limits, the workflows out of budget, the budget leases
    outstanding per process, and the costs records the cost role has not counted (JSON)."""
    import orjson

    from streams.guardrails.operator import cost_role_backlog, read_state

    async def status() -> dict[str, object]:
        settings = _settings(config)
        view = await read_state(settings)
        # Lease requests wait among these: a backlog that does not drain means no grants.
        return {**view.status(), "cost_role_backlog": await cost_role_backlog(settings, view)}

    print(orjson.dumps(asyncio.run(status()), option=orjson.OPT_INDENT_2).decode())


@batch_app.command("status")
def batch_status(config: ConfigOption = None) -> None:
    """The open provider batches of the cluster: provider, model, items, age, state (JSON)."""
    import orjson

    from streams.batches.jobs import read_open_batches

    batches = asyncio.run(read_open_batches(_settings(config)))
    print(orjson.dumps({"open_batches": batches}, option=orjson.OPT_INDENT_2).decode())


@guardrail_app.command("resume")
def guardrail_resume(
    reason: Annotated[str, typer.Option(help="Recorded on the guardrail event.")] = "resumed by an operator",
    config: ConfigOption = None,
) -> None:
    """Resume consumption for the rest of the current hour, whatever was spent."""
    from streams.guardrails.operator import resume_hour

    event = asyncio.run(resume_hour(_settings(config), reason))
    print(f"resumed until {event.window_end:%H:%M} UTC (spent ${event.spent_usd:.4f} of ${event.limit_usd:.2f})")


@guardrail_app.command("set-limit")
def guardrail_set_limit(
    hour: Annotated[Optional[float], typer.Option(help="New max_cost_per_hour_usd.")] = None,
    workflow: Annotated[Optional[float], typer.Option(help="New max_cost_per_workflow_usd.")] = None,
    alert: Annotated[Optional[float], typer.Option(help="New alert_threshold_usd.")] = None,
    reason: Annotated[str, typer.Option(help="Recorded on the guardrail event.")] = "set by an operator",
    config: ConfigOption = None,
) -> None:
    """Change a limit for every worker, now and after restarts (until set again)."""
    from streams.guardrails.operator import set_limit

    settings = _settings(config)
    chosen = {"hour": hour, "workflow": workflow, "alert": alert}
    if all(v is None for v in chosen.values()):
        err.print("[red]give at least one of --hour, --workflow, --alert[/]")
        raise typer.Exit(2)
    for name, usd in chosen.items():
        if usd is not None:
            if usd < 0:
                err.print(f"[red]--{name}: must be >= 0[/]")
                raise typer.Exit(2)
            asyncio.run(set_limit(settings, name, usd, reason))  # type: ignore[arg-type]
            print(f"{name} limit set to ${usd:.2f}")


DataOption = Annotated[Path, typer.Option("--data", help="Labelled routing data: JSON Lines (schemas/json/routing_example.v1.json).")]


@router_app.command("train")
def router_train(
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Where to write the router file.")],
    quality_target: Annotated[float, typer.Option(help="Share of the all-top-tier quality to keep, in (0, 1].")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the fold shuffles and the estimator.")] = 0,
) -> None:
    """Train a local router (no network, no GPU, no model call per request) and pick its
    threshold for the quality target on out-of-fold predictions."""
    from streams.routing.data import RoutingDataError, load_routing_data
    from streams.routing.model import train_router

    if not 0 < quality_target <= 1:
        err.print("[red]--quality-target: must be in (0, 1][/]")
        raise typer.Exit(2)
    try:
        labelled = load_routing_data(data)
        router = train_router(labelled, quality_target, seed)
    except (RoutingDataError, ValueError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    router.save(out)
    fit = router.metadata["out_of_fold"]
    err.print(
        f"wrote {out}: {len(labelled.examples):,} examples, tiers {', '.join(t.value for t in router.tiers)}; "
        f"threshold {router.threshold:.4f} for {quality_target:.0%} of {router.top.value} quality "
        f"(out of fold: {fit['top_share']:.1%} to {router.top.value}, quality ratio {fit['quality_ratio']:.3f})"
    )


@router_app.command("eval")
def router_eval(
    data: DataOption,
    model: Annotated[Optional[Path], typer.Option("--model", help="A router file: adds the `learned` strategy, as it is.")] = None,
    cross_validate: Annotated[bool, typer.Option(help="Add `learned` trained per fold, whole `source` families held out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    save: Annotated[Optional[Path], typer.Option("--save", help="Also write the JSON object to this file.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw the curves to this PNG (matplotlib).")] = None,
    output_tokens: Annotated[int, typer.Option(help="Output tokens assumed per answer when pricing.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the fold shuffles and the estimator.")] = 0,
    config: ConfigOption = None,
) -> None:
    """Quality against top-tier share for random, rules, length, learned and oracle routing;
    costs priced with the configured tier models."""
    import orjson

    from streams.routing.data import RoutingDataError, load_routing_data
    from streams.routing.evaluate import evaluate
    from streams.routing.evaluate import plot as draw
    from streams.routing.model import RouterModelError, load_router

    settings = _settings(config)
    if model is not None and cross_validate:
        err.print("[red]give --model or --cross-validate, not both[/]")
        raise typer.Exit(2)
    try:
        labelled = load_routing_data(data)
        router = load_router(model) if model is not None else None
        evaluation = evaluate(labelled, settings, router, cross_validate, output_tokens, seed)
    except (RoutingDataError, RouterModelError, ValueError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    report = evaluation.report()
    if save is not None:
        save.write_bytes(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2) + b"\n")
    if plot is not None:
        try:
            draw(evaluation, str(plot))
        except RuntimeError as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY).decode())
        return
    _print_router_report(report)


def _print_router_report(report: dict) -> None:  # type: ignore[type-arg]
    from rich.table import Table

    top = report["top_tier"]
    quality = ", ".join(f"{tier} {q:.3f}" for tier, q in report["quality"].items())
    table = Table(title=f"{report['data']['examples']:,} prompts; mean quality: {quality}")
    for column in ("strategy", f"{top} share for 95% quality", "APGR", "CPT(50%)", "CPT(80%)",
                   f"{top} share", "quality ratio", "cost ratio"):
        table.add_column(column, justify="left" if column == "strategy" else "right")

    def num(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    for name, s in report["strategies"].items():
        op = s["operating_point"]
        table.add_row(name, num(s["premium_share_for_95pct_quality"]), num(s["apgr"]), num(s["cpt50"]),
                      num(s["cpt80"]), num(op["premium_share"]), num(op["quality_ratio"]),
                      num(op["cost_ratio"]))
    Console().print(table)
    print("The last three columns are each strategy's operating point:")
    for name, s in report["strategies"].items():
        print(f"  {name}: {s['operating_point']['how']}")
    for warning in report["warnings"]:
        err.print(f"[yellow]warning: {warning}[/]")


def _broker(port: int | None, config: Path | None):
    from streams.broker import LocalBroker

    if port is None:
        port = int(_settings(config).kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    return LocalBroker(port=port)


PortOption = Annotated[Optional[int], typer.Option(help="Broker port (default: from the config's bootstrap_servers).")]


@broker_app.command("start")
def broker_start(port: PortOption = None, config: ConfigOption = None) -> None:
    """Fetch Kafka from Maven Central if needed, format KRaft storage, start, wait until ready."""
    from streams.broker import BrokerError

    try:
        print(_broker(port, config).start())
    except BrokerError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None


@broker_app.command("stop")
def broker_stop(port: PortOption = None, config: ConfigOption = None) -> None:
    """Stop the local broker."""
    _broker(port, config).stop()


@broker_app.command("status")
def broker_status(port: PortOption = None, config: ConfigOption = None) -> None:
    """Exit 0 if the local broker is running."""
    running = _broker(port, config).status()
    print("running" if running else "stopped")
    raise typer.Exit(0 if running else 1)


def main() -> None:
    # Commands other than `worker` (which logs JSON through Faust) log plainly to stderr.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # aiokafka logs a topic that is still propagating to its metadata as an ERROR and
    # then retries; that is noise for a person watching the demo.
    logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)
    app()


if __name__ == "__main__":
    sys.exit(main())
