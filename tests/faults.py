"""Fault runs against a real broker: kill workers mid-run and count what comes out.

Used by ``tests/test_faults_e2e.py`` at a small size, and runnable by hand at any size::

    python -m tests.faults kill-loop --requests 20000 --workers 3 --kill-every 5

A kill loop starts ``--workers`` processes (``tierstream worker``, every role), produces
the requests over ``--produce-over`` seconds, and every ``--kill-every`` seconds (once the
last restarted worker is up again) SIGKILLs one worker's whole process group (round
robin) and starts it again, until every request has an answer (a result or a dead
letter) or the timeout passes; then it waits a session timeout for late duplicates and
checks that the cost role's totals equal the sum of the cost events. It prints, and
returns, produced / results / dead letters / duplicates / lost / elapsed / kills.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

from schemas.codec import is_cost_event
from streams import processes
from streams.admin import ensure_topics
from streams.broker import LocalBroker
from streams.guardrails.money import hour_window, usd_to_nanos
from streams.guardrails.operator import read_state
from tests.support import Pipeline, WaitTimeout, new_pipeline, produce_raw, read_to_end, wait_until
from topologies.topics import ALL_ROLES

TIERS = ("nano", "standard", "premium")


@dataclass
class Report:
    produced: int
    results: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    lost: int = 0
    kills: int = 0
    elapsed_s: float = 0.0
    cost_events: int = 0
    costs_exact: bool = False
    cost_mismatch: dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        return (f"produced {self.produced}, results {self.results}, dead letters {self.dead_letters}, "
                f"duplicates {self.duplicates}, lost {self.lost}, kills {self.kills}, "
                f"elapsed {self.elapsed_s:.1f}s, cost events {self.cost_events}, "
                f"cost totals exact {self.costs_exact}")


def requests(count: int) -> list[tuple[bytes, bytes]]:
    return [
        (f"wf-{n % 50}".encode(), orjson.dumps({
            "request_id": f"f-{n}", "workflow_id": f"wf-{n % 50}", "agent_type": "writer",
            "task": f"Write line {n}.", "max_output_tokens": 24, "tier_hint": TIERS[n % 3],
        }))
        for n in range(count)
    ]


class Answers:
    """Follows the results and dead-letter topics, counting each request_id."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.ids: Counter[str] = Counter()
        self.results = 0
        self.dead_letters = 0
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Answers:
        topology = self.pipeline.topology
        self._consumer = AIOKafkaConsumer(
            topology.results.name, topology.dead_letters.name, group_id=None,
            auto_offset_reset="earliest", enable_auto_commit=False, **self.pipeline.kafka_kwargs(),
        )
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def poll(self) -> None:
        assert self._consumer is not None
        results = self.pipeline.topology.results.name
        for records in (await self._consumer.getmany(timeout_ms=200)).values():
            for record in records:
                item = orjson.loads(record.value)
                self.ids[item.get("request_id") or f"dlq-{record.offset}"] += 1
                if record.topic == results:
                    self.results += 1
                else:
                    self.dead_letters += 1


async def cost_truth(pipeline: Pipeline) -> tuple[int, Counter[str], Counter[int]]:
    """Every cost event on the topic: (count, nanos by workflow, nanos by hour window)."""
    by_workflow: Counter[str] = Counter()
    by_hour: Counter[int] = Counter()
    records = [r for r in await read_to_end(pipeline, pipeline.topology.costs.name) if is_cost_event(r.value)]
    for record in records:
        cost = orjson.loads(record.value)
        by_workflow[cost["workflow_id"]] += usd_to_nanos(cost["cost_usd"])
        by_hour[hour_window(record.timestamp / 1000)] += usd_to_nanos(cost["cost_usd"])
    return len(records), by_workflow, by_hour


async def costs_exact(pipeline: Pipeline, timeout: float) -> tuple[int, bool, dict[str, object]]:
    """Whether the cost role's published totals equal the cost events, polled until the
    deadline (the cost role may still be catching up). Returns (events, exact, last seen)."""
    count, by_workflow, by_hour = await cost_truth(pipeline)

    async def differences() -> dict[str, object]:
        view = await read_state(pipeline.settings)
        workflows = {wf: (t.nanos if (t := view.workflow_spend(wf)) else 0) for wf in by_workflow}
        hours = {w: view.hour_spend(w) for w in by_hour}
        if workflows == dict(by_workflow) and hours == dict(by_hour):
            return {}
        differ = {wf: (workflows[wf], by_workflow[wf]) for wf in by_workflow if workflows[wf] != by_workflow[wf]}
        return {"workflows (cost role, cost events)": differ,
                "hours (cost role, cost events)": {str(w): (hours[w], by_hour[w]) for w in by_hour}}

    try:
        await wait_until(differences, timeout, "the cost role's totals to equal the cost events",
                         accept=lambda differ: not differ, interval=1.0)
    except WaitTimeout as timed_out:
        last = dict(timed_out.last)
        last["cost role lag by partition"] = await pipeline.committed_lag("cost", pipeline.topology.costs.name)
        last["cost role warnings"] = cost_role_warnings(pipeline.log_dir)
        return count, False, last
    return count, True, {}


def cost_role_warnings(log_dir: Path, limit: int = 30) -> list[str]:
    """The cost roles' warnings and errors (heartbeats aside), oldest first, so that a
    failure seen only in CI's output says what the cost roles went through."""
    found: list[tuple[str, str]] = []
    for path in sorted(log_dir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("role") != "cost":
                continue
            ts, msg = str(record.get("ts")), str(record.get("msg"))
            if record.get("level") in ("warning", "error", "critical") and "Heartbeat" not in msg:
                found.append((ts, f"{path.stem} {ts} {msg[:200]}"))
    return [text for _, text in sorted(found)[-limit:]]


def _ready_roles(log_path: Path) -> int:
    """How many of a worker's roles have said they are ready (Faust logs it per role)."""
    return log_path.read_text(errors="replace").count("[^Worker]: Ready") if log_path.exists() else 0


async def _wait_ready(log_path: Path, timeout: float) -> None:
    await wait_until(lambda: _ready_roles(log_path), timeout, f"every role ready in {log_path}",
                     accept=lambda ready: ready >= len(ALL_ROLES), interval=0.5)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and, under `--roles all`, its children
    except ProcessLookupError:
        pass
    proc.wait()


async def produce_over(pipeline: Pipeline, messages: list[tuple[bytes, bytes]], seconds: float) -> None:
    """Produce in 20 equal batches spread over ``seconds``, so that kills land mid-stream."""
    steps = 20
    size = -(-len(messages) // steps)
    for i in range(steps):
        batch = messages[i * size:(i + 1) * size]
        if batch:
            await produce_raw(pipeline.settings.kafka.bootstrap_servers, pipeline.topology.requests.name, batch)
        await asyncio.sleep(seconds / steps)  # pacing the producer, not waiting for a condition


async def kill_loop(
    pipeline: Pipeline, count: int, workers: int = 3, kill_every: float = 5.0, timeout: float = 600.0,
    produce_over_s: float = 60.0, settle: float | None = None, log: Callable[[str], None] = print,
) -> Report:
    report = Report(produced=count)
    await ensure_topics(pipeline.settings)
    logs = [pipeline.log_dir / f"worker-{i}.log" for i in range(workers)]
    pipeline.workers.extend(processes.spawn(["worker", "--roles", "all"], pipeline.env, path) for path in logs)
    for path in logs:
        await _wait_ready(path, timeout=240)
    started = time.monotonic()
    producing = asyncio.create_task(produce_over(pipeline, requests(count), produce_over_s))
    next_kill, victim, restarted = time.monotonic() + kill_every, 0, None
    async with Answers(pipeline) as answers:
        deadline = time.monotonic() + timeout
        while (len(answers.ids) < count or not producing.done()) and time.monotonic() < deadline:
            await answers.poll()
            # The next kill waits for the last restarted worker to be up: killing workers
            # faster than they start tests nothing but start-up.
            if time.monotonic() >= next_kill and (restarted is None or _ready_roles(restarted) >= len(ALL_ROLES)):
                index = victim % workers
                _kill_group(pipeline.workers[index])
                restarted = pipeline.log_dir / f"worker-{index}-restart-{report.kills}.log"
                pipeline.workers[index] = processes.spawn(["worker", "--roles", "all"], pipeline.env, restarted)
                report.kills += 1
                victim += 1
                next_kill = time.monotonic() + kill_every
                log(f"  kill {report.kills}: worker {index}; answered {len(answers.ids)}/{count}")
        report.elapsed_s = time.monotonic() - started
        await producing  # raises if producing failed
        await _settle(pipeline, answers, settle)
    return await _finish(pipeline, report, answers)


async def _settle(pipeline: Pipeline, answers: Answers, seconds: float | None = None) -> None:
    """A duplicate comes, if at all, from a partition moving after a fault: keep reading
    for a session timeout (and a margin), unless told otherwise."""
    if seconds is None:
        seconds = pipeline.settings.worker.session_timeout_seconds + 10
    settle_until = time.monotonic() + seconds
    while time.monotonic() < settle_until:
        await answers.poll()


async def _finish(pipeline: Pipeline, report: Report, answers: Answers) -> Report:
    """Fill in the counts from what was read, and check the cost role's totals."""
    report.results, report.dead_letters = answers.results, answers.dead_letters
    report.duplicates = sum(n - 1 for n in answers.ids.values())
    report.lost = len({f"f-{n}" for n in range(report.produced)} - set(answers.ids))
    report.cost_events, report.costs_exact, report.cost_mismatch = await costs_exact(pipeline, timeout=120)
    return report


async def broker_restart(
    pipeline: Pipeline, broker: LocalBroker, count: int, down_s: float = 10.0, timeout: float = 600.0,
    log: Callable[[str], None] = print,
) -> Report:
    """One worker (every role) answers a burst of requests; once some are answered the
    broker is stopped for ``down_s`` seconds and started again on the same port and data."""
    report = Report(produced=count)
    await ensure_topics(pipeline.settings)
    path = pipeline.log_dir / "worker-0.log"
    pipeline.workers.append(processes.spawn(["worker", "--roles", "all"], pipeline.env, path))
    await _wait_ready(path, timeout=240)
    started = time.monotonic()
    await produce_raw(pipeline.settings.kafka.bootstrap_servers, pipeline.topology.requests.name, requests(count))
    async with Answers(pipeline) as answers:

        async def answered() -> int:
            await answers.poll()
            return len(answers.ids)

        answered_before = await wait_until(answered, timeout, "a first answer before the broker stop", interval=0)
    await asyncio.to_thread(broker.stop)
    log(f"  broker stopped with {answered_before}/{count} answered; down for {down_s:.0f}s")
    await asyncio.sleep(down_s)  # the outage itself
    await asyncio.to_thread(broker.start, 120)
    log("  broker started again")
    async with Answers(pipeline) as answers:
        deadline = started + timeout
        while len(answers.ids) < count and time.monotonic() < deadline:
            await answers.poll()
            pipeline.assert_workers_alive()
        report.elapsed_s = time.monotonic() - started
        await _settle(pipeline, answers)
    return await _finish(pipeline, report, answers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    loop = sub.add_parser("kill-loop", help="SIGKILL and restart workers while requests flow")
    loop.add_argument("--requests", type=int, default=20_000)
    loop.add_argument("--workers", type=int, default=3)
    loop.add_argument("--kill-every", type=float, default=5.0)
    loop.add_argument("--timeout", type=float, default=1800.0)
    loop.add_argument("--produce-over", type=float, default=120.0, help="seconds over which the requests are produced")
    loop.add_argument("--latency-ms", type=float, default=5.0)
    loop.add_argument("--keep", type=Path, default=None, metavar="DIR",
                      help="run in DIR and keep it (broker data, worker logs); default: a temporary directory")
    args = parser.parse_args(argv)

    from streams.broker import LocalBroker, free_ports

    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(
        prefix="tierstream-faults-"
    ) as tmp:
        work = Path(tmp)
        broker = None
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = LocalBroker.on_free_ports(data_dir=work / "kafka")
            bootstrap = broker.start(timeout=120)
        (port,) = free_ports(1)
        sim = processes.spawn(["provider-sim", "--port", str(port), "--latency-ms", str(args.latency_ms)],
                              log_path=work / "simulator.log")
        pipeline = new_pipeline(bootstrap, port, work)
        try:
            processes.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, sim)
            print(f"kill loop: {args.requests} requests, {args.workers} workers, a SIGKILL every {args.kill_every}s")
            report = asyncio.run(kill_loop(
                pipeline, args.requests, args.workers, args.kill_every, args.timeout, args.produce_over
            ))
        finally:
            pipeline.stop_workers()
            processes.stop(sim)
            if broker is not None:
                broker.stop()
        print(report.line())
        print(orjson.dumps(asdict(report)).decode())
        ok = report.lost == 0 and report.duplicates == 0 and report.costs_exact
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
