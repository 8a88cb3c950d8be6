"""Bad input on a real broker: each bad message lands in the dead-letter topic with a
reason and its original bytes, and the requests after it are still answered."""

from __future__ import annotations

import base64

import orjson
import pytest

from tests.support import collect, produce_raw

pytestmark = pytest.mark.e2e


def good(n: int) -> bytes:
    return orjson.dumps(
        {"request_id": f"ok-{n}", "workflow_id": "wf-dlq", "agent_type": "writer",
         "task": f"Write a haiku about queue {n}.", "max_output_tokens": 40}
    )


def bad_request(**fields: object) -> bytes:
    base: dict[str, object] = {"workflow_id": "wf-dlq", "agent_type": "writer", "task": "Write a haiku."}
    return orjson.dumps({**base, **fields})


# (what is wrong, the dead-letter code it must get, the bytes sent)
CASES: list[tuple[str, str, bytes]] = [
    ("truncated JSON", "invalid_json", b'{"request_id": "broken", "workflow_id": '),
    ("not UTF-8", "invalid_json", b'\xff\xfe{"request_id": "latin"}'),
    ("a JSON list", "schema_invalid", b'["request_id", "list"]'),
    ("negative max_output_tokens", "schema_invalid", bad_request(request_id="neg", max_output_tokens=-5)),
    ("enormous max_output_tokens", "schema_invalid", bad_request(request_id="huge", max_output_tokens=10**9)),
    ("max_output_tokens of the wrong type", "schema_invalid", bad_request(request_id="type", max_output_tokens="many")),
    ("missing task", "schema_invalid", orjson.dumps({"request_id": "no-task", "workflow_id": "wf-dlq", "agent_type": "writer"})),
    ("an extra field", "schema_invalid", bad_request(request_id="extra", priority="high")),
    ("an unknown tier", "schema_invalid", bad_request(request_id="tier", tier_hint="ultra")),
    ("an unknown agent type", "unknown_agent_type", bad_request(request_id="who", agent_type="astrologer")),
    ("a future schema_version", "unsupported_schema_version", bad_request(request_id="future", schema_version=9)),
    ("over max_request_bytes", "too_large", bad_request(request_id="big", task="x" * 300_000)),
    ("over the model's context window", "context_too_long",
     bad_request(request_id="long", tier_hint="nano", max_output_tokens=150_000)),
]


async def test_bad_messages_go_to_the_dead_letter_topic(pipeline_factory) -> None:
    pipeline = pipeline_factory()
    await pipeline.start_workers("all")
    # Same key for all: one partition, so good messages after each bad one prove no stall.
    messages = []
    for i, (_, _, bad) in enumerate(CASES):
        messages += [(b"wf-dlq", good(2 * i)), (b"wf-dlq", bad), (b"wf-dlq", good(2 * i + 1))]
    await produce_raw(pipeline.settings.kafka.bootstrap_servers, pipeline.topology.requests.name, messages)

    collected = await collect(pipeline, expected=len(messages), timeout=120)

    assert sorted(r["request_id"] for r in collected.results) == sorted(f"ok-{n}" for n in range(2 * len(CASES)))
    assert len(collected.dead_letters) == len(CASES)
    by_value = {base64.urlsafe_b64decode(letter["original_value"]): letter for letter in collected.dead_letters}
    for what, code, raw in CASES:
        letter = by_value[raw]
        assert letter["code"] == code, f"{what}: {letter['code']} ({letter['reason']})"
        assert letter["original_key"] and base64.urlsafe_b64decode(letter["original_key"]) == b"wf-dlq"
        assert letter["source_topic"] == pipeline.topology.requests.name
        assert letter["stage"] == "classifier"
        assert letter["reason"], what
    reasons = {what: by_value[raw]["reason"] for what, _, raw in CASES}
    assert "max_output_tokens" in reasons["negative max_output_tokens"]
    assert "astrologer" in reasons["an unknown agent type"]
    assert "schema_version 9" in reasons["a future schema_version"]
    assert "context window" in reasons["over the model's context window"]
    assert "gpt-4o-mini" in reasons["over the model's context window"]
    assert by_value[bad_request(request_id="who", agent_type="astrologer")]["request_id"] == "who"
    pipeline.assert_workers_alive()
