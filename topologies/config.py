"""The configuration: one pydantic model, validated once at start.

Sources, later wins: the packaged ``default.yaml`` (only when no file is given), the YAML
file (``--config`` or ``TIERSTREAM_CONFIG``), then environment variables:
``TIERSTREAM__SECTION__FIELD=value`` for any field, plus the conventional
``KAFKA_BOOTSTRAP_SERVERS`` and ``MAX_CONCURRENT_TASKS``. Values from the environment are
parsed as YAML scalars, so ``20`` is a number and ``[a, b]`` a list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.models import AgentType, LatencyClass, Tier

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "default.yaml"
ENV_PREFIX = "TIERSTREAM__"
# Conventional names (Kubernetes manifests, the seed lesson) mapped to config paths.
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "KAFKA_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
    "MAX_CONCURRENT_TASKS": ("worker", "max_concurrent_tasks"),
}

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeUsd = Annotated[float, Field(ge=0)]
ProviderName = Literal["openai", "anthropic"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names each offending field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicPartitions(Section):
    requests: PositiveInt = 6
    tiers: PositiveInt = 6
    results: PositiveInt = 6
    costs: PositiveInt = 6
    batch: PositiveInt = 3
    guardrails: PositiveInt = 1
    dead_letters: PositiveInt = 1


KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(Section):
    """Where the cluster is and how clients authenticate to it.

    The SASL password itself is never part of the configuration: it is read at start
    from the environment variable named by ``sasl_password_env``, else from the file
    ``sasl_password_file`` (a mounted secret); see ``streams.kafka_security``.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = Field(default="agent", pattern=r"^[A-Za-z0-9._-]+$")
    replication_factor: PositiveInt = 1
    partitions: TopicPartitions = TopicPartitions()
    max_message_bytes: PositiveInt = 1_048_576
    security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    sasl_mechanism: KafkaSaslMechanism | None = None
    sasl_username: str | None = Field(default=None, min_length=1)
    sasl_password_env: str = Field(default="KAFKA_SASL_PASSWORD", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @model_validator(mode="after")
    def _security_consistent(self) -> KafkaSettings:
        protocol = self.security_protocol
        if self.uses_sasl:
            for name in ("sasl_mechanism", "sasl_username"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is required when security_protocol is {protocol}")
        else:
            # A username or mechanism next to a non-SASL protocol means someone believes
            # the connection authenticates when it does not: refuse rather than ignore.
            for name in ("sasl_mechanism", "sasl_username"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} is set but security_protocol is {protocol}; "
                        "use SASL_PLAINTEXT or SASL_SSL"
                    )
        if not self.uses_ssl:
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} is set but security_protocol is {protocol}; use SSL or SASL_SSL"
                    )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile is set without ssl_certfile")
        return self

    @property
    def broker_url(self) -> str:
        """The bootstrap list in Faust's ``kafka://host:port;host:port`` form."""
        hosts = [h.strip() for h in self.bootstrap_servers.split(",") if h.strip()]
        return ";".join(f"kafka://{h}" for h in hosts)


class TierModel(Section):
    provider: ProviderName
    model: str = Field(min_length=1)


class ClientPoolSettings(Section):
    """The provider's pool of SDK clients (``streams.providers.pool``), one per process."""

    # Clients made at start (pre-warm) and kept however idle the process is.
    min_size: int = Field(default=1, ge=0, le=64)
    # Most clients open at once; null: enough for worker.max_concurrent_tasks calls at
    # max_calls_per_client each (at least min_size).
    max_size: int | None = Field(default=None, ge=1, le=256)
    # Calls that share one client (an SDK client multiplexes them over its connection pool).
    max_calls_per_client: int = Field(default=256, ge=1, le=10_000)
    # A client is closed and replaced after this many calls (bounds what a long-lived
    # connection pool accumulates).
    recycle_after_calls: int = Field(default=100_000, ge=1)
    # Clients idle this long are closed, down to min_size.
    idle_timeout_seconds: float = Field(default=300, gt=0, le=86_400)

    @model_validator(mode="after")
    def _min_within_max(self) -> ClientPoolSettings:
        if self.max_size is not None and self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        return self

    def size_limit(self, max_concurrent_tasks: int) -> int:
        """max_size, or the clients that ``max_concurrent_tasks`` calls need."""
        if self.max_size is not None:
            return self.max_size
        return max(1, self.min_size, -(-max_concurrent_tasks // self.max_calls_per_client))


class ProviderSettings(Section):
    api_key_env: str = Field(min_length=1)
    api_key_file: Path | None = None
    base_url: str | None = None
    timeout_seconds: float = Field(default=60, gt=0)
    max_retries: int = Field(default=3, ge=0, le=20)
    retry_initial_seconds: float = Field(default=0.2, gt=0)
    retry_max_seconds: float = Field(default=10, gt=0)
    # On a 429 the process pauses that model's calls for Retry-After and multiplies its
    # rate by this factor, then recovers linearly to the full rate over recovery_seconds.
    rate_limit_backoff_factor: float = Field(default=0.5, gt=0, le=1)
    rate_limit_recovery_seconds: float = Field(default=30, gt=0)
    use_simulator: Literal["auto", "always", "never"] = "auto"
    pool: ClientPoolSettings = ClientPoolSettings()


class SimulatorSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)


class RulesSettings(Section):
    premium_keywords: list[str] = []
    nano_keywords: list[str] = []
    premium_min_chars: PositiveInt = 4000


class LearnedRouterSettings(Section):
    # The router file written by `tierstream router train`; null: the packaged default
    # (trained on the development data, see docs/routing.md).
    model: Path | None = None
    # Re-pick the file's threshold for this share of the all-top-tier quality; null:
    # the target the file was trained for.
    quality_target: float | None = Field(default=None, gt=0, le=1)


class ClassifierSettings(Section):
    strategy: Literal["rules", "llm", "learned"] = "rules"
    rules: RulesSettings = RulesSettings()
    learned: LearnedRouterSettings = LearnedRouterSettings()
    agent_type_floor: bool = True
    # Requests are classified in batches (one model pass for `learned`) of up to
    # batch_size. 0 s: a batch is what arrived while the previous one was classified, so
    # a request that arrives alone waits for nothing. Above 0: a batch closes that long
    # after it started, however few it holds, and an idle classifier wakes that often.
    batch_size: int = Field(default=256, ge=1, le=10_000)
    batch_wait_seconds: float = Field(default=0.0, ge=0, le=5)


class AgentTypeSettings(Section):
    min_tier: Tier = Tier.NANO
    # For requests that do not say: 'batch' sends them through the providers' batch APIs.
    latency_class: LatencyClass = "interactive"


class BatchSettings(Section):
    """The batch path (``streams.roles.batch``, docs/batch.md): requests marked ``batch``
    answered through OpenAI's Batch API and Anthropic's Message Batches API."""

    # false: every request is answered online, whatever it asks for.
    enabled: bool = True
    # The providers answer a batch within 24 hours; a request whose complete_by is sooner
    # than this (plus the margin) is answered online.
    completion_window_seconds: float = Field(default=86_400, gt=0, le=7 * 86_400)
    deadline_margin_seconds: float = Field(default=600, ge=0)
    # The batch topic is read max_items requests at a time, or what arrived within
    # max_age_seconds; a read is split per partition and model into provider batches of at
    # most max_bytes of requests. A batch's record on the batch-jobs topic carries its
    # requests, so max_bytes stays under kafka.max_message_bytes.
    max_items: int = Field(default=1000, ge=1, le=50_000)
    max_bytes: int = Field(default=600_000, ge=1024)
    max_age_seconds: float = Field(default=60, gt=0, le=3600)
    # How often open batches are asked for their state.
    poll_seconds: float = Field(default=30, gt=0, le=3600)
    # The batch price as a share of the online price (both providers: half).
    price_factor: float = Field(default=0.5, gt=0, le=1)
    # An item that errored, expired or was cancelled: answered online, or dead-lettered.
    on_item_failure: Literal["online", "dead_letter"] = "online"
    # The providers' batch queue limits, per model, over every open batch of the cluster;
    # null: no limit. A batch waits for room before it is submitted.
    max_enqueued_requests: PositiveInt | None = None
    max_enqueued_tokens: PositiveInt | None = None


class RateLimit(Section):
    """A limit for one agent type that holds for the whole cluster (see streams.ratelimit).

    ``burst`` requests may go at once; the refill rate is what is left of the minute's
    limit after the burst, so no sliding 60 s window ever sees more than the limit.
    """

    requests_per_minute: PositiveInt
    tokens_per_minute: PositiveInt
    burst: PositiveInt = 1
    # true: a separate limit of this size for each provider model serving the agent type
    per_model: bool = False
    # The tiers whose workers share the limit (default: all three, since a tier_hint can
    # send any agent type to any tier). Listing fewer gives each a larger share; a request
    # routed to an unlisted tier is dead-lettered (code rate_limit_scope).
    tiers: list[Tier] | None = Field(default=None, min_length=1)
    # Output tokens count as max_output_tokens (what OpenAI and the simulator charge at
    # admission) or as the usage the provider reported.
    count_output: Literal["max_output_tokens", "usage"] = "max_output_tokens"

    @model_validator(mode="after")
    def _burst_below_limit(self) -> RateLimit:
        if self.burst >= self.requests_per_minute:
            raise ValueError("burst must be below requests_per_minute")
        if self.tiers is not None and len(set(self.tiers)) != len(self.tiers):
            raise ValueError("tiers: each tier at most once")
        return self


class CostGuardrails(Section):
    max_cost_per_workflow_usd: NonNegativeUsd = 1.0
    max_cost_per_hour_usd: NonNegativeUsd = 50.0
    alert_threshold_usd: NonNegativeUsd = 40.0
    # A workflow idle this long is forgotten: its next request starts a new budget.
    workflow_idle_expiry_seconds: float = Field(default=86_400, gt=0)
    # Above the alert threshold, serve PREMIUM requests with the STANDARD model.
    downgrade_premium_above_alert: bool = False
    # A budget lease its holder has not renewed for this long is expired by the cost role
    # (its holder stopped): what it did not spend is free again. Holders renew at a third.
    lease_seconds: float = Field(default=10.0, ge=1.0, le=600.0)
    # The share of the workflow budget that tier workers may hold, per costs partition, as
    # openings: budget for the first calls of a workflow a worker holds no lease of yet,
    # spent without waiting for a grant. The cost role counts the openings against every
    # workflow of their partition until used there, so at most this share of a workflow's
    # budget can sit unused. 0: a worker's first call of each workflow waits for a grant.
    opening_share: float = Field(default=0.02, ge=0.0, le=0.5)
    # When a limit has room left but less than the next call's worst case, that call is
    # still made (one at a time per limit): a limit is passed by at most one call's worst
    # case, and all of it can be spent. False: never passed, and up to one worst case of
    # each limit stays unspent. Batches never overdraw (their worst case is many calls').
    overdraft: bool = True

    @model_validator(mode="after")
    def _alert_below_limit(self) -> CostGuardrails:
        if self.alert_threshold_usd > self.max_cost_per_hour_usd:
            raise ValueError("alert_threshold_usd must not exceed max_cost_per_hour_usd")
        return self


class ModelPrice(Section):
    input_per_mtok: NonNegativeUsd
    output_per_mtok: NonNegativeUsd
    cached_input_per_mtok: NonNegativeUsd | None = None
    # Input plus output tokens the model accepts; None: genai-prices' figure, if it has one.
    context_window_tokens: PositiveInt | None = None


class WorkerSettings(Section):
    max_concurrent_tasks: PositiveInt = 64
    max_request_bytes: PositiveInt = 262_144
    # How long the group waits for a worker that stopped heartbeating (a SIGKILL, a lost
    # node) before its partitions move to a live one.
    session_timeout_seconds: float = Field(default=15, ge=6, le=300)
    datadir: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False
    health_port: int = Field(default=8080, ge=0, le=65535)  # /health /ready /metrics; 0: any free port
    # On SIGTERM, how long calls already in flight may take to finish before the worker
    # leaves its group; the rest are handed back uncommitted. Below Kubernetes'
    # terminationGracePeriodSeconds (60 in deploy/k8s), with room for the commit and leave.
    shutdown_grace_seconds: float = Field(default=25, ge=0, le=50)
    # How far back a tier worker reads the results topic to recognise a request it reads
    # again (after a crash or rebalance) as already answered. Memory: ~100 B per result.
    dedupe_window_seconds: float = Field(default=900, gt=0, le=7 * 24 * 3600)
    # How rate limits are shared: "partitions" (each process gets the share of its assigned
    # tier partitions: cluster-wide) or "process" (each process enforces the whole limit:
    # the naive per-process limiter, N replicas send N times the limit; for benchmarks).
    rate_limit_sharing: Literal["partitions", "process"] = "partitions"
    # The cyclic collector's thresholds (gc.set_threshold) in worker processes. CPython's
    # (700, 10, 10) walk every call in flight each few hundred allocations: at 64-4,000
    # calls in flight that is about a tenth of a tier worker's CPU (docs/benchmarks.md).
    gc_thresholds: tuple[PositiveInt, PositiveInt, PositiveInt] = (20_000, 20, 10)


class Settings(Section):
    app_id: str = Field(default="tierstream", pattern=r"^[A-Za-z0-9._-]+$")
    kafka: KafkaSettings = KafkaSettings()
    tiers: dict[Tier, TierModel]
    providers: dict[ProviderName, ProviderSettings]
    simulator: SimulatorSettings = SimulatorSettings()
    classifier: ClassifierSettings = ClassifierSettings()
    agent_types: dict[AgentType, AgentTypeSettings] = Field(min_length=1)
    rate_limits: dict[AgentType, RateLimit] = {}
    cost_guardrails: CostGuardrails = CostGuardrails()
    prices: dict[str, ModelPrice] = {}
    worker: WorkerSettings = WorkerSettings()
    batch: BatchSettings = BatchSettings()

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _no_rate_limits(cls, value: object) -> object:
        # `rate_limits: null` (TIERSTREAM__RATE_LIMITS=null) turns every limit off, which
        # an environment override cannot do otherwise: mappings are merged, not replaced.
        return {} if value is None else value

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        missing_tiers = [t.value for t in Tier if t not in self.tiers]
        if missing_tiers:
            raise ValueError(f"tiers: no model configured for {', '.join(missing_tiers)}")
        for tier, choice in self.tiers.items():
            if choice.provider not in self.providers:
                raise ValueError(
                    f"tiers.{tier.value}.provider: '{choice.provider}' has no entry in providers"
                )
        unknown = sorted(set(self.rate_limits) - set(self.agent_types))
        if unknown:
            raise ValueError(f"rate_limits: unknown agent types {unknown}")
        if self.batch.enabled and self.batch.max_bytes > self.kafka.max_message_bytes * 0.9:
            raise ValueError(
                f"batch.max_bytes ({self.batch.max_bytes}) must leave room under "
                f"kafka.max_message_bytes ({self.kafka.max_message_bytes}): a batch's record carries its requests"
            )
        return self


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, path in ENV_ALIASES.items():
        if environ.get(name):
            _set_path(tree, path, yaml.safe_load(environ[name]))
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
            _set_path(tree, path, yaml.safe_load(raw))
    return tree


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, merge and validate the configuration; raise :class:`ConfigError` if invalid."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("TIERSTREAM_CONFIG") or DEFAULT_CONFIG_PATH
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from None
    if loaded is None:  # an empty file: every field takes its default
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"configuration file {path} must hold a mapping at the top level")
    merged = _deep_merge(loaded, env_overrides(environ))
    if overrides:
        merged = _deep_merge(merged, overrides)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path))) from None
