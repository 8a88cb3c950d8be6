"""Unit tests for the wire contract: models, codec and the exported JSON Schema files."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import DecodeError, decode, encode, payload_field
from schemas.export import JSON_DIR, schema_documents
from schemas.models import (
    SCHEMA_VERSION,
    WIRE_MODELS,
    AgentRequest,
    AgentResult,
    BatchJob,
    BudgetRecord,
    ChatMessage,
    CostEvent,
    DeadLetter,
    GuardrailEvent,
    LeaseState,
    SpendSnapshot,
    ThrottleEvent,
    Tier,
    TieredRequest,
    Timings,
    WireModel,
)
from schemas.routing import DATA_MODELS

T0 = datetime(2025, 3, 14, 9, 26, 53, 589_000, tzinfo=UTC)
ORIGINAL_VALUE = b'\xff\xfe{"request_id": "req-7", broken \x00 json'
ORIGINAL_KEY = b"wf-42"


def realistic(name: str) -> WireModel:
    """One realistic instance of each model in WIRE_MODELS, every optional field set."""
    request_fields: dict[str, Any] = dict(
        request_id="req-0001",
        workflow_id="wf-42",
        agent_type="researcher",
        messages=[
            ChatMessage(role="system", content="You are a careful researcher."),
            ChatMessage(role="user", content="Summarise the trade-offs of log compaction."),
        ],
        max_output_tokens=2048,
        tier_hint=Tier.STANDARD,
        metadata={"team": "search", "priority": 2, "score": 0.5, "urgent": True, "note": None},
        created_at=T0,
    )
    instances: dict[str, WireModel] = {
        "agent_request": AgentRequest(**request_fields),
        "tiered_request": TieredRequest(
            **request_fields,
            tier=Tier.PREMIUM,
            routed_by="rules",
            classified_at=T0 + timedelta(milliseconds=3),
        ),
        "agent_result": AgentResult(
            request_id="req-0001",
            workflow_id="wf-42",
            agent_type="researcher",
            status="ok",
            output="Compaction keeps the latest value per key; retention drops by age.",
            finish_reason="stop",
            tier=Tier.STANDARD,
            routed_by="hint",
            provider="anthropic",
            model="claude-sonnet-4-5",
            input_tokens=812,
            output_tokens=143,
            cost_usd=0.004581,
            attempts=2,
            timings=Timings(
                created_at=T0,
                classified_at=T0 + timedelta(milliseconds=3),
                started_at=T0 + timedelta(milliseconds=10),
                finished_at=T0 + timedelta(seconds=2, milliseconds=250),
                model_latency_ms=2201.5,
            ),
            error=None,
            metadata={"team": "search"},
        ),
        "cost_event": CostEvent(
            request_id="req-0001",
            workflow_id="wf-42",
            agent_type="researcher",
            tier=Tier.PREMIUM,
            provider="openai",
            model="o3",
            attempt=1,
            input_tokens=1200,
            output_tokens=900,
            cached_input_tokens=300,
            reasoning_tokens=640,
            cost_usd=0.00975,
            timestamp=T0,
            lease_id="tier-premium@host:42:1a2b3c#7",
        ),
        "budget_record": BudgetRecord(
            budget="request",
            lease_id="tier-premium@host:42:1a2b3c#8",
            scope="hour",
            window_start=T0.replace(minute=0, second=0, microsecond=0),
            want_nanos=40_000_000,
            least_nanos=9_750_000,
            timestamp=T0,
        ),
        "guardrail_event": GuardrailEvent(
            scope="workflow:wf-42",
            kind="limit_reached",
            action="block_workflow",
            spent_usd=1.02,
            limit_usd=1.0,
            window_start=T0,
            window_end=T0 + timedelta(hours=1),
            workflow_id="wf-42",
            reason="workflow wf-42 spent $1.02 of its $1.00 budget",
            emitted_at=T0,
        ),
        "spend_snapshot": SpendSnapshot(
            kind="hour",
            scope="tier:premium",
            window_start=T0.replace(minute=0, second=0, microsecond=0),
            partition=3,
            spent_nanos=41_250_000_000,
            last_offset=98_765,
            updated_at=T0,
            leases={"tier-premium@host:42:1a2b3c#8": LeaseState(
                granted_nanos=20_000_000, spent_nanos=9_000_000, renewed_at=T0.timestamp(),
            )},
        ),
        "throttle_event": ThrottleEvent(
            scope="openai/o3",
            provider="openai",
            model="o3",
            pause_until=T0 + timedelta(seconds=8),
            rate_factor=0.5,
            cut_at=T0,
            recovery_seconds=30,
            retry_after_seconds=8,
            origin="tier-premium/worker-7/4242/1f2e3d4c",
            emitted_at=T0,
        ),
        "batch_job": BatchJob(
            job_key="3f9a0c1e2b4d5a6f",
            state="answering",
            provider="openai",
            model="gpt-4o-mini",
            source_partition=2,
            batch_id="batch_abc123",
            items=[TieredRequest(**request_fields, tier=Tier.NANO, routed_by="rules",
                                 classified_at=T0, latency_class="batch", complete_by=T0 + timedelta(days=2))],
            created_at=T0,
            submitted_at=T0 + timedelta(seconds=1),
            written_from={"agent.results:0": 120, "agent.costs:3": 77},
            resubmissions=1,
        ),
        "dead_letter": DeadLetter(
            code="invalid_json",
            reason="not valid UTF-8 JSON",
            stage="classifier",
            source_topic="agent.requests",
            source_partition=3,
            source_offset=1_234_567,
            original_key=ORIGINAL_KEY,
            original_value=ORIGINAL_VALUE,
            request_id="req-7",
            workflow_id="wf-42",
            attempts=1,
            failed_at=T0,
        ),
    }
    return instances[name]


def request_json(**fields: Any) -> bytes:
    """A valid AgentRequest as JSON bytes, with fields changed (None removes a field)."""
    payload: dict[str, Any] = {
        "schema_version": 1,
        "request_id": "req-1",
        "workflow_id": "wf-1",
        "agent_type": "writer",
        "task": "Write a haiku about Kafka.",
    }
    for key, value in fields.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return orjson.dumps(payload)


def decode_error(raw: bytes | None, model: type[WireModel] = AgentRequest, **kw: Any) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(raw, model, **kw)
    return info.value


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(WIRE_MODELS))
def test_round_trip_every_wire_model(name: str) -> None:
    model = WIRE_MODELS[name]
    instance = realistic(name)
    assert type(instance) is model

    raw = encode(instance)
    assert isinstance(raw, bytes)
    back = decode(raw, model)

    assert type(back) is model
    assert back == instance
    assert back.model_dump() == instance.model_dump()
    assert encode(back) == raw
    assert orjson.loads(raw)["schema_version"] == SCHEMA_VERSION


def test_realistic_instances_cover_every_wire_model() -> None:
    assert sorted(WIRE_MODELS) == [
        "agent_request", "agent_result", "batch_job", "budget_record", "cost_event", "dead_letter", "guardrail_event",
        "spend_snapshot", "throttle_event", "tiered_request",
    ]


def test_throttle_event_scope_must_name_its_model() -> None:
    event = realistic("throttle_event").model_dump(mode="json")
    error = decode_error(orjson.dumps({**event, "scope": "openai/gpt-4o-mini"}), ThrottleEvent)
    assert error.code == "schema_invalid" and "scope must be '<provider>/<model>'" in error.reason
    error = decode_error(orjson.dumps({**event, "rate_factor": 0}), ThrottleEvent)
    assert "rate_factor: Input should be greater than 0" in error.reason


def test_dead_letter_bytes_survive_as_base64() -> None:
    letter = realistic("dead_letter")
    payload = orjson.loads(encode(letter))

    assert payload["original_value"] == base64.urlsafe_b64encode(ORIGINAL_VALUE).decode()
    assert payload["original_key"] == base64.urlsafe_b64encode(ORIGINAL_KEY).decode()
    assert base64.urlsafe_b64decode(payload["original_value"]) == ORIGINAL_VALUE

    back = decode(encode(letter), DeadLetter)
    assert back.original_value == ORIGINAL_VALUE
    assert back.original_key == ORIGINAL_KEY


def test_dead_letter_without_key() -> None:
    letter = DeadLetter(
        code="too_large", reason="too big", stage="tier-nano", source_topic="agent.requests.nano",
        source_partition=0, source_offset=0, original_value=b"", failed_at=T0,
    )
    payload = orjson.loads(encode(letter))
    assert payload["original_key"] is None
    assert payload["original_value"] == ""
    assert decode(encode(letter), DeadLetter) == letter


def test_encoded_datetimes_are_utc_iso8601() -> None:
    payload = orjson.loads(encode(realistic("cost_event")))
    assert payload["timestamp"] == "2025-03-14T09:26:53.589000Z"


# --------------------------------------------------------------------------- exported JSON Schema


def test_committed_json_schemas_match_the_models() -> None:
    documents = schema_documents()
    exported = {**WIRE_MODELS, **DATA_MODELS}
    assert set(documents) == {f"{name}.v{SCHEMA_VERSION}.json" for name in exported}
    stale = [
        filename
        for filename, body in documents.items()
        if not (JSON_DIR / filename).is_file() or (JSON_DIR / filename).read_bytes() != body
    ]
    assert not stale, (
        f"schemas/json is out of date for {stale}: run `make schemas` "
        "(python -m schemas.export) and commit the result"
    )


def test_no_stale_extra_file_in_schemas_json() -> None:
    on_disk = {p.name for p in JSON_DIR.iterdir()}
    extra = sorted(on_disk - set(schema_documents()))
    assert not extra, f"schemas/json holds files no model exports: {extra}; delete them"


def test_schema_documents_are_valid_json_with_ids() -> None:
    for filename, body in schema_documents().items():
        doc = orjson.loads(body)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert doc["$id"] == f"https://tierstream.dev/schemas/{filename}"
        assert body.endswith(b"}\n")
    request = orjson.loads(schema_documents()["agent_request.v1.json"])
    assert request["additionalProperties"] is False
    assert set(request["required"]) == {"request_id", "workflow_id", "agent_type"}


# --------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"{'single': 'quotes'}", b"not json", b'{"task": "a"} trailing', b"\xff\xfe\x00"],
)
def test_invalid_json(raw: bytes) -> None:
    err = decode_error(raw)
    assert err.code == "invalid_json"
    assert err.reason.startswith("not valid UTF-8 JSON")
    assert err.payload is None


def test_invalid_utf8_inside_a_json_string() -> None:
    raw = b'{"request_id": "r\xff", "workflow_id": "w", "agent_type": "writer", "task": "t"}'
    assert decode_error(raw).code == "invalid_json"


def test_none_is_invalid_json() -> None:
    err = decode_error(None)
    assert err.code == "invalid_json"
    assert "no value" in err.reason


@pytest.mark.parametrize(
    ("raw", "kind"), [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")]
)
def test_json_that_is_not_an_object(raw: bytes, kind: str) -> None:
    err = decode_error(raw)
    assert err.code == "schema_invalid"
    assert err.reason == f"expected a JSON object, got {kind}"
    assert err.payload == orjson.loads(raw)


def test_missing_request_id() -> None:
    err = decode_error(request_json(request_id=None))
    assert err.code == "schema_invalid"
    assert "request_id" in err.reason
    assert err.reason == "AgentRequest is invalid: request_id: Field required"
    assert err.payload["workflow_id"] == "wf-1"


def test_both_task_and_messages() -> None:
    err = decode_error(request_json(messages=[{"role": "user", "content": "hi"}]))
    assert err.code == "schema_invalid"
    assert "exactly one of 'task' or 'messages'" in err.reason


def test_neither_task_nor_messages() -> None:
    err = decode_error(request_json(task=None))
    assert err.code == "schema_invalid"
    assert "exactly one of 'task' or 'messages'" in err.reason


def test_extra_field_is_named() -> None:
    err = decode_error(request_json(priorty="high"))
    assert err.code == "schema_invalid"
    assert "priorty: Extra inputs are not permitted" in err.reason


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unsupported_schema_version(version: Any) -> None:
    err = decode_error(request_json(schema_version=version))
    assert err.code == "unsupported_schema_version"
    assert f"schema_version {version!r} is not supported" in err.reason
    assert err.payload["request_id"] == "req-1"


def test_missing_schema_version_means_the_current_one() -> None:
    request = decode(request_json(schema_version=None), AgentRequest)
    assert request.schema_version == 1
    assert request.request_id == "req-1"


def test_too_large() -> None:
    raw = request_json()
    err = decode_error(raw, max_bytes=len(raw) - 1)
    assert err.code == "too_large"
    assert err.reason == f"message is {len(raw)} bytes, over the limit of {len(raw) - 1} bytes"
    # exactly at the limit is fine
    assert decode(raw, AgentRequest, max_bytes=len(raw)).request_id == "req-1"


def test_too_large_is_checked_before_parsing() -> None:
    assert decode_error(b"{" * 100, max_bytes=10).code == "too_large"


@pytest.mark.parametrize("tokens", [0, -1, -1024])
def test_non_positive_max_output_tokens(tokens: int) -> None:
    err = decode_error(request_json(max_output_tokens=tokens))
    assert err.code == "schema_invalid"
    assert "max_output_tokens" in err.reason


def test_max_output_tokens_bounds_accept_one() -> None:
    assert decode(request_json(max_output_tokens=1), AgentRequest).max_output_tokens == 1
    assert decode_error(request_json(max_output_tokens=200_001)).code == "schema_invalid"


def test_invalid_identifier_is_schema_invalid() -> None:
    err = decode_error(request_json(workflow_id="has space"))
    assert err.code == "schema_invalid"
    assert "workflow_id" in err.reason


def test_reason_lists_at_most_five_errors() -> None:
    raw = orjson.dumps({f"extra_{i}": i for i in range(8)})
    err = decode_error(raw)
    assert err.code == "schema_invalid"
    # 3 required fields missing + 8 extras = 11 errors; the 6 beyond the limit are counted
    assert err.reason.endswith("... and 6 more")
    assert err.reason.count(";") == 5


def test_payload_field_labels_dead_letters() -> None:
    err = decode_error(request_json(agent_type="Not Valid"))
    assert err.code == "schema_invalid"
    assert payload_field(err.payload, "request_id") == "req-1"
    assert payload_field(err.payload, "workflow_id") == "wf-1"
    assert payload_field(err.payload, "missing") is None


@pytest.mark.parametrize(
    "payload",
    [None, [1, 2], "req-1", {"request_id": 42}, {"request_id": None}, {"request_id": "x" * 129}],
)
def test_payload_field_ignores_what_is_not_a_short_string(payload: Any) -> None:
    assert payload_field(payload, "request_id") is None


def test_payload_field_accepts_128_characters() -> None:
    assert payload_field({"request_id": "x" * 128}, "request_id") == "x" * 128


# --------------------------------------------------------------------------- chat()


def test_chat_from_task() -> None:
    request = AgentRequest(request_id="r", workflow_id="w", agent_type="writer", task="Say hi")
    assert request.chat() == [ChatMessage(role="user", content="Say hi")]
    assert request.prompt_text() == "Say hi"


def test_chat_from_messages() -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Say hi"),
        ChatMessage(role="assistant", content="Hi."),
        ChatMessage(role="user", content="Again"),
    ]
    request = AgentRequest(request_id="r", workflow_id="w", agent_type="writer", messages=messages)
    assert request.chat() == messages
    assert request.prompt_text() == "Be brief.\nSay hi\nHi.\nAgain"


def test_empty_task_or_messages_are_rejected() -> None:
    assert decode_error(request_json(task="")).code == "schema_invalid"
    assert decode_error(request_json(task=None, messages=[])).code == "schema_invalid"


# --------------------------------------------------------------------------- property


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
_json_value = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_field_names = st.sampled_from(
    [*AgentRequest.model_fields, "unknown", "role", "content"]
)
_request_like = st.dictionaries(_field_names | st.text(max_size=8), _json_value, max_size=10).map(
    orjson.dumps
)
_VALID_REQUEST = orjson.loads(request_json())
# A valid request with up to two fields replaced, removed (None) or added: reaches the
# success path and every validation branch, not only the JSON parser.
_mutated_request = st.dictionaries(_field_names, _json_value, max_size=2).map(
    lambda changes: orjson.dumps({**_VALID_REQUEST, **changes})
)
_arbitrary_bytes = (
    st.binary(max_size=512)
    | _request_like
    | _mutated_request
    | _json_value.map(orjson.dumps)
)


@settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(raw=_arbitrary_bytes, max_bytes=st.none() | st.integers(min_value=0, max_value=600))
def test_decode_returns_a_request_or_raises_decode_error(raw: bytes, max_bytes: int | None) -> None:
    try:
        result = decode(raw, AgentRequest, max_bytes=max_bytes)
    except DecodeError as exc:
        assert exc.code in {"invalid_json", "schema_invalid", "unsupported_schema_version", "too_large"}
        assert exc.reason
        if max_bytes is not None and len(raw) > max_bytes:
            assert exc.code == "too_large"
    else:
        assert isinstance(result, AgentRequest)
        assert max_bytes is None or len(raw) <= max_bytes
