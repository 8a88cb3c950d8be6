"""Smoke test of the guardrail benchmark: one standard replica, one repeat, on the session's broker.

Checks that the JSON report holds every figure and that the counts and sums add up. It
makes no assertion about timings, nor about how much was overspent: this is a correctness
check of the benchmark, not a benchmark.
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

LIMIT = 0.05
WORKFLOW_LIMIT = 0.02
REQUESTS = 300
RUNAWAY = 60
TIER_WORKERS = ["tier-standard-0", "tier-nano", "tier-premium"]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 2e-9  # nano-dollars, rounded once each side


@pytest.mark.timeout(400)
def test_bench_guardrails_one_worker_one_repeat(kafka_bootstrap: str, tmp_path: Path) -> None:
    output = tmp_path / "guardrails.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.guardrails", "--workers", "1", "--repeats", "1",
         "--limit-usd", str(LIMIT), "--workflow-limit-usd", str(WORKFLOW_LIMIT),
         "--requests", str(REQUESTS), "--runaway-requests", str(RUNAWAY),
         # a short run: 75 s of the hour window left is enough for both phases
         "--hour-margin-s", "75", "--phase-timeout-s", "90", "--output", str(output)],
        cwd=REPO_ROOT,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        capture_output=True, text=True, timeout=390, check=False,
    )
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "Spend per replica count" in proc.stdout and "Timing per replica count" in proc.stdout

    report = orjson.loads(output.read_bytes())
    config = report["config"]
    assert config["workers"] == [1] and config["repeats"] == 1 and config["broker"] == "external"
    assert config["limit_usd"] == LIMIT and config["workflow_limit_usd"] == WORKFLOW_LIMIT
    assert config["runaway_requests"] == RUNAWAY and config["requests"] == REQUESTS
    for key in ("nproc", "memory_gb", "python", "kafka", "packages", "loadavg_1_5_15_at_start"):
        assert key in report["machine"], key

    (run,) = report["repeats"]
    assert run["ok"], run.get("error")
    assert report["failed_attempts"] == []
    counts, hour, flow = run["counts"], run["hour"], run["workflow"]
    worst, flow_worst = run["worst_case_per_request_usd"], flow["worst_case_per_request_usd"]
    assert worst > 0 and 0 < flow_worst <= worst

    # The workflow phase: every runaway request answered, some within the budget, the rest refused.
    runaway = counts["workflow_phase"]
    assert runaway["produced"] == RUNAWAY and runaway["unanswered"] == 0 and runaway["dead_letters"] == 0
    assert runaway["unique_results"] == RUNAWAY
    assert runaway["duplicates"] == runaway["results"] - runaway["unique_results"]
    assert set(runaway["statuses"]) == {"ok", "budget_exceeded"}
    assert sum(runaway["statuses"].values()) == runaway["results"]
    assert runaway["cost_events"] == runaway["statuses"]["ok"] == sum(flow["cost_events_by_tier"].values())
    assert set(flow["cost_events_by_tier"]) <= {"nano", "standard", "premium"}

    # The hour phase: paused part-way; the rest waits in Kafka.
    standard = counts["hour_phase"]
    assert standard["produced"] == REQUESTS and standard["dead_letters"] == 0
    assert 0 < standard["unique_results"] < REQUESTS
    assert standard["unanswered"] == REQUESTS - standard["unique_results"]
    assert standard["duplicates"] == standard["results"] - standard["unique_results"]
    assert standard["statuses"] == {"ok": standard["results"]}
    assert standard["cost_events"] == standard["results"]

    # One cost event per answered call (no retries against the simulator), all in one hour;
    # the leases' records share the topic and are not counted as costs.
    assert counts["cost_events"] == runaway["cost_events"] + standard["cost_events"]
    assert counts["cost_events_in_window"] == counts["cost_events"]
    assert counts["budget_records"] > 0

    # The hour: every figure from the same spend.
    assert hour["limit_usd"] == LIMIT
    assert close(hour["spent_usd"], hour["spent_workflow_phase_usd"] + hour["spent_hour_phase_usd"])
    assert close(hour["over_limit_usd"], hour["spent_usd"] - LIMIT)
    assert close(hour["overspend_usd"], max(hour["spent_usd"] - LIMIT, 0))
    assert hour["overspend_calls"] == pytest.approx(hour["overspend_usd"] / worst, abs=1e-3)
    assert hour["overspend_calls"] <= 1, "past the hour by more than one worst-case call"
    assert hour["usable_share"] == pytest.approx(hour["spent_usd"] / LIMIT, abs=1e-4)
    assert close(hour["view_hour_spent_usd"], hour["spent_usd"])  # the cost role counted it all
    assert close(hour["old_per_process_bound_usd"], 64 * worst)

    # The workflow: its cost events, its results and the cost role's total agree.
    assert flow["limit_usd"] == WORKFLOW_LIMIT
    assert close(flow["spent_usd"], flow["spent_results_usd"])
    assert close(flow["spent_usd"], hour["spent_workflow_phase_usd"])
    assert close(flow["view_spent_usd"], flow["spent_usd"])
    assert close(flow["over_limit_usd"], flow["spent_usd"] - WORKFLOW_LIMIT)
    assert close(flow["overspend_usd"], max(flow["spent_usd"] - WORKFLOW_LIMIT, 0))
    assert flow["overspend_calls"] == pytest.approx(flow["overspend_usd"] / flow_worst, abs=1e-3)
    assert flow["overspend_calls"] <= 1, "past the workflow budget by more than one worst-case call"

    # Reaction: a figure per tier worker, missing (not zero) without an event or a pause line.
    assert list(run["reaction_s"]) == TIER_WORKERS == list(run["pause_log_lines"])
    if hour["limit_reached_events"] == 0:
        assert hour["limit_reached_record_time"] is None
        assert all(r is None for r in run["reaction_s"].values()) and run["reaction_missing"]
    else:
        assert hour["limit_reached_record_time"] is not None
        for name, reaction in run["reaction_s"].items():
            assert (reaction is None) == (run["pause_log_lines"][name] == 0), name
        assert (run["reaction_missing"] is None) == all(r is not None for r in run["reaction_s"].values())

    # Admission: one observation per admitted call (each answered ok).
    assert run["admission_missing"] is None, run["admission_missing"]
    wf_admit, hour_admit = run["admission"]["workflow_phase_all_tiers"], run["admission"]["hour_phase_standard"]
    assert wf_admit["calls"] == runaway["statuses"]["ok"]
    assert hour_admit["calls"] == standard["results"]
    for admitted in (wf_admit, hour_admit):
        assert admitted["buckets"]["+Inf"] == admitted["calls"]
        assert 0 <= admitted["p50_s"] <= admitted["p99_s"]

    # The summary is the one repeat's figures.
    (summary,) = report["summary"]
    assert summary["workers"] == 1 and summary["repeats"] == 1 and summary["repeats_ok"] == 1
    for key, value in (("hour_overspend_usd", hour["overspend_usd"]), ("workflow_overspend_usd", flow["overspend_usd"]),
                       ("hour_overspend_calls", hour["overspend_calls"]),
                       ("workflow_overspend_calls", flow["overspend_calls"]),
                       ("hour_usable_share", hour["usable_share"])):
        assert summary[key]["n"] == 1 and summary[key]["max"] == value, key
        assert summary[key]["mean"] == pytest.approx(value, abs=1e-9), key
    assert summary["reaction_expected"] == len(TIER_WORKERS)
    measured = [r for r in run["reaction_s"].values() if r is not None]
    assert summary["reaction_s"]["n"] == len(measured) == len(TIER_WORKERS) - summary["reaction_missing"]
    if measured:
        assert summary["reaction_s"]["max"] == max(measured)
    assert summary["admission"]["hour_phase_standard"]["calls"] == hour_admit["calls"]
    assert summary["admission"]["workflow_phase_all_tiers"]["calls"] == wf_admit["calls"]
    assert summary["old_per_process_bound_usd"] == hour["old_per_process_bound_usd"]
