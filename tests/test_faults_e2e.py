"""Fault runs at a size CI can afford (``python -m tests.faults`` runs them at any size)."""

from __future__ import annotations

import pytest

from tests.faults import kill_loop

pytestmark = pytest.mark.e2e


async def test_kill_loop_loses_nothing_doubles_nothing_and_costs_stay_exact(pipeline_factory) -> None:
    pipeline = pipeline_factory()
    report = await kill_loop(pipeline, count=600, workers=3, kill_every=8.0, timeout=420, produce_over_s=40)
    print(report.line())
    assert report.kills >= 2, "the run ended before the loop killed a worker twice"
    assert report.lost == 0, f"lost {report.lost}; logs in {pipeline.log_dir}"
    assert report.duplicates == 0, f"{report.duplicates} request ids answered twice; logs in {pipeline.log_dir}"
    assert report.results + report.dead_letters == report.produced
    assert report.costs_exact, f"cost totals differ: {report.cost_mismatch}"
