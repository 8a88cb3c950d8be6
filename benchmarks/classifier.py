"""The classifier role's own cost: CPU per request of each routing strategy.

``python -m benchmarks.classifier [--data FILE] [--requests N] [--batch 256]`` runs the
classifier's batch handler (decode, classify, context-window check, encode) in this
process on one core, over the sample workload's requests and, with ``--data``, over the
prompts of a labelled routing file, for ``rules`` and ``learned`` alike. It reports
requests per CPU-second and the CPU ``learned`` adds per request over ``rules``. Kafka is
left out on purpose: it is the same for every strategy, and ``tierstream bench`` measures
the role with it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

import orjson

from schemas.codec import encode
from schemas.models import AgentRequest
from streams.envelope import Source
from streams.pricing import PriceBook
from streams.roles.classifier import Classifier, ClassifierHandler
from streams.routing.data import load_routing_data
from streams.workload import sample_requests
from topologies.config import load_settings
from topologies.topics import topology_of


def _sources(requests: Sequence[AgentRequest], topic: str) -> list[Source]:
    return [Source(topic, 0, i, r.workflow_id.encode(), encode(r)) for i, r in enumerate(requests)]


def _prompts_as_requests(path: str, count: int) -> list[AgentRequest]:
    data = load_routing_data(path)
    requests = []
    for i in range(count):
        example = data.examples[i % len(data.examples)]
        requests.append(AgentRequest(request_id=f"d-{i}", workflow_id=f"wf-{i % 50}",
                                     agent_type=example.agent_type or "writer", task=example.text()))
    return requests


def measure(strategy: str, sources: list[Source], batch: int, rounds: int) -> dict[str, float]:
    settings = load_settings(environ={"TIERSTREAM__CLASSIFIER__STRATEGY": strategy})
    handler = ClassifierHandler(settings, topology_of(settings), Classifier(settings, None), PriceBook(settings))

    async def run() -> None:
        for start in range(0, len(sources), batch):
            await handler.handle_batch(sources[start : start + batch])

    asyncio.run(run())  # warm-up: imports, caches, first model pass
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        asyncio.run(run())
        best = min(best, time.process_time() - started)
    return {"cpu_ms_per_request": best * 1000 / len(sources), "requests_per_cpu_second": len(sources) / best}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="A labelled routing file whose prompts are classified too.")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=256, help="classifier.batch_size")
    parser.add_argument("--rounds", type=int, default=3, help="The best of this many rounds counts.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    topic = "agent.requests"
    workloads = {"sample workload": _sources(list(sample_requests(args.requests)), topic)}
    if args.data:
        workloads[args.data] = _sources(_prompts_as_requests(args.data, args.requests), topic)
    report = {}
    for name, sources in workloads.items():
        rules = measure("rules", sources, args.batch, args.rounds)
        learned = measure("learned", sources, args.batch, args.rounds)
        report[name] = {
            "requests": len(sources), "batch": args.batch, "rules": rules, "learned": learned,
            "learned_adds_cpu_ms_per_request": learned["cpu_ms_per_request"] - rules["cpu_ms_per_request"],
        }
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"{'workload':<36}{'strategy':>9}{'CPU ms/request':>16}{'requests/CPU-s':>16}")
    for name, row in report.items():
        for strategy in ("rules", "learned"):
            figures = row[strategy]
            print(f"{name:<36}{strategy:>9}{figures['cpu_ms_per_request']:>16.3f}{figures['requests_per_cpu_second']:>16,.0f}")
        print(f"{'':<36}{'learned adds':>9}{row['learned_adds_cpu_ms_per_request']:>16.3f} ms/request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
