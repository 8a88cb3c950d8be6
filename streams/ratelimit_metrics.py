"""Prometheus gauges for the rate limiter and the 429 throttles, read at scrape time
(nothing per call); ``streams.observability.Metrics.rate_limits`` is the registry's one
instance, which each app feeds with ``watch``. Also what ``tierstream status`` reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # types only: observability imports this module
    from streams.providers.registry import ProviderRegistry
    from streams.ratelimit import RateLimiter

_LIMIT_LABELS = ["agent_type", "model", "tier"]


class RateLimitCollector(Collector):
    """One per registry (``Metrics.rate_limits``); each app adds its sources with
    ``watch``, so two apps in one process never yield the same family twice."""

    def __init__(self) -> None:
        self._sources: list[tuple[ProviderRegistry, RateLimiter | None]] = []

    def watch(self, providers: ProviderRegistry, limiter: RateLimiter | None) -> None:
        self._sources.append((providers, limiter))

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        factor = GaugeMetricFamily(
            "tierstream_ratelimit_throttle_factor",
            "Fraction of the configured rate allowed after 429s (1 = full).", labels=["provider", "model"],
        )
        throttled = CounterMetricFamily(
            "tierstream_ratelimit_provider_429", "429 answers seen by this process.", labels=["provider", "model"],
        )
        pause = GaugeMetricFamily(
            "tierstream_ratelimit_throttle_pause_seconds",
            "Seconds left of the Retry-After pause (from a 429 here or in another replica).",
            labels=["provider", "model"],
        )
        sent = CounterMetricFamily(
            "tierstream_ratelimit_throttle_events_sent",
            "429 back-off changes this process published to the other replicas.", labels=["provider", "model"],
        )
        applied = CounterMetricFamily(
            "tierstream_ratelimit_throttle_events_applied",
            "Other replicas' 429 back-off that paused or slowed this process.", labels=["provider", "model"],
        )
        for providers, _ in self._sources:
            for (provider, model), throttle in providers.throttles.items():
                labels = [provider, model]
                factor.add_metric(labels, throttle.factor())
                throttled.add_metric(labels, throttle.rate_limited)
                pause.add_metric(labels, throttle.pause_remaining())
                sent.add_metric(labels, throttle.events_sent)
                applied.add_metric(labels, throttle.events_applied)
        yield from (factor, throttled, pause, sent, applied)
        share = GaugeMetricFamily(
            "tierstream_ratelimit_share", "This process's share of the cluster-wide limit.", labels=_LIMIT_LABELS
        )
        rpm = GaugeMetricFamily(
            "tierstream_ratelimit_requests_per_minute",
            "Sustained requests/min this process may send (share, after 429 back-off).", labels=_LIMIT_LABELS,
        )
        tpm = GaugeMetricFamily(
            "tierstream_ratelimit_tokens_per_minute",
            "Sustained tokens/min this process may send (share, after 429 back-off).", labels=_LIMIT_LABELS,
        )
        waiting = GaugeMetricFamily(
            "tierstream_ratelimit_waiting", "Requests held by the limiter right now.", labels=_LIMIT_LABELS
        )
        admitted = CounterMetricFamily(
            "tierstream_ratelimit_admitted", "Calls the limiter let through.", labels=_LIMIT_LABELS
        )
        limits = [s for _, limiter in self._sources if limiter is not None for s in limiter.stats()]
        for s in limits:
            labels = [s.agent_type, s.model, s.tier]
            share.add_metric(labels, s.share)
            rpm.add_metric(labels, s.requests_per_minute)
            tpm.add_metric(labels, s.tokens_per_minute)
            waiting.add_metric(labels, s.waiting)
            admitted.add_metric(labels, s.admitted)
        yield from (share, rpm, tpm, waiting, admitted)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # unchecked collector: registering must not call the sources yet


# Series ``tierstream status`` shows: the pools' and the rate limiter's, by family name.
STATUS_FAMILIES = {
    "tierstream_client_pool_size": "pool_size",
    "tierstream_client_pool_in_use": "pool_in_use",
    "tierstream_client_pool_max_size": "pool_max_size",
    "tierstream_client_pool_calls": "pool_calls",
    "tierstream_client_pool_min_size": "pool_min_size",
    "tierstream_client_pool_max_calls_per_client": "pool_max_calls_per_client",
    "tierstream_client_pool_recycle_after_calls": "pool_recycle_after_calls",
    "tierstream_client_pool_idle_timeout_seconds": "pool_idle_timeout_seconds",
    "tierstream_ratelimit_share": "share",
    "tierstream_ratelimit_requests_per_minute": "requests_per_minute",
    "tierstream_ratelimit_tokens_per_minute": "tokens_per_minute",
    "tierstream_ratelimit_waiting": "waiting",
    "tierstream_ratelimit_admitted": "admitted",
    "tierstream_ratelimit_throttle_factor": "throttle_factor",
    "tierstream_ratelimit_provider_429": "provider_429",
    "tierstream_ratelimit_throttle_pause_seconds": "pause_seconds",
    "tierstream_ratelimit_throttle_events_sent": "events_sent",
    "tierstream_ratelimit_throttle_events_applied": "events_applied",
}


def parse_status(metrics_text: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{"pools": {provider: {...}}, "rate_limits": {agent_type/model: {...}},
    "throttles": {provider/model: {...}}}`` from a worker's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, dict[str, float]]] = {"pools": {}, "rate_limits": {}, "throttles": {}}
    for family in text_string_to_metric_families(metrics_text):
        field = STATUS_FAMILIES.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = sample.labels
            if "agent_type" in labels:
                group, key = "rate_limits", f"{labels['tier']}/{labels['agent_type']}/{labels['model']}"
            elif "model" in labels:
                group, key = "throttles", f"{labels['provider']}/{labels['model']}"
            else:
                group, key = "pools", labels["provider"]
            out[group].setdefault(key, {})[field] = sample.value
    return out


def read_status(urls: list[str], timeout: float = 5.0) -> list[dict[str, object]]:
    """:func:`parse_status` of each worker's ``/metrics``; an unreachable one says why."""
    import urllib.error
    import urllib.request

    report: list[dict[str, object]] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as response:
                report.append({"url": url, **parse_status(response.read().decode())})
        except (urllib.error.URLError, OSError) as exc:
            report.append({"url": url, "error": str(exc)})
    return report
