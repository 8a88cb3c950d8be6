"""The batch path end to end: a real broker, the provider simulator's batch APIs through
the official SDKs, and the batch role SIGKILLed at each step where a crash could lose a
request or answer it twice."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import orjson
import pytest

from schemas.models import Tier, TieredRequest
from streams import processes
from streams.admin import wait_for_roles
from streams.pricing import PriceBook
from streams.roles.batch import CRASH_ENV
from streams.tokens import estimate_input_tokens
from tests.support import Pipeline, collect, is_cost, produce_raw, read_topic, wait_until
from topologies.config import Settings, load_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

TIERS = ("nano", "standard", "premium")  # openai, anthropic, anthropic in the default configuration


def request(n: int, **fields: object) -> tuple[bytes, bytes]:
    workflow = f"wf-{n % 20}"
    body = {
        "request_id": f"b-{n}", "workflow_id": workflow, "agent_type": "writer",
        "task": f"Summarise item {n}.", "max_output_tokens": 32, "tier_hint": TIERS[n % 3],
        "latency_class": "batch", **fields,
    }
    return workflow.encode(), orjson.dumps(body, default=str)


def worst_usd(settings: Settings, body: bytes, price_factor: Decimal = Decimal(1)) -> Decimal:
    """A request's worst case: all its input and every output token it allows."""
    fields = orjson.loads(body)
    tier = Tier(fields["tier_hint"])
    request = TieredRequest(**fields, tier=tier, routed_by="hint")
    choice = settings.tiers[tier]
    worst = PriceBook(settings).worst_case(choice.provider, choice.model, estimate_input_tokens(request),
                                           request.max_output_tokens)
    return worst * price_factor


def start_batch_role(pipeline: Pipeline, crash_at: str | None, run: int):
    env = dict(pipeline.env)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return processes.spawn(["worker", "--roles", "batch"], env, pipeline.log_dir / f"worker-batch-{run}.log")


def submitted_items(simulator_port: int) -> int:
    stats = httpx.get(f"http://127.0.0.1:{simulator_port}/stats").json()
    return sum(stats["batches"]["items_submitted"].values())


async def test_batch_requests_are_answered_once_at_the_batch_price_across_sigkills(
    pipeline_factory, simulator_port: int
) -> None:
    """1,000 batch-marked requests over both providers: the batch role is SIGKILLed after
    Anthropic accepted a batch it had not recorded yet, then again halfway through
    writing a batch's answers; every request is answered once, at half the online price,
    and no item is sent to a provider twice. Requests due too soon, and items the provider
    failed, are answered online. Then a runaway workflow: its batch takes no more than its
    budget, reserved at submission; what does not fit ends as budget_exceeded."""
    soon = (datetime.now(UTC) + timedelta(seconds=600)).isoformat()
    batch = [request(n) for n in range(1000)]
    due_soon = [request(1000 + n, complete_by=soon) for n in range(12)]
    failing = [request(2000 + n, task=f"Summarise {n}. #sim:batch-error") for n in range(6)]
    expiring = [request(3000 + n, task=f"Summarise {n}. #sim:batch-expire") for n in range(6)]
    everything = batch + due_soon + failing + expiring
    # A workflow budget twice the most any of these workflows could cost online.
    defaults = load_settings(environ={})
    per_workflow: Counter[bytes] = Counter()
    for key, body in everything:
        per_workflow[key] += worst_usd(defaults, body)  # type: ignore[assignment]
    workflow_budget = 2 * max(per_workflow.values())

    pipeline: Pipeline = pipeline_factory(
        TIERSTREAM__BATCH__MAX_AGE_SECONDS="1",
        TIERSTREAM__BATCH__POLL_SECONDS="0.5",
        TIERSTREAM__BATCH__MAX_ITEMS="400",
        TIERSTREAM__BATCH__COMPLETION_WINDOW_SECONDS="3600",
        TIERSTREAM__BATCH__DEADLINE_MARGIN_SECONDS="0",
        TIERSTREAM__WORKER__SESSION_TIMEOUT_SECONDS="6",
        TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD=str(workflow_budget),
    )
    settings = pipeline.settings
    topology = pipeline.topology
    await pipeline.start_workers("classifier", "cost", "tier:nano", "tier:standard", "tier:premium")
    before = submitted_items(simulator_port)
    # Anthropic's batches carry no metadata: the harder one to find again
    killed = start_batch_role(pipeline, "submitted:anthropic", 1)
    await wait_for_roles(settings, ["classifier", "cost", "tier-nano", "tier-standard", "tier-premium", "batch"], 180)

    await produce_raw(settings.kafka.bootstrap_servers, topology.requests.name, everything)

    # 1. killed after the provider took a batch, before the job said so
    assert await wait_until(lambda: _exited(killed), 120, "the batch role to kill itself after a submission",
                            accept=_is_code) == -signal.SIGKILL
    # 2. killed halfway through writing a batch's answers
    killed = start_batch_role(pipeline, "answering", 2)
    assert await wait_until(lambda: _exited(killed), 180, "the batch role to kill itself while answering",
                            accept=_is_code) == -signal.SIGKILL
    # 3. and once more, to the end
    survivor = start_batch_role(pipeline, None, 3)
    pipeline.workers.append(survivor)

    collected = await collect(pipeline, expected=len(everything), timeout=240, settle=3.0)
    ids = collected.result_ids()
    assert not collected.dead_letters, collected.dead_letters[:3]
    assert {i for i, n in ids.items() if n > 1} == set(), "answered twice"
    assert set(ids) == {orjson.loads(body)["request_id"] for _, body in everything}, "not answered"

    by_id = {r["request_id"]: r for r in collected.results}
    via_batch = [by_id[orjson.loads(body)["request_id"]] for _, body in batch]
    assert {r["answered_by"] for r in via_batch} == {"batch"}
    assert {r["provider"] for r in via_batch} == {"openai", "anthropic"}
    assert all(r["batch_id"] for r in via_batch)
    # the deadline is too close for the batch window, and the failed items go online (policy)
    for _, body in due_soon + failing + expiring:
        assert by_id[orjson.loads(body)["request_id"]]["answered_by"] == "online"

    prices = PriceBook(settings)
    for r in via_batch:
        online = prices.cost(r["provider"], r["model"], r["input_tokens"], r["output_tokens"])
        assert Decimal(str(r["cost_usd"])) == Decimal(str(float(online * Decimal("0.5")))), r

    # each batch item went to a provider once (the unrecorded batch was found, not sent again)
    assert submitted_items(simulator_port) - before == len(batch) + len(failing) + len(expiring)
    # each answered request was costed once
    costs = await read_topic(pipeline, topology.costs.name, len(everything), 60, keep=is_cost)
    counted = Counter(c["request_id"] for c in costs)
    assert {i for i, n in counted.items() if n != 1} == set()
    assert set(counted) == set(ids)
    assert sum(Decimal(str(c["cost_usd"])) for c in costs if c["request_id"] in {r["request_id"] for r in via_batch}) \
        == sum(Decimal(str(r["cost_usd"])) for r in via_batch)

    # A runaway workflow's batch: each worst case is reserved against the workflow's budget
    # before the batch is sent, so it spends at most its budget.
    def runaway_request(n: int) -> tuple[bytes, bytes]:
        return b"wf-runaway", orjson.dumps({
            "request_id": f"runaway-{n}", "workflow_id": "wf-runaway", "agent_type": "writer",
            "task": "Summarise.", "max_output_tokens": 32, "tier_hint": "premium", "latency_class": "batch",
        })

    # The tier workers' budget openings may hold opening_share of the workflow's budget,
    # which a workflow only the batch role calls cannot use.
    usable = Decimal(str(workflow_budget)) * (1 - Decimal(str(settings.cost_guardrails.opening_share)))
    fits = int(usable / worst_usd(settings, runaway_request(0)[1], Decimal("0.5")))
    runaway = [runaway_request(n) for n in range(fits + 20)]
    await produce_raw(settings.kafka.bootstrap_servers, topology.requests.name, runaway)
    again = await collect(pipeline, expected=len(everything) + len(runaway), timeout=120)
    assert not again.dead_letters, again.dead_letters[:3]
    answers = [r for r in again.results if r["workflow_id"] == "wf-runaway"]
    assert sorted(r["request_id"] for r in answers) == sorted(orjson.loads(b)["request_id"] for _, b in runaway)
    statuses = Counter(r["status"] for r in answers)
    assert statuses["ok"] >= fits and statuses["budget_exceeded"] >= 1, statuses
    assert {r["answered_by"] for r in answers if r["status"] == "ok"} == {"batch"}
    spent = sum(Decimal(str(r["cost_usd"])) for r in answers if r["status"] == "ok")
    assert spent <= workflow_budget, (spent, workflow_budget)


def _exited(proc) -> int | None:
    return proc.poll()


def _is_code(code: int | None) -> bool:
    return code is not None


async def test_two_batches_resumed_together_each_read_what_they_already_wrote(pipeline_factory) -> None:
    """After a restart, two batches that were being answered read back their topics at the
    same time, through one consumer: each gets its own request ids."""
    from streams.admin import ensure_topics
    from streams.batches.jobs import WrittenRecords

    pipeline: Pipeline = pipeline_factory()
    settings, topology = pipeline.settings, pipeline.topology
    await ensure_topics(settings)
    written = WrittenRecords(settings)
    await written.start()
    try:
        before = await written.ends([topology.results.name, topology.costs.name])
        for topic, prefix in ((topology.results.name, "r"), (topology.costs.name, "c")):
            await produce_raw(settings.kafka.bootstrap_servers, topic, [
                (f"wf-{n}".encode(), orjson.dumps({"request_id": f"{prefix}-{n}"})) for n in range(40)
            ])
        results = {k: v for k, v in before.items() if k.startswith(f"{topology.results.name}:")}
        costs = {k: v for k, v in before.items() if k.startswith(f"{topology.costs.name}:")}
        read_results, read_costs = await asyncio.wait_for(
            asyncio.gather(written.request_ids(results), written.request_ids(costs)), 60)
    finally:
        await written.stop()
    assert read_results == {topology.results.name: {f"r-{n}" for n in range(40)}}
    assert read_costs == {topology.costs.name: {f"c-{n}" for n in range(40)}}
