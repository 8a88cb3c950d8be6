"""Prometheus metrics and the health/readiness/metrics HTTP server of a worker process.

Metrics are recorded at the one place every handler's output passes, the Faust agent in
:mod:`streams.app`, by :meth:`OutgoingObserver.observe_outgoing`. Handlers stay free of
metrics code, and the hot path stays cheap: the topic alone tells a routing decision, a
result, a cost event or a dead letter; results and cost events (a few hundred bytes to a
few KB) are parsed with orjson, a dead letter's code is read from its first bytes.

Labels are bounded sets only (role, tier, provider, status, code): never workflow_id or
request_id, whose cardinality would grow with traffic.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, get_args

import mode
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from schemas.models import DeadLetterCode, Tier
from streams.envelope import Outgoing
from streams.providers.pool import PoolStats
from topologies.topics import Role, Topology, tier_role

log = logging.getLogger(__name__)

# One registry per process (one role per process in production): a private registry
# rather than prometheus_client's global one keeps /metrics to tierstream's own series
# and lets tests build isolated ones.
REGISTRY = CollectorRegistry()

UNCLASSIFIED = "unclassified"  # tier label of a request dead-lettered before classification
_DEAD_LETTER_CODES = frozenset(get_args(DeadLetterCode))
_CODE_RE = re.compile(rb'"code"\s*:\s*"([a-z_]+)"')
# Model calls take from tens of milliseconds (nano, simulator) to minutes (reasoning models).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """Every tierstream metric, registered on one registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.requests = Counter(
            "tierstream_requests_processed_total",
            "Requests a role finished with, by outcome (ok, error, dead_letter, ...).",
            ["role", "tier", "status"], registry=registry,
        )
        self.classified = Counter(
            "tierstream_classifier_decisions_total",
            "Requests the classifier routed, by the tier it chose.",
            ["tier"], registry=registry,
        )
        self.model_latency = Histogram(
            "tierstream_model_call_duration_seconds",
            "Time in the provider call(s) of one request, retries included.",
            ["tier", "provider"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.tokens = Counter(
            "tierstream_tokens_total",
            "Tokens billed by providers, by direction (input, output).",
            ["tier", "provider", "direction"], registry=registry,
        )
        self.cost = Counter(
            "tierstream_cost_usd_total",
            "Model spend in US dollars, from the cost events.",
            ["tier", "provider"], registry=registry,
        )
        self.dead_letters = Counter(
            "tierstream_dead_letters_total",
            "Messages written to the dead-letter topic, by machine code.",
            ["role", "code"], registry=registry,
        )
        self.in_flight = Gauge(
            "tierstream_calls_in_flight",
            "Messages being handled right now (provider calls in flight for tier roles).",
            ["role"], registry=registry,
        )
        self.pools = PoolStatsCollector()
        registry.register(self.pools)

    # Typed hooks: what observe_outgoing calls, and what a handler could call directly.

    def record_classified(self, role: Role, tier: str) -> None:
        self.classified.labels(tier).inc()
        self.requests.labels(role, tier, "ok").inc()

    def record_result(
        self, role: Role, tier: str, provider: str, status: str, model_latency_seconds: float
    ) -> None:
        self.requests.labels(role, tier, status).inc()
        self.model_latency.labels(tier, provider).observe(model_latency_seconds)

    def record_cost(
        self, tier: str, provider: str, input_tokens: int, output_tokens: int, cost_usd: float
    ) -> None:
        self.tokens.labels(tier, provider, "input").inc(input_tokens)
        self.tokens.labels(tier, provider, "output").inc(output_tokens)
        self.cost.labels(tier, provider).inc(cost_usd)

    def record_dead_letter(self, role: Role, tier: str, code: str) -> None:
        self.dead_letters.labels(role, code).inc()
        self.requests.labels(role, tier, "dead_letter").inc()

    @contextmanager
    def track_in_flight(self, role: Role) -> Iterator[None]:
        gauge = self.in_flight.labels(role)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()


StatsSource = Callable[[], Iterable[PoolStats]]


class PoolStatsCollector(Collector):
    """Client pool gauges read at scrape time, so the pools pay nothing per call."""

    def __init__(self) -> None:
        self._sources: list[StatsSource] = []

    def watch(self, source: StatsSource) -> None:
        """Report the pools ``source()`` returns (e.g. ``ProviderRegistry.stats``)."""
        self._sources.append(source)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily(
            "tierstream_client_pool_size", "SDK clients open in the pool.", labels=["provider"]
        )
        in_use = GaugeMetricFamily(
            "tierstream_client_pool_in_use", "Calls in flight on the pool's clients.", labels=["provider"]
        )
        max_size = GaugeMetricFamily(
            "tierstream_client_pool_max_size", "Most clients the pool may open.", labels=["provider"]
        )
        for source in self._sources:
            for stats in source():
                size.add_metric([stats.name], stats.size)
                in_use.add_metric([stats.name], stats.in_use)
                max_size.add_metric([stats.name], stats.max_size)
        yield from (size, in_use, max_size)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only, so registering does not call the sources (which may not exist yet).
        yield GaugeMetricFamily("tierstream_client_pool_size", "", labels=["provider"])
        yield GaugeMetricFamily("tierstream_client_pool_in_use", "", labels=["provider"])
        yield GaugeMetricFamily("tierstream_client_pool_max_size", "", labels=["provider"])


_default_metrics: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide :class:`Metrics` on :data:`REGISTRY`, created on first use."""
    global _default_metrics
    if _default_metrics is None:
        _default_metrics = Metrics(REGISTRY)
    return _default_metrics


class OutgoingObserver:
    """Turns the messages a handler returned into metrics; topic lookups are dict hits."""

    def __init__(self, topology: Topology, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or default_metrics()
        self._tier_topics = {spec.name: tier.value for tier, spec in topology.tiers.items()}
        self._results = topology.results.name
        self._costs = topology.costs.name
        self._dlq = topology.dead_letters.name
        self._role_tier = {tier_role(t): t.value for t in Tier}

    def observe_outgoing(self, role: Role, outgoing: list[Outgoing]) -> None:
        """Record one handled message's outputs. Never raises: metrics must not stop work."""
        for out in outgoing:
            try:
                self._observe(role, out)
            except Exception:  # a malformed message must not take the agent down
                log.debug("could not observe a message on %s", out.topic, exc_info=True)

    def _observe(self, role: Role, out: Outgoing) -> None:
        topic = out.topic
        tier = self._tier_topics.get(topic)
        if tier is not None:
            self.metrics.record_classified(role, tier)
        elif topic == self._results:
            result: dict[str, Any] = orjson.loads(out.value)
            latency_ms = (result.get("timings") or {}).get("model_latency_ms", 0.0)
            self.metrics.record_result(
                role, result["tier"], result["provider"], result["status"], latency_ms / 1000
            )
        elif topic == self._costs:
            cost: dict[str, Any] = orjson.loads(out.value)
            self.metrics.record_cost(
                cost["tier"], cost["provider"], cost["input_tokens"], cost["output_tokens"],
                cost["cost_usd"],
            )
        elif topic == self._dlq:
            self.metrics.record_dead_letter(
                role, self._role_tier.get(role, UNCLASSIFIED), dead_letter_code(out.value)
            )


def dead_letter_code(value: bytes) -> str:
    """The ``code`` of an encoded DeadLetter, without parsing its (base64, maybe large) body."""
    # `code` is the second field the model declares, so it sits in the first bytes.
    match = _CODE_RE.search(value, 0, 256)
    code = match.group(1).decode() if match else str(orjson.loads(value).get("code"))
    return code if code in _DEAD_LETTER_CODES else "other"


class ConsumerLike(Protocol):
    def assignment(self) -> Any: ...


class AppLike(Protocol):
    """The part of a Faust app the readiness check reads."""

    @property
    def consumer(self) -> ConsumerLike: ...


class HealthServer(mode.Service):
    """``/health`` (liveness), ``/ready`` (partitions assigned) and ``/metrics``."""

    def __init__(
        self,
        app: AppLike,
        port: int = 8080,
        host: str = "0.0.0.0",  # probes and scrapers come from outside the pod
        registry: CollectorRegistry = REGISTRY,
        **kwargs: Any,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.registry = registry
        self.bound_port: int | None = None  # the real port once started (port 0: a free one)
        self._runner: web.AppRunner | None = None
        self._started_at = time.monotonic()
        super().__init__(**kwargs)

    def web_app(self) -> web.Application:
        web_app = web.Application()
        web_app.router.add_get("/health", self._health)
        web_app.router.add_get("/ready", self._ready)
        web_app.router.add_get("/metrics", self._metrics)
        return web_app

    async def on_start(self) -> None:
        runner = web.AppRunner(self.web_app(), access_log=None)  # probes every few s: no log
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            # A port clash (several workers on one host outside Kubernetes) must not stop
            # the pipeline; in a pod the failing probes make the problem visible.
            await runner.cleanup()
            log.error("health server not started: cannot bind %s:%s: %s", self.host, self.port, exc)
            return
        self._runner = runner
        self.bound_port = runner.addresses[0][1]
        log.info("health server on %s:%s", self.host, self.bound_port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _request: web.Request) -> web.Response:
        # Answering at all proves the event loop is not blocked or dead.
        return web.json_response(
            {"status": "ok", "uptime_seconds": round(time.monotonic() - self._started_at, 1)}
        )

    async def _ready(self, _request: web.Request) -> web.Response:
        try:
            assigned = len(self.app.consumer.assignment())
        except Exception as exc:  # e.g. ConsumerNotStarted while the app boots
            return web.json_response(
                {"status": "not_ready", "reason": f"consumer not started: {exc!r}"}, status=503
            )
        if not assigned:
            return web.json_response(
                {"status": "not_ready", "reason": "no partitions assigned yet"}, status=503
            )
        return web.json_response({"status": "ready", "assigned_partitions": assigned})

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
