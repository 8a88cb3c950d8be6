"""Drive one pipeline with a workload and measure it from the consumer side."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.codec import encode
from streams.kafka_security import aiokafka_kwargs
from streams.summary import percentile
from streams.workload import sample_requests
from topologies.config import Settings
from topologies.topics import topology_of


def _parse_ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def distribution(values: list[float]) -> dict[str, float | int]:
    """p50/p95/p99/max/mean (nearest rank, as the demo's summary), in the values' unit."""
    if not values:
        return {"n": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
        "mean": round(sum(values) / len(values), 3),
    }


@dataclass
class Observed:
    produced: int = 0
    sent_at: dict[str, float] = field(default_factory=dict)
    produce_start: float = 0.0
    produce_end: float = 0.0
    result_ids: set[str] = field(default_factory=set)
    dead_letter_ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    foreign: int = 0
    first_at: float | None = None
    last_at: float | None = None
    e2e_ms: list[float] = field(default_factory=list)
    receive_ms: list[float] = field(default_factory=list)
    model_ms: list[float] = field(default_factory=list)
    budget_wait_ms: list[float] = field(default_factory=list)
    # where the overhead goes: created -> classified (the classifier hop), classified ->
    # started (the tier topic and the tier worker's queue)
    classifier_hop_ms: list[float] = field(default_factory=list)
    tier_wait_ms: list[float] = field(default_factory=list)
    # (started_at, finished_at) of each answered model call, worker clock, epoch seconds
    call_spans: list[tuple[float, float]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    dead_letter_codes: dict[str, int] = field(default_factory=dict)

    @property
    def answered(self) -> int:
        return len(self.result_ids) + len(self.dead_letter_ids)


async def drive(
    settings: Settings,
    count: int,
    timeout: float,
    *,
    on_produced: Callable[[int], None] = lambda n: None,
    on_answered: Callable[[int], None] = lambda n: None,
    on_complete: Callable[[], None] = lambda: None,
    check_alive: Callable[[], None] = lambda: None,
    settle: float = 2.0,
    rate: float | None = None,
) -> Observed:
    """Produce ``count`` sample requests, in one burst or at ``rate`` a second, and read
    results and dead letters until each request is answered (then ``settle`` seconds more,
    to catch duplicates) or ``timeout`` seconds pass. ``on_complete`` runs the moment the
    last answer arrives."""
    topology = topology_of(settings)
    results_topic, dlq_topic = topology.results.name, topology.dead_letters.name
    run_id = uuid.uuid4().hex[:8]
    requests = list(sample_requests(count, run_id=run_id))
    seen = Observed()

    consumer = AIOKafkaConsumer(
        results_topic, dlq_topic,
        group_id=None, enable_auto_commit=False, auto_offset_reset="latest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **aiokafka_kwargs(settings.kafka),
    )
    await consumer.start()
    try:
        # Fix the start positions before producing, so no answer is skipped.
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        for tp in consumer.assignment():
            await consumer.position(tp)

        async def produce() -> None:
            producer = AIOKafkaProducer(
                acks="all", linger_ms=5, enable_idempotence=True,
                max_request_size=settings.kafka.max_message_bytes,
                **aiokafka_kwargs(settings.kafka),
            )
            await producer.start()
            try:
                pending: list[asyncio.Future[object]] = []
                seen.produce_start = time.time()
                for i, request in enumerate(requests):
                    if rate is not None:
                        # a fixed arrival schedule: request i is due i / rate s after the first
                        due = seen.produce_start + i / rate
                        if due > time.time():
                            await asyncio.sleep(due - time.time())
                    now = time.time()
                    stamped = request.model_copy(update={"created_at": datetime.fromtimestamp(now, UTC)})
                    seen.sent_at[request.request_id] = now
                    pending.append(
                        await producer.send(topology.requests.name, encode(stamped), key=request.workflow_id.encode())
                    )
                    if len(pending) >= 1000:
                        await asyncio.gather(*pending)
                        seen.produced += len(pending)
                        on_produced(len(pending))
                        pending.clear()
                await asyncio.gather(*pending)
                seen.produced += len(pending)
                on_produced(len(pending))
                seen.produce_end = time.time()
            finally:
                await producer.stop()

        producing = asyncio.create_task(produce())
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            if settle_until is not None and time.monotonic() > settle_until:
                break
            batch = await consumer.getmany(timeout_ms=200)
            received = time.time()
            for records in batch.values():
                for record in records:
                    item = orjson.loads(record.value)
                    rid = item.get("request_id")
                    if rid not in seen.sent_at:
                        seen.foreign += 1
                        continue
                    if record.topic == results_topic:
                        if rid in seen.result_ids:
                            seen.duplicates += 1
                            continue
                        seen.result_ids.add(rid)
                        timings = item["timings"]
                        created, classified, started, finished = (
                            _parse_ts(timings[k]) for k in ("created_at", "classified_at", "started_at", "finished_at")
                        )
                        seen.e2e_ms.append((finished - created) * 1000)
                        seen.classifier_hop_ms.append((classified - created) * 1000)
                        seen.tier_wait_ms.append((started - classified) * 1000)
                        seen.model_ms.append(float(timings["model_latency_ms"]))
                        if timings.get("budget_wait_ms") is not None:
                            seen.budget_wait_ms.append(float(timings["budget_wait_ms"]))
                        seen.call_spans.append((started, finished))
                        status = item.get("status", "?")
                        seen.statuses[status] = seen.statuses.get(status, 0) + 1
                    else:
                        if rid in seen.dead_letter_ids:
                            seen.duplicates += 1
                            continue
                        seen.dead_letter_ids.add(rid)
                        seen.dead_letter_codes[item["code"]] = seen.dead_letter_codes.get(item["code"], 0) + 1
                    seen.receive_ms.append((received - seen.sent_at[rid]) * 1000)
                    seen.first_at = seen.first_at or received
                    seen.last_at = received
            if batch:
                on_answered(seen.answered)
            if settle_until is None and producing.done() and seen.answered >= count:
                on_complete()
                settle_until = time.monotonic() + settle
            check_alive()
        if not producing.done():
            producing.cancel()
        try:
            await producing  # re-raises a producer failure
        except asyncio.CancelledError:
            pass
    finally:
        await consumer.stop()
    return seen


def cdf(values: list[float], points: int = 101) -> list[float]:
    """Nearest-rank percentiles 0, 1, ..., 100 of ``values`` (for a CDF plot)."""
    if not values:
        return []
    ordered = sorted(values)
    last = len(ordered) - 1
    return [round(ordered[round(last * i / (points - 1))], 3) for i in range(points)]


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (calls in flight at the peak)."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    peak = current = 0
    for _, step in edges:  # at equal times an end (-1) sorts before a start (+1)
        current += step
        peak = max(peak, current)
    return peak


def figures(seen: Observed, requested: int) -> dict[str, object]:
    results = len(seen.result_ids)
    span = (seen.last_at - seen.first_at) if seen.first_at and seen.last_at else 0.0
    to_last = (seen.last_at - seen.produce_start) if seen.last_at else 0.0
    produce_s = seen.produce_end - seen.produce_start if seen.produce_end else 0.0
    overhead = [e2e - model for e2e, model in zip(seen.e2e_ms, seen.model_ms, strict=True)]
    return {
        "counts": {
            "requested": requested,
            "produced": seen.produced,
            "results": results,
            "dead_letters": len(seen.dead_letter_ids),
            "duplicates": seen.duplicates,
            "lost": seen.produced - results - len(seen.dead_letter_ids),
            "dead_letter_codes": seen.dead_letter_codes,
            "result_statuses": seen.statuses,
        },
        "throughput": {
            # Answers per second between the first and the last answer received.
            "results_per_s": round((seen.answered - 1) / span, 2) if span > 0 and seen.answered > 1 else None,
            "first_to_last_s": round(span, 3),
            "produce_start_to_last_s": round(to_last, 3),
            "produce_s": round(produce_s, 3),
            "produce_per_s": round(seen.produced / produce_s, 2) if produce_s > 0 else None,
        },
        "latency_ms": {
            # result.timings.finished_at - created_at (clock of the worker vs. the producer's)
            "end_to_end": distribution(seen.e2e_ms),
            # consumer receive time - producer send time (one clock: this process)
            "receive_minus_produce": distribution(seen.receive_ms),
            # result.timings.model_latency_ms
            "model": distribution(seen.model_ms),
            # end_to_end - model: what the pipeline adds beyond the (simulated) model call,
            # queueing behind the burst included
            "overhead": distribution(overhead),
            # the overhead's parts: classified_at - created_at, and started_at - classified_at
            # (the rest is the tier worker's own time around the call: limiter, retries)
            "classifier_hop": distribution(seen.classifier_hop_ms),
            "tier_wait": distribution(seen.tier_wait_ms),
            # result.timings.budget_wait_ms: admission under the budget leases (tierstream only)
            "budget_wait": distribution(seen.budget_wait_ms),
        },
        "cdf_ms": {"end_to_end": cdf(seen.e2e_ms), "overhead": cdf(overhead)},
        # Model calls open at the same instant, from the results' started_at/finished_at
        "calls_in_flight_peak": peak_overlap(seen.call_spans),
    }
