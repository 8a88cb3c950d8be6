"""Smoke test of the batch-path benchmark: 60 requests a phase, one repeat, on the session's broker.

Checks that the JSON report holds both phases, that every request was answered once (the
batch phase by the batch role), that the measured cost ratio is the batch price factor,
and that the latency figures are numbers. No assertion on timings: a correctness check
of the benchmark, not a benchmark.
"""

from __future__ import annotations

import subprocess
import sys
from numbers import Real
from pathlib import Path

import orjson
import pytest

from streams.broker import REPO_ROOT

pytestmark = pytest.mark.e2e

REQUESTS = 60


@pytest.mark.timeout(240)
def test_bench_batch_online_and_batch_phases(kafka_bootstrap: str, tmp_path: Path) -> None:
    output = tmp_path / "batch.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.batch", "--requests", str(REQUESTS), "--repeats", "1",
         "--batch-delay-seconds", "1", "--max-age-seconds", "1", "--poll-seconds", "0.5",
         "--settle-s", "1", "--phase-timeout-s", "90", "--bootstrap", kafka_bootstrap, "--output", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=230, check=False,
    )
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "Batch path vs online" in proc.stdout

    report = orjson.loads(output.read_bytes())
    assert report["kind"] == "batch" and report["config"]["requests"] == REQUESTS
    assert report["config"]["broker"] == "external" and report["config"]["batch_delay_seconds"] == 1
    assert report["machine"]["nproc"] >= 1
    assert report["run"]["ok"], report["run"].get("errors")
    (run,) = report["run"]["repeats"]
    assert set(run["phases"]) == {"online", "batch"}

    for name, phase in run["phases"].items():
        # every request answered once, by a result
        assert phase["produced"] == phase["answered"] == phase["unique_results"] == phase["results"] == REQUESTS, name
        assert phase["unanswered"] == phase["duplicates"] == phase["dead_letters"] == 0, name
        assert phase["statuses"] == {"ok": REQUESTS}, name
        assert phase["tiers"] == {"nano": 20, "standard": 20, "premium": 20}, name
        assert set(phase["providers"]) == {"openai", "anthropic"}, name
        # the costs: the results' sum, checked against the costs topic
        assert phase["cost_usd"] > 0 and phase["cost_events"] == REQUESTS, name
        assert phase["costs_topic_usd"] == pytest.approx(phase["cost_usd"], abs=1e-9), name
        assert phase["cost_per_1000_usd"] == pytest.approx(phase["cost_usd"] / REQUESTS * 1000, rel=1e-6), name
        for figure in ("latency_s", "read_s"):
            dist = phase[figure]
            assert dist["n"] == REQUESTS, (name, figure)
            for key in ("p50", "p99", "max", "mean"):
                assert isinstance(dist[key], Real) and not isinstance(dist[key], bool), (name, figure, key)
            assert 0 <= dist["p50"] <= dist["p99"] <= dist["max"], (name, figure)
        assert isinstance(phase["makespan_s"], Real) and phase["makespan_s"] > 0, name

    online, batch = run["phases"]["online"], run["phases"]["batch"]
    assert online["answered_by"] == {"online": REQUESTS}
    assert batch["answered_by"] == {"batch": REQUESTS}
    assert online["provider_batches"] == 0 and sum(online["sim"]["batches_created"].values()) == 0
    assert online["sim"]["online_calls"] == REQUESTS
    assert batch["provider_batches"] >= 2  # at least one per provider
    assert batch["provider_batches"] == sum(batch["sim"]["batches_created"].values())
    assert sum(batch["sim"]["batch_items_submitted"].values()) == REQUESTS
    assert batch["sim"]["online_calls"] == 0
    # the same work in both phases, at half the price
    assert (batch["input_tokens"], batch["output_tokens"]) == (online["input_tokens"], online["output_tokens"])
    assert run["pairs"]["compared"] == run["pairs"]["same_tokens"] == REQUESTS
    assert 0.49 <= run["cost_ratio"] <= 0.51
    assert run["cost_ratio"] == pytest.approx(batch["cost_per_1000_usd"] / online["cost_per_1000_usd"], abs=1e-6)
    assert report["summary"]["cost_ratio"]["per_repeat"] == [run["cost_ratio"]]
