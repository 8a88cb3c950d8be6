"""Smoke test of the benchmark harness: a small run against the session's broker.

Checks that the JSON report holds every figure, that the counts add up, that the plots
and the broker-ceiling reference were produced, and that ``--baseline`` compares a run
with a saved one. It makes no assertion about timings: this is a correctness check of
the harness, not a benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks.harness import BASELINE_ROLES, FIGURES, ONLINE_ROLE_SPEC, ONLINE_ROLES, RATIO_PAIRS
from streams.broker import REPO_ROOT

pytestmark = pytest.mark.e2e

PIPELINES = ("tierstream", "raw-fake", "raw-sdk")
REQUESTS = 200
PERF_RECORDS = 5000
WARMUP = 50


def _harness(kafka_bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--requests", str(REQUESTS), "--workers", "1",
         "--latency-ms", "0", "--timeout", "120", "--idle-window", "0.5", "--settle", "0", "--warmup", "0", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap},
        capture_output=True, text=True, timeout=230, check=False,
    )


@pytest.fixture(scope="module")
def small_run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = _harness(kafka_bootstrap, "--broker-perf-records", str(PERF_RECORDS), "--warmup", str(WARMUP),
                    "--output", str(output))
    assert proc.returncode == 0, f"harness failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "tierstream/raw-sdk" in proc.stdout
    return output


@pytest.mark.timeout(240)
def test_bench_harness_small_run(small_run: Path) -> None:
    report = orjson.loads(small_run.read_bytes())
    assert report["config"]["requests"] == REQUESTS
    assert report["config"]["warmup_requests"] == WARMUP
    for key in ("nproc", "memory_gb", "python", "kafka", "packages", "loadavg_1_5_15_at_start"):
        assert key in report["machine"], key

    ceiling = report["broker_ceiling"]
    assert ceiling["producer"]["records"] == PERF_RECORDS, ceiling
    assert ceiling["consumer"]["records"] == PERF_RECORDS, ceiling
    assert ceiling["producer"]["records_per_s"] > 0 and ceiling["consumer"]["records_per_s"] > 0

    (run,) = report["runs"]
    assert run["workers"] == 1
    assert set(run["pipelines"]) == set(PIPELINES)
    expected_pairs = {f"{a}/{b}" for a, b in RATIO_PAIRS if a in PIPELINES and b in PIPELINES}
    assert set(run["ratios"]) == expected_pairs
    for pair, values in run["ratios"].items():
        assert set(values) == {name for name, _ in FIGURES}, pair
        assert isinstance(values["results_per_s"], float), (pair, values)

    for kind, figures in run["pipelines"].items():
        counts = figures["counts"]
        assert counts["produced"] == REQUESTS, (kind, counts)
        assert counts["produced"] == counts["results"] + counts["dead_letters"], (kind, counts)
        assert counts["lost"] == 0 and counts["duplicates"] == 0, (kind, counts)
        assert sum(counts["result_statuses"].values()) == counts["results"], (kind, counts)

        # every figure is a number (the broker's CPU only when the harness started it)
        external = report["config"]["broker"].startswith("external")
        for name, path in FIGURES:
            value = figures
            for key in path:
                value = value[key] if value is not None else None
            if name == "broker_cpu_s" and external:
                assert value is None, (kind, value)
                continue
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (kind, name, value)

        latency = figures["latency_ms"]
        for name in ("end_to_end", "model", "overhead", "classifier_hop", "tier_wait"):
            assert latency[name]["n"] == counts["results"], (kind, name, latency[name])
        assert latency["receive_minus_produce"]["n"] == counts["results"] + counts["dead_letters"]
        assert len(figures["cdf_ms"]["end_to_end"]) == 101
        assert figures["cdf_ms"]["end_to_end"] == sorted(figures["cdf_ms"]["end_to_end"])
        assert 1 <= figures["calls_in_flight_peak"] <= counts["results"], (kind, figures["calls_in_flight_peak"])

        workers = figures["resources"]["workers"]
        # tierstream: the supervisor + one process per role; baselines: one process per role
        roles = [ONLINE_ROLE_SPEC, *ONLINE_ROLES] if kind == "tierstream" else BASELINE_ROLES
        assert workers["processes"] == len(roles), (kind, workers)
        assert sorted(p["role"] for p in workers["per_process"]) == sorted(roles), (kind, workers["per_process"])
        assert len(figures["resources"]["per_worker"]) == 1
        assert figures["resources"]["per_worker"][0]["processes"] == len(roles)
        assert workers["peak_rss_mb_max"] > 0

        lag = figures["lag"]
        sampled_roles = set(ONLINE_ROLES)
        assert lag["samples"], (kind, lag)
        assert set(lag["peak"]) == sampled_roles
        for sample in lag["samples"]:
            assert sample["total"] == sum(sample[r] for r in sampled_roles), sample
            assert all(sample[r] >= 0 for r in sampled_roles), sample
        # every request passes the classifier: its lag covers the burst at some point or is
        # already consumed; it can never exceed what was produced
        assert lag["peak"]["classifier"] <= REQUESTS

    for path in report["plots"]:
        assert Path(path).stat().st_size > 1000, path


@pytest.mark.timeout(240)
def test_bench_baseline_compares_with_a_saved_run(kafka_bootstrap: str, small_run: Path, tmp_path: Path) -> None:
    """Also a paced run (``--rate``) against the burst it is compared with."""
    saved, output, rate = small_run, tmp_path / "now.json", 1000.0
    second = _harness(kafka_bootstrap, "--pipelines", "raw-fake", "--broker-perf-records", "0", "--no-plots",
                      "--output", str(output), "--baseline", str(saved), "--rate", str(rate))
    assert second.returncode == 0, second.stderr
    assert "compared with" in second.stdout
    assert "warning: the saved run used" in second.stdout  # a burst, this one paced
    report = orjson.loads(output.read_bytes())
    assert report["config"]["rate_per_s"] == rate
    # request i is due i / rate s after the first: producing them cannot be faster than that
    produce_per_s = report["runs"][0]["pipelines"]["raw-fake"]["throughput"]["produce_per_s"]
    assert produce_per_s <= rate * REQUESTS / (REQUESTS - 1) + 0.01, produce_per_s  # + rounding
    rows = {row["figure"]: row for row in report["baseline"]["figures"]}
    assert set(rows) == {name for name, _ in FIGURES}
    assert rows["results_per_s"]["saved"] == orjson.loads(saved.read_bytes())["runs"][0]["pipelines"]["raw-fake"]["throughput"]["results_per_s"]
    assert rows["results_per_s"]["ratio"] == pytest.approx(rows["results_per_s"]["now"] / rows["results_per_s"]["saved"], rel=1e-3)
    assert report["broker_ceiling"] == {"skipped": "--broker-perf-records 0"}
    assert "plots" not in report
