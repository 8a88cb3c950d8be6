"""The SDK-alone memory reference of scenario 2: real SDK calls held open by the
simulator, counted by the simulator, measured in a child process. No Kafka."""

from __future__ import annotations

import pytest

from benchmarks.sdk_memory import run

CALLS = 60


@pytest.mark.timeout(180)
def test_sdk_memory_holds_every_call_open_and_reports_growth_per_call() -> None:
    report = run(CALLS, timeout=60)
    assert report["calls"] == CALLS
    # the simulator counted every call open at once, none answered before the measurement
    assert report["in_flight_seen"] == CALLS, report
    assert report["finished_early"] == 0, report
    # the workload reaches both providers' SDKs (nano/premium: openai, standard: anthropic)
    assert report["providers"] == ["anthropic", "openai"], report
    assert report["rss_in_flight_mb"] > report["rss_start_mb"] > 0, report
    assert report["kb_per_in_flight_call"] > 0, report
