"""The model call's fast path (the SDKs' low-level post, parsed with orjson) gives exactly
what the SDKs' typed methods give: text, finish reason, usage with cached and reasoning
tokens, tool calls and refusals, and the same errors (429 with Retry-After, 500, 400,
timeouts). Both paths run through the real SDK clients; only the HTTP answers are canned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import orjson
import pytest

from schemas.models import ChatMessage
from streams.providers.anthropic_client import AnthropicClient
from streams.providers.base import Completion, ProviderError
from streams.providers.openai_client import OpenAIClient
from streams.providers.transport import CALL_ENV

MESSAGES = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hello")]
Handler = Callable[[httpx2.Request], httpx2.Response]


def _openai(choice: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    body = {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-5-mini-2025", "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return body


OPENAI_BODIES = {
    "text": _openai(
        {"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None}, "finish_reason": "stop"},
        {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    ),
    "cached_and_reasoning": _openai(
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"},
        {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
         "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 32, "audio_tokens": 0}},
    ),
    "tool_call": _openai(
        {"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}},
        {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
    ),
    "refusal": _openai(
        {"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
         "finish_reason": "stop"},
        {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14},
    ),
    "no_usage": _openai(
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}, None,
    ),
}


def _anthropic(content: list[dict[str, Any]], stop: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "m1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
            "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}


ANTHROPIC_BODIES = {
    "text": _anthropic([{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}], "end_turn",
                       {"input_tokens": 12, "output_tokens": 3}),
    "cached": _anthropic([{"type": "text", "text": "x"}], "max_tokens",
                         {"input_tokens": 10, "output_tokens": 40, "cache_read_input_tokens": 90,
                          "cache_creation_input_tokens": 0}),
    "tool_use": _anthropic(
        [{"type": "text", "text": "calling"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
        "tool_use", {"input_tokens": 30, "output_tokens": 12}),
    "thinking": _anthropic(
        [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "done"}],
        "end_turn", {"input_tokens": 5, "output_tokens": 50}),
    "refusal": _anthropic([], "refusal", {"input_tokens": 9, "output_tokens": 0}),
}


def _client(provider: str, handler: Handler, monkeypatch: pytest.MonkeyPatch, path: str) -> Any:
    monkeypatch.setenv(CALL_ENV, path)
    if provider == "openai":
        client: Any = OpenAIClient("sk-test", "http://sim.invalid/v1", timeout=5, max_retries=0)
    else:
        client = AnthropicClient("sk-test", "http://sim.invalid", timeout=5, max_retries=0)
    client._sdk = client._sdk.with_options(http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    return client


def _answer(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=orjson.dumps(body), headers={"content-type": "application/json",
                                                                          **(headers or {})})
    return handler


async def _both(provider: str, handler: Handler, monkeypatch: pytest.MonkeyPatch) -> list[Completion | ProviderError]:
    out: list[Completion | ProviderError] = []
    for path in ("raw", "typed"):
        client = _client(provider, handler, monkeypatch, path)
        try:
            out.append(await client.complete("the-model", MESSAGES, 50))
        except ProviderError as exc:
            out.append(exc)
        finally:
            await client.close()
    return out


@pytest.mark.parametrize("case", sorted(OPENAI_BODIES))
async def test_openai_answers_parse_as_the_typed_sdk_parses_them(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, typed = await _both("openai", _answer(OPENAI_BODIES[case]), monkeypatch)
    assert raw == typed


@pytest.mark.parametrize("case", sorted(ANTHROPIC_BODIES))
async def test_anthropic_answers_parse_as_the_typed_sdk_parses_them(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, typed = await _both("anthropic", _answer(ANTHROPIC_BODIES[case]), monkeypatch)
    assert raw == typed


async def test_the_parsed_figures_are_the_providers_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    raw, _ = await _both("openai", _answer(OPENAI_BODIES["cached_and_reasoning"]), monkeypatch)
    assert raw == Completion("x", "length", "gpt-5-mini-2025", 100, 40, cached_input_tokens=64, reasoning_tokens=32)
    raw, _ = await _both("openai", _answer(OPENAI_BODIES["tool_call"]), monkeypatch)
    assert (raw.text, raw.finish_reason) == ("", "tool_calls")  # type: ignore[union-attr]
    raw, _ = await _both("anthropic", _answer(ANTHROPIC_BODIES["cached"]), monkeypatch)
    assert raw == Completion("x", "max_tokens", "claude-sonnet-4-6", 100, 40, cached_input_tokens=90)
    raw, _ = await _both("anthropic", _answer(ANTHROPIC_BODIES["tool_use"]), monkeypatch)
    assert (raw.text, raw.finish_reason) == ("calling", "tool_use")  # type: ignore[union-attr]


def _same_error(raw: object, typed: object) -> ProviderError:
    assert isinstance(raw, ProviderError) and isinstance(typed, ProviderError), (raw, typed)
    assert (raw.status, raw.retryable, raw.retry_after, str(raw)) == (
        typed.status, typed.retryable, typed.retry_after, str(typed))
    return raw


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_errors_are_the_same_on_both_paths(provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    error = {"error": {"type": "rate_limit_error", "message": "slow down"}}
    limited = _same_error(*await _both(provider, _answer(error, 429, {"retry-after": "2"}), monkeypatch))
    assert (limited.status, limited.retryable, limited.retry_after) == (429, True, 2.0)
    limited_ms = _same_error(*await _both(provider, _answer(error, 429, {"retry-after-ms": "1500"}), monkeypatch))
    assert limited_ms.retry_after == 1.5
    server = _same_error(*await _both(provider, _answer({"error": {"message": "boom"}}, 500), monkeypatch))
    assert (server.status, server.retryable) == (500, True)
    bad = _same_error(*await _both(provider, _answer({"error": {"message": "bad model"}}, 400), monkeypatch))
    assert (bad.status, bad.retryable) == (400, False)

    def timing_out(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("timed out", request=request)

    timeout = _same_error(*await _both(provider, timing_out, monkeypatch))
    assert (timeout.status, timeout.retryable) == (None, True)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_malformed_answer_is_a_retryable_provider_error(provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(provider, _answer({"unexpected": True}), monkeypatch, "raw")
    try:
        with pytest.raises(ProviderError, match="malformed response") as raised:
            await client.complete("m", MESSAGES, 5)
    finally:
        await client.close()
    assert raised.value.retryable and raised.value.status == 200


async def test_the_request_body_is_what_the_typed_method_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[Any]] = {"openai": [], "anthropic": []}

    def recorder(provider: str, body: dict[str, Any]) -> Handler:
        def handler(request: httpx2.Request) -> httpx2.Response:
            seen[provider].append((request.url.path, orjson.loads(request.content)))
            return _answer(body)(request)
        return handler

    await _both("openai", recorder("openai", OPENAI_BODIES["text"]), monkeypatch)
    await _both("anthropic", recorder("anthropic", ANTHROPIC_BODIES["text"]), monkeypatch)
    for provider in seen:
        (raw_path, raw_body), (typed_path, typed_body) = seen[provider]
        assert raw_path == typed_path and raw_body == typed_body, provider
    assert seen["anthropic"][0][1]["system"] == "be brief"
