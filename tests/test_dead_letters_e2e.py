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


BAD = {
    "invalid_json": b'{"request_id": "broken", "workflow_id": ',
    "schema_invalid": orjson.dumps(
        {"request_id": "no-task", "workflow_id": "wf-dlq", "agent_type": "writer", "max_output_tokens": -5}
    ),
    "unknown_agent_type": orjson.dumps(
        {"request_id": "who", "workflow_id": "wf-dlq", "agent_type": "astrologer", "task": "Read the stars."}
    ),
    "unsupported_schema_version": orjson.dumps(
        {"schema_version": 9, "request_id": "future", "workflow_id": "wf-dlq", "agent_type": "writer", "task": "x"}
    ),
}


async def test_bad_messages_go_to_the_dead_letter_topic(pipeline_factory) -> None:
    pipeline = pipeline_factory()
    await pipeline.start_workers("all")
    # Same key for all: one partition, so good messages after each bad one prove no stall.
    messages = []
    for i, bad in enumerate(BAD.values()):
        messages += [(b"wf-dlq", good(2 * i)), (b"wf-dlq", bad), (b"wf-dlq", good(2 * i + 1))]
    await produce_raw(pipeline.settings.kafka.bootstrap_servers, pipeline.topology.requests.name, messages)

    collected = await collect(pipeline, expected=len(messages), timeout=120)

    assert sorted(r["request_id"] for r in collected.results) == sorted(f"ok-{n}" for n in range(2 * len(BAD)))
    by_code = {letter["code"]: letter for letter in collected.dead_letters}
    assert sorted(by_code) == sorted(BAD), collected.dead_letters
    for code, raw in BAD.items():
        letter = by_code[code]
        assert base64.b64decode(letter["original_value"]) == raw
        assert letter["original_key"] and base64.b64decode(letter["original_key"]) == b"wf-dlq"
        assert letter["source_topic"] == pipeline.topology.requests.name
        assert letter["stage"] == "classifier"
        assert letter["reason"]
    assert "max_output_tokens" in by_code["schema_invalid"]["reason"]
    assert "astrologer" in by_code["unknown_agent_type"]["reason"]
    assert by_code["unknown_agent_type"]["request_id"] == "who"
    assert "schema_version 9" in by_code["unsupported_schema_version"]["reason"]
    pipeline.assert_workers_alive()
