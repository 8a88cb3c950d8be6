"""Fault runs at a size CI can afford (``python -m tests.faults`` runs them at any size)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streams.broker import LocalBroker
from tests.faults import broker_restart, kill_loop
from tests.support import new_pipeline

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
    broker = LocalBroker.on_free_ports(data_dir=tmp_path / "kafka")
    bootstrap = broker.start(timeout=120)
    pipeline = new_pipeline(bootstrap, simulator_port, tmp_path)
    try:
        report = await broker_restart(pipeline, broker, count=1500, down_s=10)
    finally:
        pipeline.stop_workers()
        broker.stop()
    print(report.line())
    assert report.lost == 0, f"lost {report.lost}; logs in {tmp_path}"
    assert report.duplicates == 0, f"{report.duplicates} request ids answered twice; logs in {tmp_path}"
    assert report.results + report.dead_letters == report.produced
    assert report.cost_events >= report.results, "the cost events were not read"
    assert report.costs_exact, f"cost totals differ: {report.cost_mismatch}"
