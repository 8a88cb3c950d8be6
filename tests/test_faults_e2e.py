"""Fault runs at a size CI can afford (``python -m tests.faults`` runs them at any size)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import orjson
import pytest

from schemas.models import Tier, TieredRequest
from streams.broker import LocalBroker
from streams.guardrails.money import usd_to_nanos
from streams.pricing import PriceBook
from streams.tokens import estimate_input_tokens
from tests.faults import broker_restart, cost_truth, kill_loop, requests
from tests.support import new_pipeline, read_to_end
from topologies.config import load_settings

pytestmark = pytest.mark.e2e


async def test_kill_loop_loses_nothing_doubles_nothing_and_costs_stay_exact(pipeline_factory) -> None:
    pipeline = pipeline_factory()
    report = await kill_loop(pipeline, count=900, workers=3, kill_every=5.0, timeout=480, produce_over_s=75)
    print(report.line())
    assert report.kills >= 2, "the run ended before the loop killed a worker twice"
    assert report.lost == 0, f"lost {report.lost}; logs in {pipeline.log_dir}"
    assert report.duplicates == 0, f"{report.duplicates} request ids answered twice; logs in {pipeline.log_dir}"
    assert report.results + report.dead_letters == report.produced
    assert report.cost_events >= report.results, "the cost events were not read"
    assert report.costs_exact, f"cost totals differ: {report.cost_mismatch}"


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")), reason="needs a broker this test can restart")
async def test_broker_restart_mid_run(simulator_port: int, tmp_path: Path) -> None:
    """The broker stopped for ten seconds mid-burst, with workflow budgets that bind: nothing
    lost or answered twice, totals exact, and no workflow past its budget (a lease granted
    before the restart is neither lost nor counted twice)."""
    budget, worst_call = binding_workflow_budget(requests(1500))
    broker = LocalBroker.on_free_ports(data_dir=tmp_path / "kafka")
    bootstrap = broker.start(timeout=120)
    pipeline = new_pipeline(bootstrap, simulator_port, tmp_path,
                            TIERSTREAM__COST_GUARDRAILS__MAX_COST_PER_WORKFLOW_USD=str(budget))
    try:
        report = await broker_restart(pipeline, broker, count=1500, down_s=10)
        statuses = Counter(orjson.loads(r.value)["status"]
                           for r in await read_to_end(pipeline, pipeline.topology.results.name))
        _count, by_workflow, _by_hour = await cost_truth(pipeline)
    finally:
        pipeline.stop_workers()
        broker.stop()
    print(report.line(), dict(statuses),
          f"most spent by a workflow: {max(by_workflow.values()) / usd_to_nanos(budget):.4f} of its budget")
    assert report.lost == 0, f"lost {report.lost}; logs in {tmp_path}"
    assert report.duplicates == 0, f"{report.duplicates} request ids answered twice; logs in {tmp_path}"
    assert report.results + report.dead_letters == report.produced
    assert report.cost_events >= statuses["ok"], "the cost events were not read"
    assert report.costs_exact, f"cost totals differ: {report.cost_mismatch}"
    assert statuses["budget_exceeded"] > 0, "the budgets did not bind"
    # The bound the leases promise: past a budget by at most one call's worst case (which
    # is an estimate of the input's tokens), in total.
    over = {wf: nanos for wf, nanos in by_workflow.items() if nanos > usd_to_nanos(budget) + worst_call}
    assert over == {}, f"past the workflow budget of ${budget} by more than one call: {over}"


def binding_workflow_budget(messages: list[tuple[bytes, bytes]]) -> tuple[float, int]:
    """Half the worst case of the lightest workflow's requests (every workflow runs out),
    and the largest worst case of one request, in nanos."""
    settings = load_settings(environ={})
    prices = PriceBook(settings)
    worst: Counter[str] = Counter()
    largest = 0
    for _key, body in messages:
        fields = orjson.loads(body)
        tier = Tier(fields["tier_hint"])
        request = TieredRequest(**fields, tier=tier, routed_by="hint")
        choice = settings.tiers[tier]
        one = usd_to_nanos(prices.worst_case(
            choice.provider, choice.model, estimate_input_tokens(request), request.max_output_tokens))
        worst[request.workflow_id] += one
        largest = max(largest, one)
    return round(min(worst.values()) / 2 / 1e9, 9), largest
