"""Smoke test of the rate-limit benchmark: one replica, both limiters, a few seconds each,
on the session's broker. Checks the report's shape and that its counts are consistent;
it asserts no performance figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from streams.broker import REPO_ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(300)
def test_bench_ratelimit_one_replica_both_limiters(kafka_bootstrap: str, tmp_path: Path) -> None:
    output = tmp_path / "ratelimit.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ratelimit", "--replicas", "1", "--steady-seconds", "5",
         "--rpm", "600", "--backlog", "300", "--output", str(output)],
        cwd=REPO_ROOT, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        capture_output=True, text=True, timeout=290, check=False,
    )
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "Rate limit: utilisation and over-limit requests" in proc.stdout
    report = orjson.loads(output.read_bytes())
    assert report["machine"]["nproc"] >= 1
    outcomes = report["outcomes"]
    assert [(o["scenario"]["replicas"], o["scenario"]["sharing"]) for o in outcomes] == [(1, "partitions"), (1, "process")]
    for o in outcomes:
        assert o["produced"] == 300 and 4.5 <= o["steady_seconds"] < 60
        assert o["ok_per_minute"] > 0 and 0 < o["request_utilisation"] == pytest.approx(o["ok_per_minute"] / 600, abs=1e-3)
        assert o["over_limit_429"] + o["other_429"] <= o["sim_requests_total"]
        assert 0 <= o["unanswered_at_end"] < 300
        assert len(o["worker_rss_mb"]) == 1 and o["worker_rss_mb"][0] > 0
