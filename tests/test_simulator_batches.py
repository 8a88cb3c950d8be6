"""The provider simulator's batch APIs, driven only by the official async SDKs: OpenAI's
Files + Batch API and Anthropic's Message Batches API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pydantic
import pytest
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse
from openai.types import Batch
from openai.types.chat import ChatCompletion

from streams.simulator import ProviderSimulator, SimulatorConfig
from tests.support import wait_until
from tests.test_simulator import claude, oai, user

CHAT = "/v1/chat/completions"
DEADLINE_S = 20.0

SimFactory = Callable[..., Awaitable[ProviderSimulator]]


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Simulators on free ports; batches end at once unless a test asks otherwise."""
    started: list[ProviderSimulator] = []

    async def factory(**overrides: Any) -> ProviderSimulator:
        settings: dict[str, Any] = {"port": 0, "latency_ms_median": 0.0, "batch_delay_seconds": 0.0, **overrides}
        sim = ProviderSimulator(SimulatorConfig(**settings))
        await sim.start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        await sim.stop()


def chat_body(text: str, model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": user(text), **extra}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def chat_lines(bodies: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"custom_id": cid, "method": "POST", "url": CHAT, "body": body} for cid, body in bodies.items()]


async def submit(client: openai.AsyncOpenAI, data: bytes, **kwargs: Any) -> Batch:
    upload = await client.files.create(file=("batch.jsonl", data, "application/jsonl"), purpose="batch")
    return await client.batches.create(
        input_file_id=upload.id, endpoint=CHAT, completion_window="24h", **kwargs
    )


OPENAI_ENDED = {"completed", "expired", "cancelled", "failed"}


async def until_ended(client: openai.AsyncOpenAI, batch_id: str) -> Batch:
    async def poll() -> Batch:
        return await client.batches.retrieve(batch_id)

    return await wait_until(
        poll, DEADLINE_S, f"openai batch {batch_id} ended", accept=lambda b: b.status in OPENAI_ENDED, interval=0.02
    )


async def until_message_batch_ended(client: anthropic.AsyncAnthropic, batch_id: str) -> MessageBatch:
    async def poll() -> MessageBatch:
        return await client.messages.batches.retrieve(batch_id)

    return await wait_until(
        poll, DEADLINE_S, f"message batch {batch_id} ended",
        accept=lambda b: b.processing_status == "ended", interval=0.02,
    )  # fmt: skip


async def file_lines(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """The lines of an output or error file, by custom_id."""
    if file_id is None:
        return {}
    content = await client.files.content(file_id)
    lines = [orjson.loads(line) for line in content.content.splitlines() if line.strip()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice in a result file"
    return by_id


async def results(client: anthropic.AsyncAnthropic, batch_id: str) -> dict[str, Any]:
    found: dict[str, MessageBatchIndividualResponse] = {}
    async for entry in await client.messages.batches.results(batch_id):
        assert entry.custom_id not in found
        found[entry.custom_id] = entry
    return {cid: entry.result for cid, entry in found.items()}


# -- OpenAI ----------------------------------------------------------------------------


async def test_openai_batch_round_trip_matches_the_online_endpoint(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_delay_seconds=0.3)
    client = oai(sim)
    bodies = {
        "q-0": chat_body("What is a batch?", max_tokens=40),
        "q-1": chat_body("Explain Kafka partitions in depth."),
        "q-2": {**chat_body("ignored #sim:reply=exactly this"), "max_completion_tokens": 30},
    }
    data = jsonl(chat_lines(bodies))
    upload = await client.files.create(file=("batch.jsonl", data, "application/jsonl"), purpose="batch")
    assert (upload.object, upload.purpose, upload.filename) == ("file", "batch", "batch.jsonl")
    assert upload.bytes == len(data)
    assert (await client.files.retrieve(upload.id)).id == upload.id
    assert (await client.files.content(upload.id)).content == data

    created = await client.batches.create(
        input_file_id=upload.id, endpoint=CHAT, completion_window="24h", metadata={"job": "j-1"}
    )
    assert created.status == "validating"  # as the real API answers a create
    assert created.object == "batch" and created.id.startswith("batch_")
    assert created.metadata == {"job": "j-1"} and created.input_file_id == upload.id
    assert created.expires_at == created.created_at + 24 * 3600
    running = await client.batches.retrieve(created.id)
    assert running.status == "in_progress" and running.output_file_id is None
    assert running.request_counts is not None and running.request_counts.total == 3

    batch = await until_ended(client, created.id)
    assert batch.status == "completed" and batch.error_file_id is None
    assert batch.completed_at is not None and batch.in_progress_at is not None
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 3, 0)
    assert batch.model == "gpt-4o"
    output = await file_lines(client, batch.output_file_id)
    assert set(output) == set(bodies)
    input_tokens = output_tokens = 0
    for cid, body in bodies.items():
        line = output[cid]
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        offline = ChatCompletion.model_validate(line["response"]["body"])
        online = await client.chat.completions.create(**body)
        assert offline.usage is not None and online.usage is not None
        assert offline.usage.model_dump() == online.usage.model_dump()
        assert offline.choices[0].message.content == online.choices[0].message.content
        assert offline.choices[0].finish_reason == online.choices[0].finish_reason
        input_tokens += offline.usage.prompt_tokens
        output_tokens += offline.usage.completion_tokens
    assert output["q-2"]["response"]["body"]["choices"][0]["message"]["content"] == "exactly this"
    assert batch.usage is not None
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (input_tokens, output_tokens)
    output_file = await client.files.retrieve(batch.output_file_id or "")
    assert output_file.purpose == "batch_output"

    deleted = await client.files.delete(upload.id)
    assert deleted.deleted and deleted.id == upload.id
    with pytest.raises(openai.NotFoundError):
        await client.files.content(upload.id)
    await client.close()


async def test_openai_batch_completes_after_the_configured_delay(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_delay_seconds=0.6)
    client = oai(sim)
    batch = await submit(client, jsonl(chat_lines({f"r{i}": chat_body(f"q{i}") for i in range(6)})))
    seen_partial = []

    async def poll() -> Batch:
        current = await client.batches.retrieve(batch.id)
        counts = current.request_counts
        assert counts is not None
        if current.status == "in_progress" and 0 < counts.completed < 6:
            seen_partial.append(counts.completed)
        return current

    started = time.monotonic()
    ended = await wait_until(poll, DEADLINE_S, "batch ended", accept=lambda b: b.status == "completed", interval=0.02)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.5  # not before its delay (created just before `started`)
    assert ended.request_counts is not None and ended.request_counts.completed == 6
    assert seen_partial == sorted(seen_partial)  # items are answered one after another
    await client.close()


async def test_openai_item_errors_and_expiry_by_directive(make_sim: SimFactory) -> None:
    sim = await make_sim()
    client = oai(sim)
    bodies = {
        "ok": chat_body("fine"),
        "boom": chat_body("please fail #sim:batch-error"),
        "bad-request": chat_body("#sim:batch-error=400 refuse this"),
        "late": chat_body("never runs #sim:batch-expire"),
        "invalid": chat_body("zero budget", max_tokens=0),  # the online endpoint refuses it: 400
    }
    batch = await until_ended(client, (await submit(client, jsonl(chat_lines(bodies)))).id)
    assert batch.status == "expired"  # expired items only come from an expired batch
    assert batch.expired_at is not None and batch.completed_at is None
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
    output = await file_lines(client, batch.output_file_id)
    errors = await file_lines(client, batch.error_file_id)
    assert set(output) == {"ok"}
    assert set(errors) == {"boom", "bad-request", "late", "invalid"}
    boom = errors["boom"]
    assert boom["error"] is None and boom["response"]["status_code"] == 500
    assert boom["response"]["body"]["error"]["type"] == "server_error"
    assert errors["bad-request"]["response"]["status_code"] == 400
    assert errors["bad-request"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert errors["invalid"]["response"]["status_code"] == 400
    assert errors["invalid"]["response"]["body"]["error"]["param"] == "max_tokens"
    late = errors["late"]
    assert late["response"] is None and late["error"]["code"] == "batch_expired"
    assert sim.stats()["batches"]["items"]["openai"] == {"succeeded": 1, "errored": 3, "expired": 1}
    await client.close()


async def test_openai_item_rates_are_seeded_and_reproducible(make_sim: SimFactory) -> None:
    bodies = {f"r{i}": chat_body(f"question {i}") for i in range(40)}
    outcomes = []
    for _ in range(2):
        sim = await make_sim(seed=7, batch_item_error_rate=0.3, batch_item_expire_rate=0.2)
        client = oai(sim)
        batch = await until_ended(client, (await submit(client, jsonl(chat_lines(bodies)))).id)
        errors = await file_lines(client, batch.error_file_id)
        output = await file_lines(client, batch.output_file_id)
        assert len(errors) + len(output) == 40
        failed = {cid for cid, line in errors.items() if line["response"] is not None}
        expired = {cid for cid, line in errors.items() if line["error"] is not None}
        for cid in failed:
            assert errors[cid]["response"]["status_code"] == 500
        assert {errors[cid]["error"]["code"] for cid in expired} == {"batch_expired"}
        outcomes.append((failed, expired))
        await client.close()
    (failed, expired), again = outcomes
    assert (failed, expired) == again
    assert 4 <= len(failed) <= 20 and 2 <= len(expired) <= 16  # 30 % and 20 % of 40, loosely


async def test_openai_all_items_fail_at_rate_one(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_item_error_rate=1.0)
    client = oai(sim)
    created = await submit(client, jsonl(chat_lines({"a": chat_body("x"), "b": chat_body("y")})))
    batch = await until_ended(client, created.id)
    assert batch.status == "completed" and batch.output_file_id is None  # as the real API: no successes, no file
    assert batch.request_counts is not None and batch.request_counts.failed == 2
    errors = await file_lines(client, batch.error_file_id)
    assert {line["response"]["status_code"] for line in errors.values()} == {500}
    await client.close()


@pytest.mark.parametrize(
    ("lines", "code", "line_no"),
    [
        (jsonl(chat_lines({"a": chat_body("x")}) * 2), "duplicate_custom_id", 2),
        (jsonl(chat_lines({"a": chat_body("x")})) + b"not json\n", "invalid_json_line", 2),
        (b'{"method": "POST", "url": "/v1/chat/completions", "body": {}}\n', "missing_required_parameter", 1),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n', "url_mismatch", 1),
        (jsonl(chat_lines({"a": chat_body("x", "m1"), "b": chat_body("y", "m2")})), "model_mismatch", 2),
        (b"\n\n", "empty_file", None),
        (jsonl(chat_lines({f"r{i}": chat_body("x") for i in range(4)})), "too_many_tasks", None),
    ],
    ids=["duplicate", "invalid-json", "missing-custom-id", "url", "model", "empty", "too-many"],
)
async def test_openai_invalid_input_fails_the_batch_after_create(
    make_sim: SimFactory, lines: bytes, code: str, line_no: int | None
) -> None:
    sim = await make_sim(batch_max_requests=3)
    client = oai(sim)
    created = await submit(client, lines)  # validation is asynchronous: the create succeeds
    assert created.status == "validating"
    batch = await until_ended(client, created.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == code and batch.errors.data[0].line == line_no
    assert batch.errors.data[0].message
    stats = sim.stats()["batches"]
    assert stats["created"] == {"openai": 1} and stats["failed"] == {"openai": 1}
    assert stats["items_submitted"] == {} and stats["items_submitted_by_model"] == {} and stats["items"] == {}
    await client.close()


async def test_openai_bad_create_parameters_are_refused_at_once(make_sim: SimFactory) -> None:
    sim = await make_sim()
    client = oai(sim)
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
    other = await client.files.create(file=("notes.jsonl", b"{}\n", "application/jsonl"), purpose="user_data")
    with pytest.raises(openai.BadRequestError):
        await client.batches.create(input_file_id=other.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError) as wrong_endpoint:
        await client.batches.create(input_file_id=other.id, endpoint="/v1/embeddings", completion_window="24h")
    assert wrong_endpoint.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")
    assert sim.stats()["batches"]["rejected"] == {"openai": 3}
    assert sim.stats()["batches"]["created"] == {}
    await client.close()


async def test_openai_cancel_reports_unfinished_items_cancelled(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_delay_seconds=3600)
    client = oai(sim)
    bodies = {f"r{i}": chat_body(f"q{i}") for i in range(3)}
    batch = await submit(client, jsonl(chat_lines(bodies)))
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    cancelled = await until_ended(client, batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert cancelled.output_file_id is None
    errors = await file_lines(client, cancelled.error_file_id)
    assert set(errors) == set(bodies)
    assert {line["error"]["code"] for line in errors.values()} == {"batch_cancelled"}
    assert all(line["response"] is None for line in errors.values())
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)
    stats = sim.stats()["batches"]
    assert stats["cancel_requests"] == {"openai": 1} and stats["items"] == {"openai": {"canceled": 3}}
    await client.close()


async def test_openai_cancel_keeps_the_items_already_answered(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_delay_seconds=4.0)
    client = oai(sim)
    bodies = {f"r{i}": chat_body(f"q{i}") for i in range(8)}
    batch = await submit(client, jsonl(chat_lines(bodies)))

    async def answered() -> int:
        counts = (await client.batches.retrieve(batch.id)).request_counts
        assert counts is not None
        return counts.completed

    await wait_until(answered, DEADLINE_S, "a first item answered", interval=0.02)
    await client.batches.cancel(batch.id)
    ended = await until_ended(client, batch.id)
    assert ended.status == "cancelled"
    output = await file_lines(client, ended.output_file_id)
    errors = await file_lines(client, ended.error_file_id)
    assert ended.request_counts is not None and ended.request_counts.completed == len(output)
    assert 1 <= len(output) < 8 and len(output) + len(errors) == 8
    # Items are answered in order, so the answered ones are a prefix.
    assert set(output) == {f"r{i}" for i in range(len(output))}
    assert {line["error"]["code"] for line in errors.values()} == {"batch_cancelled"}
    await client.close()


async def test_openai_list_pages_newest_first(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_delay_seconds=3600)
    client = oai(sim)
    ids = [(await submit(client, jsonl(chat_lines({"a": chat_body(str(i))})))).id for i in range(5)]
    newest_first = ids[::-1]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == newest_first[:2] and first.has_more
    second = await client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == newest_first[2:4]
    last = await client.batches.list(limit=2, after=second.data[-1].id)
    assert [b.id for b in last.data] == newest_first[4:] and not last.has_more
    assert [b.id async for b in client.batches.list(limit=2)] == newest_first  # the SDK's auto-paging
    assert {b.status for b in first.data} == {"in_progress"}
    await client.close()


async def test_openai_enqueued_token_limit_fails_the_batch(make_sim: SimFactory) -> None:
    probe = await make_sim()
    probe_client = oai(probe)
    body = chat_body("count my tokens", max_tokens=50)
    online = await probe_client.chat.completions.create(**body)
    assert online.usage is not None
    charge = online.usage.prompt_tokens + 50  # input + max tokens, as the online limiter charges
    await probe_client.close()

    sim = await make_sim(batch_delay_seconds=3600, batch_max_enqueued_tokens=2 * charge)
    client = oai(sim)
    two = await submit(client, jsonl(chat_lines({"a": body, "b": body})))  # exactly at the limit
    one_more = await submit(client, jsonl(chat_lines({"c": body})))
    assert (await client.batches.retrieve(two.id)).status == "in_progress"
    refused = await client.batches.retrieve(one_more.id)
    assert refused.status == "failed" and refused.errors is not None and refused.errors.data
    assert refused.errors.data[0].code == "token_limit_exceeded"
    assert "gpt-4o" in (refused.errors.data[0].message or "")
    other_model = await submit(client, jsonl(chat_lines({"c": {**body, "model": "gpt-4o-mini"}})))
    assert (await client.batches.retrieve(other_model.id)).status == "in_progress"  # per model
    assert sim.stats()["batches"]["enqueued_tokens"]["openai"] == {"gpt-4o": 2 * charge, "gpt-4o-mini": charge}
    await client.batches.cancel(two.id)  # an ended batch frees its tokens
    again = await submit(client, jsonl(chat_lines({"c": body})))
    assert (await client.batches.retrieve(again.id)).status == "in_progress"
    await client.close()


# -- Anthropic -------------------------------------------------------------------------


def params(text: str, model: str = "claude-haiku", max_tokens: int = 64, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens, "messages": user(text), **extra}


async def test_anthropic_batch_round_trip_matches_the_online_endpoint(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_delay_seconds=0.3)
    client = claude(sim)
    requests = {
        "q-0": params("What is a batch?"),
        "q-1": params("Explain Kafka partitions in depth.", max_tokens=400, system="Be brief."),
        "q-2": params("ignored #sim:reply=exactly this"),
    }
    created = await client.messages.batches.create(
        requests=[{"custom_id": cid, "params": p} for cid, p in requests.items()]  # type: ignore[misc]
    )
    assert created.type == "message_batch" and created.id.startswith("msgbatch_")
    assert created.processing_status == "in_progress" and created.results_url is None
    assert created.request_counts.processing == 3 and created.ended_at is None
    with pytest.raises(anthropic.AnthropicError):  # no results_url before the batch ends
        await client.messages.batches.results(created.id)

    batch = await until_message_batch_ended(client, created.id)
    counts = batch.request_counts
    assert (counts.processing, counts.succeeded, counts.errored, counts.canceled, counts.expired) == (0, 3, 0, 0, 0)
    assert batch.ended_at is not None and batch.ended_at >= batch.created_at
    assert batch.results_url == f"{sim.base_url}/v1/messages/batches/{batch.id}/results"
    found = await results(client, batch.id)
    assert set(found) == set(requests)
    for cid, p in requests.items():
        result = found[cid]
        assert result.type == "succeeded"
        online = await client.messages.create(**p)
        assert result.message.usage.input_tokens == online.usage.input_tokens
        assert result.message.usage.output_tokens == online.usage.output_tokens
        assert result.message.content[0].text == online.content[0].text  # type: ignore[union-attr]
        assert result.message.stop_reason == online.stop_reason
    assert found["q-2"].message.content[0].text == "exactly this"  # type: ignore[union-attr]
    await client.close()


async def test_anthropic_item_errors_expiry_and_invalid_params(make_sim: SimFactory) -> None:
    sim = await make_sim()
    client = claude(sim)
    requests = [
        {"custom_id": "ok", "params": params("fine")},
        {"custom_id": "boom", "params": params("#sim:batch-error")},
        {"custom_id": "overloaded", "params": params("#sim:batch-error=529")},
        {"custom_id": "late", "params": params("#sim:batch-expire")},
        {"custom_id": "no-max-tokens", "params": {"model": "claude-haiku", "messages": user("x")}},
    ]
    batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    batch = await until_message_batch_ended(client, batch.id)
    counts = batch.request_counts
    assert (counts.succeeded, counts.errored, counts.expired, counts.canceled) == (1, 3, 1, 0)
    found = await results(client, batch.id)
    assert found["ok"].type == "succeeded"
    assert found["boom"].type == "errored" and found["boom"].error.error.type == "api_error"
    assert found["overloaded"].error.error.type == "overloaded_error"
    assert found["no-max-tokens"].error.error.type == "invalid_request_error"
    assert "max_tokens" in found["no-max-tokens"].error.error.message
    assert found["late"].type == "expired"
    await client.close()


async def test_anthropic_item_rates(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_item_expire_rate=1.0)
    client = claude(sim)
    batch = await client.messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": params(f"q{i}")} for i in range(5)]
    )
    batch = await until_message_batch_ended(client, batch.id)
    assert batch.request_counts.expired == 5
    assert {r.type for r in (await results(client, batch.id)).values()} == {"expired"}
    await client.close()


async def test_anthropic_create_refuses_invalid_requests(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_max_requests=3)
    client = claude(sim)
    bad_batches: list[list[Any]] = [
        [{"custom_id": "same", "params": params("a")}, {"custom_id": "same", "params": params("b")}],
        [{"custom_id": "has a space", "params": params("a")}],
        [{"custom_id": "x" * 65, "params": params("a")}],
        [{"custom_id": f"r{i}", "params": params("a")} for i in range(4)],
        [{"custom_id": "no-params"}],
        [],
    ]
    for requests in bad_batches:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.batches.create(requests=requests)
        assert refused.value.status_code == 400
        assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    ok = await client.messages.batches.create(requests=[{"custom_id": "A_z-09", "params": params("a")}])
    assert ok.request_counts.processing == 1
    stats = sim.stats()["batches"]
    assert stats["rejected"] == {"anthropic": len(bad_batches)} and stats["created"] == {"anthropic": 1}
    assert stats["items_submitted"] == {"anthropic": 1}
    assert stats["items_submitted_by_model"] == {"anthropic": {"claude-haiku": 1}}
    await client.close()


async def test_anthropic_cancel_ends_with_items_canceled(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_delay_seconds=3600)
    client = claude(sim)
    batch = await client.messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": params(f"q{i}")} for i in range(3)]
    )
    canceling = await client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
    ended = await until_message_batch_ended(client, batch.id)
    assert ended.request_counts.canceled == 3 and ended.request_counts.processing == 0
    found = await results(client, batch.id)
    assert {r.type for r in found.values()} == {"canceled"} and len(found) == 3
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.batches.cancel(batch.id)
    deleted = await client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve(batch.id)
    await client.close()


async def test_anthropic_in_progress_batch_cannot_be_deleted(make_sim: SimFactory) -> None:
    sim = await make_sim(batch_delay_seconds=3600)
    client = claude(sim)
    batch = await client.messages.batches.create(requests=[{"custom_id": "a", "params": params("q")}])
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.batches.delete(batch.id)
    await client.close()


async def test_anthropic_list_pages_newest_first(make_sim: SimFactory) -> None:
    sim = await make_sim()
    client = claude(sim)
    ids = [
        (await client.messages.batches.create(requests=[{"custom_id": "a", "params": params(str(i))}])).id
        for i in range(5)
    ]
    newest_first = ids[::-1]
    first = await client.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == newest_first[:2]
    assert first.has_more and first.first_id == newest_first[0] and first.last_id == newest_first[1]
    assert [b.id async for b in client.messages.batches.list(limit=2)] == newest_first
    before = await client.messages.batches.list(limit=2, before_id=newest_first[3])
    assert [b.id for b in before.data] == newest_first[1:3] and before.has_more
    assert {b.processing_status for b in first.data} == {"ended"}  # listing settles them too
    await client.close()


async def test_anthropic_enqueued_token_limit_is_a_429_at_create(make_sim: SimFactory) -> None:
    probe = await make_sim()
    probe_client = claude(probe)
    request = params("count my tokens", max_tokens=50)
    charge = (await probe_client.messages.create(**request)).usage.input_tokens + 50
    await probe_client.close()

    sim = await make_sim(batch_delay_seconds=3600, batch_max_enqueued_tokens=2 * charge)
    client = claude(sim)
    first = await client.messages.batches.create(
        requests=[{"custom_id": "a", "params": request}, {"custom_id": "b", "params": request}]
    )
    with pytest.raises(anthropic.RateLimitError) as refused:
        await client.messages.batches.create(requests=[{"custom_id": "c", "params": request}])
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(refused.value.response.headers["retry-after"]) >= 1
    with pytest.raises(anthropic.RateLimitError) as never:  # alone over the limit: retrying cannot help
        await client.messages.batches.create(
            requests=[{"custom_id": f"r{i}", "params": request} for i in range(3)]
        )
    assert never.value.response.headers["x-should-retry"] == "false"
    await client.messages.batches.cancel(first.id)
    await client.messages.batches.create(requests=[{"custom_id": "c", "params": request}])
    stats = sim.stats()["batches"]
    assert stats["rejected"] == {"anthropic": 2} and stats["created"] == {"anthropic": 2}
    await client.close()


# -- both --------------------------------------------------------------------------------


async def test_batch_routes_need_an_api_key(make_sim: SimFactory) -> None:
    sim = await make_sim()
    no_key = oai(sim)
    omit: dict[str, Any] = {"Authorization": openai.Omit()}
    with pytest.raises(openai.AuthenticationError):
        await no_key.files.create(
            file=("b.jsonl", b"{}\n", "application/jsonl"), purpose="batch", extra_headers=omit
        )
    with pytest.raises(openai.AuthenticationError):
        await no_key.batches.create(
            input_file_id="file-x", endpoint=CHAT, completion_window="24h", extra_headers=omit
        )
    with pytest.raises(openai.AuthenticationError) as listed:
        await no_key.batches.list(extra_headers=omit)
    assert listed.value.status_code == 401
    no_auth: dict[str, Any] = {"Authorization": anthropic.Omit(), "x-api-key": anthropic.Omit()}
    other = claude(sim, default_headers=no_auth)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await other.messages.batches.create(requests=[{"custom_id": "a", "params": params("q")}])
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        await other.messages.batches.list()
    stats = sim.stats()["batches"]
    assert stats["calls_by_status"] == {"401": 5}
    assert stats["created"] == {} and stats["items_submitted"] == {}
    await no_key.close()
    await other.close()


async def test_stats_count_each_item_once_and_batches_skip_the_online_windows(make_sim: SimFactory) -> None:
    sim = await make_sim(requests_per_minute=1, tokens_per_minute=100)
    openai_client, claude_client = oai(sim), claude(sim)
    oa = await submit(
        openai_client, jsonl(chat_lines({f"r{i}": chat_body(f"q{i}", max_tokens=90) for i in range(5)}))
    )
    an = await claude_client.messages.batches.create(
        requests=[
            {"custom_id": f"r{i}", "params": params(f"q{i}", model=m)} for i, m in enumerate(["c-a", "c-a", "c-b"])
        ]
    )
    oa_done = await until_ended(openai_client, oa.id)
    an_done = await until_message_batch_ended(claude_client, an.id)
    assert oa_done.request_counts is not None and oa_done.request_counts.completed == 5  # no 429 for batch items
    assert an_done.request_counts.succeeded == 3
    # The online window is untouched: its one request per minute is still free.
    await openai_client.chat.completions.create(**chat_body("online", max_tokens=50))
    with pytest.raises(openai.RateLimitError):
        await openai_client.chat.completions.create(**chat_body("online again", max_tokens=50))

    stats = sim.stats()
    batches = stats["batches"]
    assert batches["created"] == {"openai": 1, "anthropic": 1}
    assert batches["ended"] == {"openai": 1, "anthropic": 1}
    assert batches["items_submitted"] == {"openai": 5, "anthropic": 3}
    assert batches["items_submitted_by_model"] == {"openai": {"gpt-4o": 5}, "anthropic": {"c-a": 2, "c-b": 1}}
    assert batches["items"] == {"openai": {"succeeded": 5}, "anthropic": {"succeeded": 3}}
    output = await file_lines(openai_client, oa_done.output_file_id)
    expected_in = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output.values())
    assert oa_done.usage is not None
    assert batches["input_tokens"]["openai"] == expected_in == oa_done.usage.input_tokens
    anthropic_results = await results(claude_client, an.id)
    expected_out = sum(r.message.usage.output_tokens for r in anthropic_results.values())
    assert batches["output_tokens"]["anthropic"] == expected_out
    assert batches["enqueued_tokens"] == {}
    # The online counters see only the two online calls; batch calls are counted apart.
    assert stats["requests_total"] == 2 and stats["by_status"] == {"200": 1, "429": 1}
    assert stats["windows"]["openai"]["gpt-4o"]["max_requests_in_window"] == 1
    assert "anthropic" not in stats["windows"]
    assert set(batches["calls_by_status"]) == {"200"} and batches["calls_by_status"]["200"] >= 5

    sim.reset_stats()
    cleared = sim.stats()["batches"]
    assert cleared["created"] == {} and cleared["items_submitted"] == {} and cleared["items"] == {}
    assert cleared["items_submitted_by_model"] == {}
    assert cleared["calls_by_status"] == {}
    # Batches and files are state, not counters: they survive a reset.
    assert (await openai_client.batches.retrieve(oa.id)).status == "completed"
    await openai_client.close()
    await claude_client.close()


def test_batch_config_validation() -> None:
    defaults = SimulatorConfig()
    assert defaults.batch_delay_seconds == 2.0
    assert (defaults.batch_item_error_rate, defaults.batch_item_expire_rate) == (0.0, 0.0)
    assert defaults.batch_max_requests is None and defaults.batch_max_enqueued_tokens is None
    assert (defaults.batch_limit("openai"), defaults.batch_limit("anthropic")) == (50_000, 100_000)
    assert SimulatorConfig(batch_max_requests=7).batch_limit("openai") == 7
    for bad in (
        {"batch_delay_seconds": -1},
        {"batch_item_error_rate": 1.5},
        {"batch_item_expire_rate": -0.1},
        {"batch_item_error_rate": 0.6, "batch_item_expire_rate": 0.6},
        {"batch_max_requests": 0},
        {"batch_max_enqueued_tokens": 0},
    ):
        with pytest.raises(pydantic.ValidationError):
            SimulatorConfig(**bad)
