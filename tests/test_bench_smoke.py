"""Smoke test of the benchmark harness: a small run against the session's broker.

Checks that the JSON report holds every figure and that the counts add up. It makes no
assertion about timings: this is a correctness check of the harness, not a benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks.harness import BASELINE_ROLES
from topologies.topics import ALL_ROLES

from streams.broker import REPO_ROOT

pytestmark = pytest.mark.e2e

PIPELINES = ("tierstream", "raw-fake", "raw-sdk")
REQUESTS = 200


@pytest.mark.timeout(240)
def test_bench_harness_small_run(kafka_bootstrap: str, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--requests", str(REQUESTS), "--workers", "1",
         "--latency-ms", "0", "--timeout", "120", "--output", str(output)],
        cwd=REPO_ROOT,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        capture_output=True, text=True, timeout=230, check=False,
    )
    assert proc.returncode == 0, f"harness failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "tierstream / raw-fake" in proc.stdout

    report = orjson.loads(output.read_bytes())
    assert report["config"]["requests"] == REQUESTS
    for key in ("nproc", "memory_gb", "python", "kafka", "packages"):
        assert key in report["machine"], key
    assert set(report["pipelines"]) == set(PIPELINES)
    assert set(report["ratios"]) == {"tierstream_over_raw_fake", "tierstream_over_raw_sdk", "raw_sdk_over_raw_fake"}
    assert all(isinstance(v, float) for v in report["ratios"].values()), report["ratios"]

    for kind, figures in report["pipelines"].items():
        counts = figures["counts"]
        assert counts["produced"] == REQUESTS, (kind, counts)
        assert counts["produced"] == counts["results"] + counts["dead_letters"], (kind, counts)
        assert counts["lost"] == 0, (kind, counts)
        assert counts["duplicates"] == 0, (kind, counts)

        throughput = figures["throughput"]
        for key in ("results_per_s", "first_to_last_s", "produce_start_to_last_s", "produce_s", "produce_per_s"):
            assert isinstance(throughput[key], (int, float)), (kind, key, throughput)
        for name in ("end_to_end", "receive_minus_produce", "model"):
            dist = figures["latency_ms"][name]
            assert dist["n"] == counts["results"] or name == "receive_minus_produce", (kind, name, dist)
            for q in ("p50", "p95", "p99", "max", "mean"):
                assert isinstance(dist[q], (int, float)), (kind, name, q)
        assert figures["latency_ms"]["receive_minus_produce"]["n"] == counts["results"] + counts["dead_letters"]

        workers = figures["resources"]["workers"]
        # tierstream: the supervisor + one process per role; baselines: the request path only
        expected_procs = 1 + len(ALL_ROLES) if kind == "tierstream" else len(BASELINE_ROLES)
        assert workers["processes"] == expected_procs, (kind, workers)
        for key in ("cpu_s", "cpu_ms_per_result", "peak_rss_mb_sum", "peak_rss_mb_max"):
            assert isinstance(workers[key], (int, float)), (kind, key, workers)
        assert workers["peak_rss_mb_max"] > 0
        assert "cpu_s" in figures["resources"]["simulator"]
        assert isinstance(figures["startup_ready_s"], (int, float))
