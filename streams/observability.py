"""Prometheus metrics and the health/readiness/metrics HTTP server of a worker process.

Metrics are recorded at the one place every handler's output passes, the Faust agent in
:mod:`streams.runtime.worker`, by :meth:`OutgoingObserver.observe_outgoing`. Handlers stay free of
metrics code, and the hot path stays cheap: the topic alone tells a routing decision, a
result, a cost event or a dead letter; results and cost events (a few hundred bytes to a
few KB) are parsed with orjson, a dead letter's code is read from its first bytes.

State that already lives elsewhere (client pools, the guardrail view, the consumer's
offsets) is read at scrape time by collectors, so it costs nothing per message.

Labels are bounded sets only (role, tier, provider, status, code, topic, configured limit
names): never workflow_id or request_id, whose cardinality would grow with traffic.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, get_args

import mode
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from schemas.models import DeadLetterCode, Tier
from streams.envelope import Outgoing
from streams.guardrails.money import hour_window, nanos_to_usd
from streams.guardrails.view import GuardrailView
from streams.providers.pool import PoolStats
from streams.providers.registry import ProviderRegistry
from streams.ratelimit_metrics import RateLimitCollector
from streams.readiness import ProviderProbe
from streams.runtime.types import Partitions
from topologies.config import Settings
from topologies.topics import Role, Topology, tier_role

log = logging.getLogger(__name__)

# One registry per process (one role per process in production): a private registry
# rather than prometheus_client's global one keeps /metrics to tierstream's own series
# and lets tests build isolated ones.
REGISTRY = CollectorRegistry()
ADMISSION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)

UNCLASSIFIED = "unclassified"  # tier label of a request dead-lettered before classification
_DEAD_LETTER_CODES = frozenset(get_args(DeadLetterCode))
_CODE_RE = re.compile(rb'"code"\s*:\s*"([a-z_]+)"')
# Model calls take from tens of milliseconds (nano, simulator) to minutes (reasoning models).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# A rate limiter holds a call from nothing (tokens available) to a minute (window full).


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
        self.budget_admission = Histogram(
            "tierstream_budget_admission_seconds",
            "Time a model call waited for budget (leases of its workflow and of the hour).",
            ["tier"], buckets=ADMISSION_BUCKETS, registry=registry,
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
        # labels() checks and hashes its arguments under a lock on every call, on the hot
        # path; the label sets are small and fixed, so each child is looked up once.
        self._requests = functools.cache(self.requests.labels)
        self._classified = functools.cache(self.classified.labels)
        self._model_latency = functools.cache(self.model_latency.labels)
        self._tokens = functools.cache(self.tokens.labels)
        self._cost = functools.cache(self.cost.labels)
        self._dead_letters = functools.cache(self.dead_letters.labels)
        self._in_flight = functools.cache(self.in_flight.labels)
        self.pools = PoolStatsCollector()
        self.guardrails = GuardrailCollector()
        self.consumers = ConsumerLagCollector()
        self.rate_limits = RateLimitCollector()  # shares, rates, waiting, 429 back-off
        for collector in (self.pools, self.guardrails, self.consumers, self.rate_limits):
            registry.register(collector)

    # Typed hooks: what observe_outgoing calls, and what a handler could call directly.

    def record_classified(self, role: Role, tier: str) -> None:
        self._classified(tier).inc()
        self._requests(role, tier, "ok").inc()

    def record_result(
        self, role: Role, tier: str, provider: str, status: str, model_latency_seconds: float
    ) -> None:
        self._requests(role, tier, status).inc()
        self._model_latency(tier, provider).observe(model_latency_seconds)

    def record_cost(
        self, tier: str, provider: str, input_tokens: int, output_tokens: int, cost_usd: float
    ) -> None:
        self._tokens(tier, provider, "input").inc(input_tokens)
        self._tokens(tier, provider, "output").inc(output_tokens)
        self._cost(tier, provider).inc(cost_usd)

    def record_dead_letter(self, role: Role, tier: str, code: str) -> None:
        self._dead_letters(role, code).inc()
        self._requests(role, tier, "dead_letter").inc()

    @contextmanager
    def track_in_flight(self, role: Role) -> Iterator[None]:
        gauge = self._in_flight(role)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()


class ScrapeTimeCollector(Collector):
    """A collector whose families are filled from live state when Prometheus scrapes.

    ``describe`` returns the empty families, so registering reads nothing (the sources may
    not exist yet); a source that fails leaves its samples out instead of failing the scrape.
    """

    def families(self) -> list[Metric]:
        raise NotImplementedError

    def fill(self, families: list[Metric]) -> None:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield from self.families()

    def collect(self) -> Iterator[Metric]:
        families = self.families()
        try:
            self.fill(families)
        except Exception:  # metrics must never take a scrape (or a pod) down
            log.debug("%s: reading live state failed", type(self).__name__, exc_info=True)
        yield from families


StatsSource = Callable[[], Iterable[PoolStats]]


class PoolStatsCollector(ScrapeTimeCollector):
    """Client pool gauges and counters read at scrape time, so the pools pay nothing per call."""

    def __init__(self) -> None:
        self._sources: list[StatsSource] = []

    def watch(self, source: StatsSource) -> None:
        """Report the pools ``source()`` returns (e.g. ``ProviderRegistry.stats``)."""
        self._sources.append(source)

    def families(self) -> list[Metric]:
        labels = ["provider"]
        return [
            GaugeMetricFamily("tierstream_client_pool_size", "SDK clients open in the pool.", labels=labels),
            GaugeMetricFamily("tierstream_client_pool_in_use", "Calls in flight on the pool's clients.", labels=labels),
            GaugeMetricFamily("tierstream_client_pool_max_size", "Most clients the pool may open.", labels=labels),
            CounterMetricFamily("tierstream_client_pool_calls", "Calls made through the pool.", labels=labels),
            CounterMetricFamily("tierstream_client_pool_clients_created", "SDK clients the pool opened.", labels=labels),
            CounterMetricFamily("tierstream_client_pool_clients_retired", "SDK clients the pool closed.", labels=labels),
            GaugeMetricFamily("tierstream_client_pool_min_size", "Clients made at start and kept when idle.", labels=labels),
            GaugeMetricFamily(
                "tierstream_client_pool_max_calls_per_client", "Calls that may share one client.", labels=labels
            ),
            GaugeMetricFamily(
                "tierstream_client_pool_recycle_after_calls", "Calls after which a client is replaced.", labels=labels
            ),
            GaugeMetricFamily(
                "tierstream_client_pool_idle_timeout_seconds", "Idle time after which a client is closed.", labels=labels
            ),
        ]

    def fill(self, families: list[Metric]) -> None:
        size, in_use, max_size, calls, created, retired, min_size, per_client, recycle, idle = families
        for source in self._sources:
            for stats in source():
                for family, value in (
                    (size, stats.size), (in_use, stats.in_use), (max_size, stats.max_size),
                    (calls, stats.total_calls), (created, stats.created), (retired, stats.retired),
                    (min_size, stats.min_size), (per_client, stats.max_calls_per_client),
                    (recycle, stats.recycle_after), (idle, stats.idle_timeout),
                ):
                    family.add_metric([stats.name], value)  # type: ignore[attr-defined]


class GuardrailCollector(ScrapeTimeCollector):
    """The cost guardrails as this process sees them (from the spend and guardrails topics).

    Every process with a view reports the same cluster-wide figures: aggregate them with
    ``max``, not ``sum``.
    """

    def __init__(self) -> None:
        self._view: GuardrailView | None = None

    def watch(self, view: GuardrailView) -> None:
        self._view = view

    def families(self) -> list[Metric]:
        if self._view is None:
            return []
        return [
            GaugeMetricFamily(
                "tierstream_guardrail_hour_spend_usd",
                "Spend in the current hour window, cluster-wide (scope: global or a tier).",
                labels=["scope"],
            ),
            GaugeMetricFamily("tierstream_guardrail_hour_limit_usd", "The hourly spend limit in force."),
            GaugeMetricFamily("tierstream_guardrail_alert_threshold_usd", "The hourly alert threshold in force."),
            GaugeMetricFamily("tierstream_guardrail_workflow_limit_usd", "The per-workflow budget in force."),
            GaugeMetricFamily("tierstream_guardrail_alerting", "1 if this hour's spend reached the alert threshold."),
            GaugeMetricFamily("tierstream_guardrail_paused", "1 if model calls are held because the hour is spent."),
            GaugeMetricFamily(
                "tierstream_guardrail_blocked_workflows", "Workflows at their budget (their requests end as budget_exceeded)."
            ),
            GaugeMetricFamily("tierstream_guardrail_state_caught_up", "1 once the view has read the guardrail topics."),
        ]

    def fill(self, families: list[Metric]) -> None:
        view = self._view
        if view is None:
            return
        spend, hour_limit, alert, workflow_limit, alerting, paused, blocked, caught_up = families
        window = hour_window(time.time())
        for scope in ("global", *(f"tier:{t.value}" for t in Tier)):
            spend.add_metric([scope.removeprefix("tier:")], nanos_to_usd(view.hour_spend(window, scope)))  # type: ignore[attr-defined]
        for family, value in (
            (hour_limit, nanos_to_usd(view.hour_limit)),
            (alert, nanos_to_usd(view.alert_threshold)),
            (workflow_limit, nanos_to_usd(view.workflow_limit)),
            (alerting, float(view.alerting())),
            (paused, float(view.hour_paused())),
            (blocked, sum(1 for t in list(view.workflows.values()) if t.nanos >= view.workflow_limit)),
            (caught_up, float(view.caught_up.is_set())),
        ):
            family.add_metric([], value)  # type: ignore[attr-defined]


class ConsumerLagCollector(ScrapeTimeCollector):
    """Consumer lag per topic over this process's assigned partitions, at scrape time.

    Lag is the partition's high watermark minus the offset the group committed (what
    KEDA's Kafka scaler reads): messages fetched but not yet answered count as lag. Summed
    over the pods of a role it is the consumer group's lag.
    """

    def __init__(self) -> None:
        self._consumers: list[Partitions] = []

    def watch(self, consumer: Partitions) -> None:
        self._consumers.append(consumer)

    def families(self) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "tierstream_consumer_lag_messages",
                "Messages in this process's assigned partitions not yet committed by its group.",
                labels=["topic"],
            ),
            GaugeMetricFamily(
                "tierstream_consumer_assigned_partitions", "Partitions assigned to this process.", labels=["topic"]
            ),
        ]

    def fill(self, families: list[Metric]) -> None:
        lag_family, assigned_family = families
        lag: dict[str, int] = {}
        assigned: dict[str, int] = {}
        for consumer in self._consumers:
            for topic, partition in consumer.assigned():
                assigned[topic] = assigned.get(topic, 0) + 1
                lag.setdefault(topic, 0)
                highwater = consumer.highwater(topic, partition)
                if highwater is not None:
                    lag[topic] += max(0, highwater - (consumer.committed(topic, partition) or 0))
        for topic in sorted(assigned):
            lag_family.add_metric([topic], lag[topic])  # type: ignore[attr-defined]
            assigned_family.add_metric([topic], assigned[topic])  # type: ignore[attr-defined]


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
            if "budget" in cost:
                return  # a budget lease's record, not a call's cost
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


ReadinessCheck = Callable[[], str | None]  # None: fine; else why the worker is not ready
StatusReport = Callable[[], dict[str, Any]]


class HealthServer(mode.Service):
    """``/health`` (liveness), ``/ready`` and ``/metrics``.

    Ready: the consumer has joined its group and holds partitions, and every ``checks``
    entry (e.g. "providers answer") passes. ``reports`` add state to the ``/ready`` body
    without deciding readiness: a worker paused by a guardrail is working as configured,
    so it stays ready (a restart or a lost endpoint would not unpause it) and says so.
    """

    def __init__(
        self,
        consumer: Partitions,
        port: int = 8080,
        host: str = "0.0.0.0",  # probes and scrapers come from outside the pod
        registry: CollectorRegistry = REGISTRY,
        checks: dict[str, ReadinessCheck] | None = None,
        reports: dict[str, StatusReport] | None = None,
        **kwargs: Any,
    ) -> None:
        self.consumer = consumer
        self.host = host
        self.port = port
        self.registry = registry
        self.checks = dict(checks or {})
        self.reports = dict(reports or {})
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
        reasons: list[str] = []
        assigned = 0
        try:
            assigned = len(self.consumer.assigned())
        except Exception as exc:  # noqa: BLE001 - e.g. ConsumerNotStarted while the app boots
            reasons.append(f"consumer not started: {exc!r}")
        else:
            if not assigned:
                reasons.append("no partitions assigned yet")
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # noqa: BLE001 - a broken check means "not ready"
                problem = f"{name} check failed: {exc!r}"
            if problem is not None:
                reasons.append(problem)
        body: dict[str, Any] = {"assigned_partitions": assigned}
        for name, report in self.reports.items():
            try:
                body[name] = report()
            except Exception as exc:  # noqa: BLE001 - a report never decides readiness
                body[name] = {"error": repr(exc)}
        if reasons:
            # `reason` (the first) for people and probes' event messages; all in `reasons`.
            return web.json_response(
                {"status": "not_ready", "reason": reasons[0], "reasons": reasons, **body}, status=503
            )
        return web.json_response({"status": "ready", **body})

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def worker_services(
    consumer: Partitions,
    settings: Settings,
    metrics: Metrics,
    providers: ProviderRegistry | None = None,
    view: GuardrailView | None = None,
) -> list[mode.Service]:
    """The health server of one role's worker and what it reads: the consumer's lag, the
    client pools and a provider probe (roles that call models), the guardrail view."""
    metrics.consumers.watch(consumer)
    services: list[mode.Service] = []
    checks: dict[str, ReadinessCheck] = {}
    reports: dict[str, StatusReport] = {}
    if providers is not None:
        metrics.pools.watch(providers.stats)  # read at scrape time, free per call
        probe = ProviderProbe(providers.endpoints)
        services.append(probe)
        checks["providers"] = probe.not_ready
    if view is not None:
        metrics.guardrails.watch(view)
        reports["guardrails"] = view.summary
    services.append(
        HealthServer(
            consumer, port=settings.worker.health_port, registry=metrics.registry, checks=checks, reports=reports
        )
    )
    return services
