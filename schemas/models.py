"""The wire contract: every message tierstream reads or writes on Kafka.

Models are frozen and reject unknown fields, so a producer's typo is a dead letter with
a reason, not a silently ignored setting. ``schema_version`` is the contract's major
version; a consumer refuses a version it does not know instead of guessing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Literal[1] = 1

Identifier = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$"),
]
AgentType = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]*$")
]
TokenCount = Annotated[int, Field(ge=0)]
Usd = Annotated[float, Field(ge=0)]
LatencyClass = Literal["interactive", "batch"]
AnsweredBy = Literal["online", "batch"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Tier(StrEnum):
    """Model tiers, cheapest first."""

    NANO = "nano"
    STANDARD = "standard"
    PREMIUM = "premium"


class WireModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        ser_json_bytes="base64",
        val_json_bytes="base64",
    )


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class AgentRequest(WireModel):
    """What a producer writes to the requests topic (key: ``workflow_id``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: Identifier = Field(description="Unique per request; results carry it back.")
    workflow_id: Identifier = Field(
        description="Groups the requests of one multi-agent workflow; the partitioning key."
    )
    agent_type: AgentType = Field(description="One of the agent types in the configuration.")
    task: str | None = Field(
        default=None, min_length=1, description="The task as plain text (or use messages)."
    )
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="The task as chat messages (or use task)."
    )
    max_output_tokens: int = Field(default=1024, ge=1, le=200_000)
    tier_hint: Tier | None = Field(
        default=None, description="Skip classification and use this tier."
    )
    latency_class: LatencyClass | None = Field(
        default=None,
        description="'batch': may be answered through the provider's batch API, at the batch "
        "price, within its completion window; 'interactive': a model call now. Null: the "
        "agent type's default (agent_types.<name>.latency_class).",
    )
    complete_by: datetime | None = Field(
        default=None,
        description="When the result is needed by. A batch request whose deadline is closer "
        "than the batch completion window is answered online.",
    )
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _exactly_one_task_form(self) -> AgentRequest:
        if (self.task is None) == (self.messages is None):
            raise ValueError("give exactly one of 'task' or 'messages'")
        return self

    def chat(self) -> list[ChatMessage]:
        """The task as chat messages, whichever form the producer used."""
        if self.messages is not None:
            return self.messages
        assert self.task is not None
        return [ChatMessage(role="user", content=self.task)]

    def prompt_text(self) -> str:
        return "\n".join(m.content for m in self.chat())


RoutedBy = Literal["hint", "rules", "learned", "llm", "llm_fallback"]


class TieredRequest(AgentRequest):
    """A request after classification, on its tier topic (key: ``workflow_id``)."""

    tier: Tier
    routed_by: RoutedBy
    classified_at: datetime = Field(default_factory=utcnow)


ResultStatus = Literal["ok", "error", "budget_exceeded"]


class Timings(WireModel):
    created_at: datetime
    classified_at: datetime
    started_at: datetime
    finished_at: datetime
    model_latency_ms: float = Field(ge=0, description="Time spent in the provider call(s).")
    budget_wait_ms: float | None = Field(
        default=None, ge=0, description="Time the call waited for budget (its leases) before it was admitted.",
    )


class AgentResult(WireModel):
    """The answer to one request, on the results topic (key: ``workflow_id``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: Identifier
    workflow_id: Identifier
    agent_type: AgentType
    status: ResultStatus
    output: str | None = None
    finish_reason: str | None = None
    tier: Tier = Field(description="The tier whose model answered.")
    downgraded_from: Tier | None = Field(
        default=None, description="Set when budget-aware downgrade served a cheaper tier."
    )
    routed_by: RoutedBy
    provider: str
    model: str
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cost_usd: Usd = 0.0
    attempts: int = Field(ge=0, description="Provider calls made for this request.")
    timings: Timings
    error: str | None = None
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    answered_by: AnsweredBy = Field(
        default="online", description="'batch': through the provider's batch API, at the batch price."
    )
    batch_id: str | None = Field(default=None, description="The provider's batch that answered it.")


class CostEvent(WireModel):
    """One model call's cost, on the costs topic (key: ``workflow_id``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: Identifier
    workflow_id: Identifier
    agent_type: AgentType
    tier: Tier
    provider: str
    model: str
    attempt: int = Field(ge=1)
    input_tokens: TokenCount
    output_tokens: TokenCount
    cached_input_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    cost_usd: Usd
    timestamp: datetime = Field(default_factory=utcnow)
    lease_id: str | None = Field(
        default=None, max_length=200,
        description="The workflow budget lease the call was admitted under (see BudgetRecord).",
    )
    window_start: datetime | None = Field(
        default=None,
        description="The hour this cost counts against when it is not the hour the event was "
        "written in: a batch item's cost counts in the hour its batch was submitted, where its "
        "worst case was reserved.",
    )


class BudgetRecord(WireModel):
    """A budget lease's request, renewal, return or spend, on the costs topic beside the
    cost events (key: the workflow_id for a workflow's budget, ``hour`` for the hourly
    limit), so the cost role that counts a scope's spend also grants its leases, in the
    same order. Readers of the costs topic tell the two apart by the ``budget`` field.
    A partition's openings (scope ``~openings``) are keyed by any workflow_id of that
    partition; ``open`` turns an opening's share of a workflow into a lease of it.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    budget: Literal["request", "renew", "return", "spend", "open"]
    lease_id: str = Field(min_length=1, max_length=200, description="'<holder>#<n>'")
    scope: str = Field(min_length=1, max_length=128, description="'hour' or a workflow_id.")
    window_start: datetime | None = Field(default=None, description="The hour of an hourly lease.")
    want_nanos: int = Field(default=0, ge=0, description="request: the amount asked for.")
    least_nanos: int = Field(default=0, ge=0, description="request: the least worth granting.")
    spent_nanos: int = Field(default=0, ge=0, description="spend: what calls under the lease cost since its previous spend record.")
    overdraft: bool = Field(
        default=False,
        description="request: least_nanos is one call's worst case, granted even if the scope's room is "
        "above zero but below it (the limit is then passed by at most that call).",
    )
    opening_id: str | None = Field(
        default=None, max_length=200,
        description="open: the opening (a lease of scope '~openings' in this partition) whose share "
        "of the workflow becomes the lease lease_id.",
    )
    timestamp: datetime = Field(default_factory=utcnow)


class LeaseState(WireModel):
    """One outstanding lease, as the cost role last counted it."""

    granted_nanos: int = Field(ge=0)
    spent_nanos: int = Field(ge=0)
    renewed_at: float = Field(description="Epoch seconds of its request or last renewal.")


GuardrailKind = Literal["alert", "limit_reached", "cleared", "limit_set"]
GuardrailAction = Literal["none", "pause", "block_workflow", "resume", "unblock_workflow", "set_limit"]


class GuardrailEvent(WireModel):
    """A change of guardrail state, on the compacted guardrails topic (key: ``scope``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    scope: str = Field(
        min_length=1,
        description="'hour', 'workflow:<workflow_id>', 'limit:hour', 'limit:workflow' "
        "or 'resume:hour'.",
    )
    kind: GuardrailKind
    action: GuardrailAction
    spent_usd: Usd
    limit_usd: Usd
    window_start: datetime | None = None
    window_end: datetime | None = None
    workflow_id: Identifier | None = None
    reason: str
    emitted_at: datetime = Field(default_factory=utcnow)


class SpendSnapshot(WireModel):
    """A running total kept by the cost role, on the compacted spend topic.

    Hourly totals are kept per costs-topic partition (key
    ``hour|<window_start>|<scope>|p<partition>``) so that each is updated by one
    partition's events in order; a reader sums the partitions. ``last_offset`` is the
    last costs-topic offset the total includes: a tier worker uses it to tell whether
    its own recent calls are already counted.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["hour", "workflow", "openings"]
    scope: str = Field(description="'global' or 'tier:<tier>' for hours; the workflow_id for workflows.")
    window_start: datetime | None = None
    partition: int = Field(ge=0)
    spent_nanos: int = Field(ge=0, description="Spend in units of 1e-9 USD: sums stay exact.")
    last_offset: int = Field(ge=0)
    updated_at: datetime = Field(default_factory=utcnow)
    leases: dict[str, LeaseState] = Field(
        default_factory=dict,
        description="Outstanding budget leases of this scope ('ledger' hours, workflows, a partition's openings).",
    )
    opened: list[str] = Field(
        default_factory=list,
        description="workflow: the openings already turned into leases of this workflow, which no "
        "longer hold part of its budget.",
    )

    @property
    def spent_usd(self) -> float:
        return self.spent_nanos / 1e9


class ThrottleEvent(WireModel):
    """A provider answered 429: every replica holds calls to ``model`` until
    ``pause_until`` and sends at ``rate_factor`` of its rate from ``cut_at``, recovering
    linearly to the full rate over ``recovery_seconds``. On the compacted throttles topic
    (key: ``scope``). Carries no request, prompt or credential."""

    schema_version: Literal[1] = SCHEMA_VERSION
    scope: str = Field(min_length=1, max_length=300, description="'<provider>/<model>': the throttle's key.")
    provider: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=200)
    pause_until: datetime = Field(description="No call to this model before this time (UTC): Retry-After, absolute.")
    rate_factor: float = Field(gt=0, le=1, description="Fraction of the configured rate allowed at cut_at.")
    cut_at: datetime = Field(description="When the rate was cut; it recovers linearly from here.")
    recovery_seconds: float = Field(gt=0, description="Time from cut_at back to the full rate.")
    retry_after_seconds: float | None = Field(default=None, ge=0, description="What the provider asked for.")
    origin: str = Field(
        min_length=1, max_length=200, description="The worker process that got the 429 (role/host/pid/nonce)."
    )
    emitted_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _scope_names_the_model(self) -> ThrottleEvent:
        if self.scope != f"{self.provider}/{self.model}":
            raise ValueError("scope must be '<provider>/<model>'")
        return self


DeadLetterCode = Literal[
    "invalid_json",
    "schema_invalid",
    "unsupported_schema_version",
    "unknown_agent_type",
    "too_large",
    "context_too_long",
    "provider_error",
    "rate_limit_scope",
    "batch_failed",
]


class DeadLetter(WireModel):
    """A message tierstream could not process, on the dead-letter topic.

    ``original_value`` and ``original_key`` are the bytes as read (URL-safe base64 in
    JSON, RFC 4648 section 5), so the message can be repaired and replayed.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    code: DeadLetterCode
    reason: str = Field(description="What was wrong, for a person to act on.")
    stage: str = Field(description="The role that gave up: classifier, tier-nano, ...")
    source_topic: str
    source_partition: int = Field(ge=0)
    source_offset: int = Field(ge=0)
    original_key: bytes | None = None
    original_value: bytes
    request_id: str | None = None
    workflow_id: str | None = None
    attempts: int = 0
    failed_at: datetime = Field(default_factory=utcnow)


BatchState = Literal["submitting", "submitted", "answering", "answered"]


class BatchJob(WireModel):
    """One batch of requests sent to a provider's batch API, on the compacted batch-jobs
    topic (key: ``job_key``; a tombstone once every item is answered).

    ``submitting`` is written before the batch is sent, ``submitted`` once the provider
    named it, ``answering`` before its results are written, with where the topics it
    writes ended then, ``answered`` (without items) once every item is: a batch role that
    restarts knows what it sent and what it already answered (see docs/batch.md).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    job_key: str = Field(pattern=r"^[a-z0-9]{1,32}$", description="Ours; item i's custom_id is '<job_key>-<i>'.")
    state: BatchState
    provider: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=200)
    source_partition: int = Field(ge=0, description="The batch topic's partition its requests came from.")
    batch_id: str | None = Field(default=None, description="The provider's id, once submitted.")
    items: list[TieredRequest] = Field(default_factory=list, description="Empty once answered.")
    created_at: datetime = Field(default_factory=utcnow)
    submitted_at: datetime | None = None
    written_from: dict[str, int] = Field(
        default_factory=dict,
        description="answering: '<topic>:<partition>' -> the end offset before its results were written.",
    )
    resubmissions: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _items_while_open(self) -> BatchJob:
        if self.state != "answered" and not self.items:
            raise ValueError(f"a batch in state {self.state!r} carries at least one request")
        return self


WIRE_MODELS: dict[str, type[WireModel]] = {
    "agent_request": AgentRequest,
    "tiered_request": TieredRequest,
    "agent_result": AgentResult,
    "cost_event": CostEvent,
    "budget_record": BudgetRecord,
    "guardrail_event": GuardrailEvent,
    "spend_snapshot": SpendSnapshot,
    "throttle_event": ThrottleEvent,
    "dead_letter": DeadLetter,
    "batch_job": BatchJob,
}
