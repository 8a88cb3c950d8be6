"""Smoke test of the guardrail benchmark: one worker, one repeat, on the session's broker.

Checks that the JSON report holds every figure and that the counts add up. It makes no
assertion about timings: this is a correctness check of the benchmark, not a benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from streams.broker import REPO_ROOT

pytestmark = pytest.mark.e2e

LIMIT = 0.03
REQUESTS = 300


@pytest.mark.timeout(180)
def test_bench_guardrails_one_worker_one_repeat(kafka_bootstrap: str, tmp_path: Path) -> None:
    output = tmp_path / "guardrails.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.guardrails", "--workers", "1", "--repeats", "1",
         "--limit-usd", str(LIMIT), "--requests", str(REQUESTS),
         # a short run: 30 s of the hour window left is plenty, and keeps the test short
         "--hour-margin-s", "30", "--pause-timeout-s", "60", "--output", str(output)],
        cwd=REPO_ROOT,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        capture_output=True, text=True, timeout=170, check=False,
    )
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "Summary per worker count" in proc.stdout

    report = orjson.loads(output.read_bytes())
    assert report["config"]["workers"] == [1] and report["config"]["repeats"] == 1
    assert report["config"]["broker"] == "external"
    for key in ("nproc", "memory_gb", "python", "kafka", "packages", "loadavg_1_5_15_at_start"):
        assert key in report["machine"], key

    (summary,) = report["summary"]
    assert summary["workers"] == 1 and summary["repeats"] == 1 and summary["repeats_ok"] == 1
    reaction = summary["reaction_s"]
    assert reaction["n"] == 1
    for q in ("p50", "p99", "max"):
        assert isinstance(reaction[q], float), (q, reaction)
    over = summary["overspend_fraction"]
    assert over["n"] == 1 and isinstance(over["mean"], float) and isinstance(over["max"], float)
    assert isinstance(summary["bound_fraction"], float) and summary["bound_fraction"] > 0

    (run,) = report["repeats"]
    assert run["ok"], run.get("error")
    assert len(run["reaction_s"]) == 1 and isinstance(run["reaction_s"][0], float)
    assert run["pause_log_lines"][0] >= 1
    assert run["reaction_s"][0] == reaction["p50"]

    counts, spend = run["counts"], run["spend"]
    assert counts["produced"] == REQUESTS
    # Paused part-way: some answered, the rest waits in Kafka.
    assert 0 < counts["results"] < REQUESTS
    assert counts["unanswered"] == REQUESTS - counts["unique_results"]
    assert counts["duplicates"] == counts["results"] - counts["unique_results"]
    assert counts["dead_letters"] == 0
    # One cost event per answered call (no retries against the simulator), all in one hour.
    assert counts["cost_events"] == counts["results_ok"] == counts["results"]
    assert counts["cost_events_in_window"] == counts["cost_events"]

    assert spend["limit_usd"] == LIMIT
    assert spend["final_usd"] >= LIMIT  # paused, so the cost events reached the limit
    assert spend["view_paused"] is True
    assert spend["view_hour_spent_usd"] == pytest.approx(spend["final_usd"], abs=1e-9)
    assert spend["overspend_usd"] == pytest.approx(spend["final_usd"] - LIMIT, abs=1e-9)
    assert spend["overspend_fraction"] == pytest.approx(spend["overspend_usd"] / LIMIT, abs=1e-4)
    assert over["mean"] == spend["overspend_fraction"]
    assert spend["bound_usd"] == pytest.approx(64 * spend["worst_case_per_request_usd"], abs=1e-9)
    assert run["crossing"]["cumulative_usd"] >= LIMIT
    assert run["crossing"]["event_index"] < counts["cost_events"]
