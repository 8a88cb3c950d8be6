"""Smoke test of the admission benchmark on the session's broker: two holder processes
sharing three workflows whose budgets the run exhausts.

A correctness check of the benchmark (every call counted, the cluster-wide workflow
budget held across both holders), not a benchmark: no assertion about timings.
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

RATE, WARMUP_S, SECONDS, HOLDERS, WORKFLOWS = 60, 2, 4, 2, 3
WORST, WORKFLOW_USD = 0.0005, 0.005  # each call costs WORST / 4: 40 calls per workflow fit


@pytest.mark.timeout(240)
def test_bench_admission_counts_every_call_and_holds_the_workflow_budget(kafka_bootstrap: str, tmp_path: Path) -> None:
    output = tmp_path / "admission.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.admission", "--rate", str(RATE), "--holders", str(HOLDERS),
         "--warmup-s", str(WARMUP_S), "--seconds", str(SECONDS), "--workflows", str(WORKFLOWS),
         "--worst-usd", str(WORST), "--workflow-usd", str(WORKFLOW_USD), "--call-ms", "20",
         "--output", str(output)],
        cwd=REPO_ROOT, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        capture_output=True, text=True, timeout=230, check=False,
    )
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    report = orjson.loads(output.read_bytes())

    per_holder = RATE // HOLDERS * (WARMUP_S + SECONDS)
    # every call made, and the measured ones are those after the warm-up
    assert report["unfinished"] == 0
    assert report["admission_ms"]["n"] + report["warmup_admission_ms"]["n"] + report["exceeded"] <= HOLDERS * per_holder
    assert report["calls"] > 0 and report["calls"] < HOLDERS * per_holder
    assert report["admission_ms"]["n"] == report["calls"] - report["exceeded"]
    # 120 calls per workflow offered, 40 fit: the rest were refused, and no workflow spent
    # past its budget over both holders
    assert report["exceeded"] > 0
    assert 0 < report["workflow_spend_usd_max"] <= WORKFLOW_USD
    assert set(report["cpu_s"]) == {"holders", "cost", "broker"}
