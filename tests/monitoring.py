"""Helpers for the monitoring tests: promtool, and a registry with every metric in use."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from faust.types import TP
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from schemas.codec import encode
from schemas.models import SpendSnapshot, Tier
from streams.guardrails.money import hour_window, usd_to_nanos
from streams.guardrails.view import GuardrailView
from streams.observability import Metrics
from streams.providers import ProviderRegistry
from streams.providers.pool import PoolStats
from streams.ratelimit import RateLimiter
from topologies.config import load_settings
from topologies.topics import Topology

ROOT = Path(__file__).resolve().parents[1]
LOCAL_PROMTOOL = ROOT / ".cache" / "prometheus" / "promtool"  # deploy/prometheus/install-promtool.sh


def promtool() -> str:
    """The promtool to use, or skip the test saying how to get one."""
    found = shutil.which("promtool") or (str(LOCAL_PROMTOOL) if LOCAL_PROMTOOL.is_file() else None)
    if found is None:
        pytest.skip(
            "promtool not found (on PATH or .cache/prometheus/): `make promtool` unpacks it from "
            "Debian's prometheus package; `make test` tries that first"
        )
    return found


def run_promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin.decode() if stdin is not None else None,
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )


class FakeLagConsumer:
    """What the lag collector reads of a worker's consumer (streams.runtime.types.Partitions):
    assignment, high watermarks and the committed offsets (next offset to read), which tests set."""

    def __init__(self, highwaters: dict[TP, int | None], committed: dict[TP, int | None]) -> None:
        self.highwaters = highwaters
        self._committed_offset = committed

    def assigned(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self.highwaters}

    def highwater(self, topic: str, partition: int) -> int | None:
        return self.highwaters[TP(topic, partition)]

    def committed(self, topic: str, partition: int) -> int | None:
        return self._committed_offset.get(TP(topic, partition))


def spend(view: GuardrailView, scope: str, usd: float, partition: int = 0) -> None:
    """Feed the view a spend snapshot: this hour's (scope global or tier:<t>) or a workflow's."""
    kind = "hour" if scope == "global" or scope.startswith("tier:") else "workflow"
    snap = SpendSnapshot(
        kind=kind, scope=scope, partition=partition, spent_nanos=usd_to_nanos(usd), last_offset=1,
        window_start=datetime.fromtimestamp(hour_window(time.time()), UTC) if kind == "hour" else None,
    )
    view.apply(view.topology.spend.name, encode(snap))


def exercised_metrics() -> Metrics:
    """A fresh :class:`Metrics` in which every family has at least one sample."""
    metrics = Metrics(CollectorRegistry())
    metrics.record_classified("classifier", "nano")
    metrics.record_result("tier-nano", "nano", "openai", "ok", 0.2)
    metrics.record_cost("nano", "openai", 10, 20, 0.001)
    metrics.record_dead_letter("tier-premium", "premium", "provider_error")
    metrics.budget_admission.labels("premium").observe(0.002)
    with metrics.track_in_flight("tier-nano"):
        pass
    metrics.pools.watch(lambda: [PoolStats("openai", 1, 0, 2, 5, 1, 0, 1, 256, 100_000, 300.0)])
    view = GuardrailView(load_settings(environ={}))
    spend(view, "global", 1.5)
    spend(view, "tier:nano", 1.5)
    spend(view, "wf-1", 0.5)
    metrics.guardrails.watch(view)
    settings = load_settings(environ={"TIERSTREAM__RATE_LIMITS__RESEARCHER__TIERS": "[premium]"})
    providers = ProviderRegistry(settings)
    limiter = RateLimiter(settings, Tier.PREMIUM, Topology(settings), providers.throttles)
    premium = Topology(settings).tiers[Tier.PREMIUM].name
    limiter.on_assignment([(premium, 0), (premium, 1)])
    providers.throttles.get("openai", "o3").on_rate_limited(1.0)
    metrics.rate_limits.watch(providers, limiter)
    consumer = FakeLagConsumer({TP("agent.requests.nano", 0): 10}, {TP("agent.requests.nano", 0): 3})
    metrics.consumers.watch(consumer)
    return metrics


def exposition(metrics: Metrics) -> bytes:
    return generate_latest(metrics.registry)
