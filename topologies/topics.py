"""Topics, keys, partitions and who reads and writes what: the single source of truth.

Workers declare topics from here, the CLI creates them from here, the Kubernetes
autoscalers and the ACL example are derived from here. Change a topic in one place.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Literal

from aiokafka.partitioner import murmur2

from schemas.models import (
    AgentRequest,
    AgentResult,
    BatchJob,
    CostEvent,
    DeadLetter,
    GuardrailEvent,
    SpendSnapshot,
    ThrottleEvent,
    Tier,
    TieredRequest,
    WireModel,
)
from topologies.config import Settings

MessageKey = Literal["workflow_id", "scope", "source_key", "job_key"]

HOUR_MS = 3600 * 1000
WEEK_MS = 7 * 24 * HOUR_MS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    key: MessageKey
    value: type[WireModel]
    purpose: str
    config: dict[str, str] = field(default_factory=dict)

    @property
    def compacted(self) -> bool:
        return self.config.get("cleanup.policy") == "compact"


Role = str  # "classifier", "tier-nano", "tier-standard", "tier-premium"


@dataclass(frozen=True)
class Flow:
    role: Role
    reads: tuple[str, ...]
    writes: tuple[str, ...]


def tier_role(tier: Tier) -> Role:
    return f"tier-{tier.value}"


CLASSIFIER_ROLE: Role = "classifier"
COST_ROLE: Role = "cost"
BATCH_ROLE: Role = "batch"
ALL_ROLES: tuple[Role, ...] = (CLASSIFIER_ROLE, *(tier_role(t) for t in Tier), COST_ROLE, BATCH_ROLE)


def parse_roles(spec: str) -> list[Role]:
    """``"classifier,tier:premium"`` -> ``["classifier", "tier-premium"]``; ``"all"`` -> every role."""
    roles: list[Role] = []
    for raw in (part.strip().lower() for part in spec.split(",")):
        if not raw:
            continue
        if raw == "all":
            roles.extend(r for r in ALL_ROLES if r not in roles)
            continue
        role = raw.replace(":", "-")
        if role == "tiers":
            candidates = [tier_role(t) for t in Tier]
        elif role in ALL_ROLES:
            candidates = [role]
        else:
            raise ValueError(
                f"unknown role {raw!r}: choose from all, classifier, cost, batch, tiers, "
                + ", ".join(f"tier:{t.value}" for t in Tier)
            )
        roles.extend(r for r in candidates if r not in roles)
    if not roles:
        raise ValueError("no role given")
    return roles


class Topology:
    """Every topic of one deployment (one ``kafka.topic_prefix``)."""

    def __init__(self, settings: Settings) -> None:
        self.routing_calls_models = settings.classifier.strategy == "llm"
        kafka = settings.kafka
        prefix = kafka.topic_prefix
        parts = kafka.partitions
        rf = kafka.replication_factor
        max_bytes = str(kafka.max_message_bytes)
        common = {"max.message.bytes": max_bytes}

        self.requests = TopicSpec(
            f"{prefix}.requests", parts.requests, rf, "workflow_id", AgentRequest,
            "agent requests from producers in any language", {**common, "retention.ms": str(WEEK_MS)},
        )
        self.tiers: dict[Tier, TopicSpec] = {
            tier: TopicSpec(
                f"{prefix}.requests.{tier.value}", parts.tiers, rf, "workflow_id", TieredRequest,
                f"requests classified {tier.name}, consumed by the {tier.value} tier workers",
                {**common, "retention.ms": str(WEEK_MS)},
            )
            for tier in Tier
        }
        self.batch = TopicSpec(
            f"{prefix}.requests.batch", parts.batch, rf, "workflow_id", TieredRequest,
            "classified requests to answer through the providers' batch APIs, read by the batch role",
            {**common, "retention.ms": str(WEEK_MS)},
        )
        # One partition: the open batches of the cluster, read whole by every batch role
        # (what is enqueued per model, who owns which batch after a rebalance).
        self.batch_jobs = TopicSpec(
            f"{prefix}.batch-jobs", 1, rf, "job_key", BatchJob,
            "open provider batches: the requests each carries and how far it got "
            "(compacted: latest state per batch, a tombstone once answered)",
            {**common, "cleanup.policy": "compact"},
        )
        self.results = TopicSpec(
            f"{prefix}.results", parts.results, rf, "workflow_id", AgentResult,
            "one result per request, for downstream agents", {**common, "retention.ms": str(WEEK_MS)},
        )
        self.costs = TopicSpec(
            f"{prefix}.costs", parts.costs, rf, "workflow_id", CostEvent,
            "one cost event per model call", {**common, "retention.ms": str(WEEK_MS)},
        )
        self.guardrails = TopicSpec(
            f"{prefix}.guardrails", parts.guardrails, rf, "scope", GuardrailEvent,
            "current guardrail state per scope (compacted: the latest event is the state)",
            {**common, "cleanup.policy": "compact"},
        )
        # One partition, always: a worker relies on reading an event's hour totals before
        # its workflow total (see streams.guardrails.budget), i.e. on one total order.
        self.spend = TopicSpec(
            f"{prefix}.spend", 1, rf, "scope", SpendSnapshot,
            "running spend totals per hour and per workflow (compacted: latest per key)",
            {**common, "cleanup.policy": "compact"},
        )
        # One partition: a handful of keys (one per provider model), read whole by every
        # process that calls models. Hourly segments let compaction keep it that small.
        self.throttles = TopicSpec(
            f"{prefix}.throttles", 1, rf, "scope", ThrottleEvent,
            "429 back-off per provider model, shared by every replica (compacted: latest per model)",
            {**common, "cleanup.policy": "compact", "segment.ms": str(HOUR_MS)},
        )
        self.dead_letters = TopicSpec(
            f"{prefix}.dlq", parts.dead_letters, rf, "source_key", DeadLetter,
            "messages that could not be processed, with the reason and original bytes",
            {**common, "retention.ms": str(4 * WEEK_MS)},
        )

    def all(self) -> list[TopicSpec]:
        return [
            self.requests, *self.tiers.values(), self.batch, self.batch_jobs, self.results, self.costs,
            self.guardrails, self.spend, self.throttles, self.dead_letters,
        ]

    def flows(self) -> list[Flow]:
        tier_names = tuple(spec.name for spec in self.tiers.values())
        # The llm strategy's routing call is a model call, costed like any other.
        llm = self.routing_calls_models
        routing_costs = (self.costs.name,) if llm else ()
        # Every process that calls models follows the 429 back-off and publishes its own.
        routing_throttles = (self.throttles.name,) if llm else ()
        flows = [
            Flow(
                CLASSIFIER_ROLE,
                reads=(self.requests.name, *routing_throttles),
                writes=(*tier_names, self.batch.name, *routing_costs, *routing_throttles, self.dead_letters.name),
            )
        ]
        for tier, spec in self.tiers.items():
            flows.append(
                Flow(
                    tier_role(tier),
                    # results: the last dedupe window, to skip requests already answered
                    reads=(spec.name, self.results.name, self.spend.name, self.guardrails.name, self.throttles.name),
                    writes=(self.results.name, self.costs.name, self.throttles.name, self.dead_letters.name),
                )
            )
        flows.append(
            Flow(
                COST_ROLE,
                reads=(self.costs.name, self.spend.name, self.guardrails.name),
                writes=(self.spend.name, self.guardrails.name, self.dead_letters.name),
            )
        )
        flows.append(
            Flow(
                BATCH_ROLE,
                # the topics it writes answers to: what a batch answered before a restart is
                # read back, so it is not answered again
                reads=(self.batch.name, self.batch_jobs.name, self.results.name, self.costs.name,
                       *tier_names, self.dead_letters.name),
                # tier topics: the items a provider failed, answered online
                writes=(self.batch_jobs.name, self.results.name, self.costs.name, *tier_names, self.dead_letters.name),
            )
        )
        return flows

    def consumer_group(self, app_id: str, role: Role) -> str:
        """One consumer group per role, so any mix of processes consumes each topic once."""
        return f"{app_id}-{role}"


_BUILT: dict[int, Topology] = {}  # id(settings) -> its topology, while the settings live


def topology_of(settings: Settings) -> Topology:
    """The topology of ``settings``, built once per settings object."""
    key = id(settings)
    found = _BUILT.get(key)
    if found is None:
        found = _BUILT[key] = Topology(settings)
        weakref.finalize(settings, _BUILT.pop, key, None)  # an id is reused once its object is gone
    return found


def partition_of(key: bytes, partitions: int) -> int:
    """The partition a record keyed ``key`` goes to: murmur2, the default partitioner of
    aiokafka (which Faust's producer uses) and of the Java client."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
