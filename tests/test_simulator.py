"""The provider simulator, driven by the official OpenAI and Anthropic async SDKs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pydantic
import pytest

from streams.simulator import (
    META_ROUTER_MARKER,
    ModelRateLimit,
    ProviderSimulator,
    SimulatorConfig,
)
from tests.support import wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-simulator-test"

SimFactory = Callable[..., Awaitable[ProviderSimulator]]


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Start simulators on free ports (no latency unless asked); stop them afterwards."""
    started: list[ProviderSimulator] = []

    async def factory(**overrides: Any) -> ProviderSimulator:
        settings: dict[str, Any] = {"port": 0, "latency_ms_median": 0.0, **overrides}
        sim = ProviderSimulator(SimulatorConfig(**settings))
        await sim.start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        await sim.stop()


@pytest.fixture
async def sim(make_sim: SimFactory) -> ProviderSimulator:
    return await make_sim()


def oai(sim: ProviderSimulator, **kwargs: Any) -> openai.AsyncOpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key=KEY, **kwargs)


def claude(sim: ProviderSimulator, **kwargs: Any) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(base_url=sim.anthropic_base_url, api_key=KEY, **kwargs)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def filler_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


# -- normal answers ----------------------------------------------------------------


async def test_openai_completion_shape_usage_and_determinism(sim: ProviderSimulator) -> None:
    client = oai(sim)
    messages: list[Any] = [
        {"role": "system", "content": "s" * 8},  # 2 text tokens + 3 overhead
        {"role": "user", "content": "u" * 40},  # 10 text tokens + 3 overhead
    ]
    create = client.chat.completions.create
    first = await create(model="gpt-4o-mini", messages=messages, max_tokens=600)
    again = await create(model="gpt-4o-mini", messages=messages, max_tokens=600)

    assert first.id.startswith("chatcmpl-")
    assert first.object == "chat.completion"
    assert first.model == "gpt-4o-mini"
    choice = first.choices[0]
    assert choice.message.role == "assistant"
    assert first.usage is not None
    assert first.usage.prompt_tokens == 3 + (3 + 2) + (3 + 10)
    assert 16 <= first.usage.completion_tokens <= 512  # natural length range, under max_tokens
    assert choice.finish_reason == "stop"
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert filler_tokens(choice.message.content or "") == first.usage.completion_tokens
    assert again.choices[0].message.content == choice.message.content
    assert again.usage == first.usage
    assert again.id != first.id
    await client.close()


async def test_openai_output_is_capped_by_max_tokens(make_sim: SimFactory) -> None:
    sim = await make_sim(default_max_tokens=7, output_tokens_min=20, output_tokens_max=40)
    client = oai(sim)
    capped = await client.chat.completions.create(model="m", messages=user("hi"), max_tokens=5)
    assert capped.usage is not None and capped.usage.completion_tokens == 5
    assert capped.choices[0].finish_reason == "length"
    newer = await client.chat.completions.create(
        model="m", messages=user("hi"), max_completion_tokens=3
    )
    assert newer.usage is not None and newer.usage.completion_tokens == 3
    defaulted = await client.chat.completions.create(model="m", messages=user("hi"))
    assert defaulted.usage is not None and defaulted.usage.completion_tokens == 7
    assert defaulted.choices[0].finish_reason == "length"
    await client.close()


async def test_output_tokens_never_exceed_max_tokens(sim: ProviderSimulator) -> None:
    client = oai(sim)
    for max_tokens in (1, 2, 17, 64, 300):
        for prompt in ("alpha", "beta", "gamma"):
            reply = await client.chat.completions.create(
                model="gpt-4o", messages=user(prompt), max_tokens=max_tokens
            )
            assert reply.usage is not None
            assert 1 <= reply.usage.completion_tokens <= max_tokens
            expected = "length" if reply.usage.completion_tokens == max_tokens else "stop"
            assert reply.choices[0].finish_reason == expected
    await client.close()


async def test_anthropic_message_shape_and_usage(sim: ProviderSimulator) -> None:
    client = claude(sim)
    message = await client.messages.create(
        model="claude-sim-sonnet",
        system="s" * 8,
        messages=user("u" * 40),
        max_tokens=1000,
    )
    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "claude-sim-sonnet"
    assert message.stop_sequence is None
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 3 + 2 + (3 + 10)
    assert 16 <= message.usage.output_tokens <= 512
    [block] = message.content
    assert block.type == "text"
    assert filler_tokens(block.text) == message.usage.output_tokens

    short = await client.messages.create(model="claude-haiku", messages=user("hi"), max_tokens=4)
    assert short.usage.output_tokens == 4
    assert short.stop_reason == "max_tokens"
    await client.close()


# -- directives and meta-routing ---------------------------------------------------


async def test_reply_directive_sets_exact_content(sim: ProviderSimulator) -> None:
    client, other = oai(sim), claude(sim)
    text = "Ignore this line\nplease answer #sim:reply=The answer is 42.\nnot part of it"
    completion = await client.chat.completions.create(model="gpt-4o", messages=user(text))
    assert completion.choices[0].message.content == "The answer is 42."
    assert completion.choices[0].finish_reason == "stop"
    message = await other.messages.create(
        model="claude-haiku",
        max_tokens=50,
        messages=[
            {"role": "user", "content": "#sim:reply=not me"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "#sim:reply=me"}]},
        ],
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "me"
    await client.close()
    await other.close()


@pytest.mark.parametrize(
    ("question", "tier"),
    [
        ("Design the architecture of a multi-region event store", "PREMIUM"),
        ("Help me debug this deadlock", "PREMIUM"),
        ("Prove that the algorithm terminates", "PREMIUM"),
        ("Classify this ticket as billing or technical", "NANO"),
        ("Extract the invoice number", "NANO"),
        ("Answer yes/no: is this spam?", "NANO"),
        ("Write a friendly email to a customer", "STANDARD"),
    ],
)
async def test_meta_routing_replies_with_a_tier(
    sim: ProviderSimulator, question: str, tier: str
) -> None:
    client, other = oai(sim), claude(sim)
    system = f"You route requests. {META_ROUTER_MARKER}."
    for role in ("system", "developer"):
        messages: list[Any] = [{"role": role, "content": system}, *user(question)]
        completion = await client.chat.completions.create(
            model="gpt-4.1-nano",
            messages=messages,
            max_tokens=5,
        )
        assert completion.choices[0].message.content == tier
    as_string = await other.messages.create(
        model="claude-haiku", system=system, messages=user(question), max_tokens=5
    )
    as_blocks = await other.messages.create(
        model="claude-haiku",
        system=[{"type": "text", "text": system}],
        messages=user(question),
        max_tokens=5,
    )
    assert as_string.content[0].type == "text" and as_string.content[0].text == tier
    assert as_blocks.content[0].type == "text" and as_blocks.content[0].text == tier
    await client.close()
    await other.close()


async def test_meta_routing_needs_the_marker_and_yields_to_reply_directive(
    sim: ProviderSimulator,
) -> None:
    client = oai(sim)
    plain = await client.chat.completions.create(
        model="m",
        messages=[{"role": "system", "content": "Be helpful."}, *user("classify this")],
        max_tokens=30,
    )
    assert plain.choices[0].message.content not in {"NANO", "STANDARD", "PREMIUM"}
    scripted = await client.chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": META_ROUTER_MARKER},
            *user("debug #sim:reply=NANO"),
        ],
    )
    assert scripted.choices[0].message.content == "NANO"
    await client.close()


# -- errors ------------------------------------------------------------------------


async def test_status_directive_maps_to_sdk_errors(sim: ProviderSimulator) -> None:
    client, other = oai(sim), claude(sim)
    with pytest.raises(openai.InternalServerError) as oai_500:
        await client.chat.completions.create(model="m", messages=user("#sim:status=500"))
    assert oai_500.value.status_code == 500
    assert oai_500.value.request_id is not None and oai_500.value.request_id.startswith("req_")
    assert isinstance(oai_500.value.body, dict) and oai_500.value.body["type"] == "server_error"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=user("#sim:status=400"))

    with pytest.raises(anthropic.InternalServerError) as claude_500:
        await other.messages.create(model="c", max_tokens=9, messages=user("#sim:status=500"))
    assert claude_500.value.type == "api_error"
    assert claude_500.value.request_id is not None
    with pytest.raises(anthropic.OverloadedError):
        await other.messages.create(model="c", max_tokens=9, messages=user("#sim:status=529"))
    assert sim.stats()["status_directives"] == 4
    await client.close()
    await other.close()


async def test_missing_api_key_is_401(sim: ProviderSimulator) -> None:
    client = oai(sim)
    with pytest.raises(openai.AuthenticationError) as oai_401:
        await client.chat.completions.create(
            model="m", messages=user("hi"), extra_headers={"Authorization": openai.Omit()}
        )
    assert oai_401.value.status_code == 401
    no_auth: dict[str, Any] = {"Authorization": anthropic.Omit()}
    other = anthropic.AsyncAnthropic(
        base_url=sim.anthropic_base_url, api_key=KEY, max_retries=0, default_headers=no_auth
    )
    with pytest.raises(anthropic.AuthenticationError) as claude_401:
        await other.messages.create(model="c", max_tokens=5, messages=user("hi"))
    assert claude_401.value.type == "authentication_error"
    assert sim.stats()["by_status"] == {"401": 2}
    await client.close()
    await other.close()


async def test_raw_requests_get_each_providers_error_shape(sim: ProviderSimulator) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{sim.anthropic_base_url}/v1/messages",
            headers={"x-api-key": KEY},
            json={"model": "claude-haiku", "messages": user("hi")},
        ) as resp:
            assert resp.status == 400
            assert resp.headers["request-id"].startswith("req_")
            body = await resp.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in body["error"]["message"]

        async with http.post(
            f"{sim.anthropic_base_url}/v1/messages",
            headers={"x-api-key": KEY},
            json={"model": "claude-haiku", "max_tokens": 5, "messages": []},
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"

        async with http.post(
            f"{sim.anthropic_base_url}/v1/messages",
            json={"model": "claude-haiku", "max_tokens": 5, "messages": user("hi")},
        ) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"

        async with http.post(
            f"{sim.openai_base_url}/chat/completions",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            data=b"{not json",
        ) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}


async def test_invalid_requests_raise_bad_request(sim: ProviderSimulator) -> None:
    client, other = oai(sim), claude(sim)
    with pytest.raises(openai.BadRequestError) as empty:
        await client.chat.completions.create(model="m", messages=[])
    assert empty.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as streaming:
        await client.chat.completions.create(model="m", messages=user("hi"), stream=True)
    assert streaming.value.param == "stream"
    with pytest.raises(anthropic.BadRequestError):
        await other.messages.create(model="c", max_tokens=0, messages=user("hi"))
    with pytest.raises(anthropic.BadRequestError):
        await other.messages.create(model="c", max_tokens=5, messages=user("hi"), stream=True)
    await client.close()
    await other.close()


# -- rate limits -------------------------------------------------------------------


async def test_openai_requests_per_minute_limit(make_sim: SimFactory) -> None:
    sim = await make_sim(requests_per_minute=5)
    client = oai(sim)
    for i in range(5):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=user(f"call {i}"), max_tokens=10
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(4 - i)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="gpt-4o", messages=user("sixth"), max_tokens=10)
    headers = limited.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.value.type == "requests"
    assert limited.value.code == "rate_limit_exceeded"
    # Limits are per model: another model still has its own quota.
    other = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user("x"), max_tokens=5
    )
    assert other.model == "gpt-4o-mini"

    stats = sim.stats()
    assert stats["rate_limited"] == 1
    assert stats["windows"]["openai"]["gpt-4o"]["max_requests_in_window"] == 5
    assert stats["windows"]["openai"]["gpt-4o-mini"]["max_requests_in_window"] == 1
    await client.close()


async def test_anthropic_requests_per_minute_limit(make_sim: SimFactory) -> None:
    sim = await make_sim(requests_per_minute=5)
    client = claude(sim)
    for i in range(5):
        await client.messages.create(model="claude-haiku", max_tokens=10, messages=user(f"{i}"))
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.create(model="claude-haiku", max_tokens=10, messages=user("sixth"))
    headers = limited.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["anthropic-ratelimit-requests-limit"] == "5"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert limited.value.type == "rate_limit_error"
    assert limited.value.request_id is not None
    await client.close()


async def test_tokens_per_minute_limit_charges_input_plus_max_tokens(make_sim: SimFactory) -> None:
    sim = await make_sim(tokens_per_minute=1000)
    client = oai(sim)
    charged = 0
    for i in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=user(f"request {i}"), max_tokens=300
        )
        completion = raw.parse()
        assert completion.usage is not None
        charged += completion.usage.prompt_tokens + 300
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - charged)
    assert charged > 700  # so a fourth request of the same size cannot fit
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model="gpt-4o", messages=user("request 3"), max_tokens=300
        )
    assert limited.value.type == "tokens"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    # A request the limit can never admit says so instead of inviting retries.
    with pytest.raises(openai.RateLimitError) as too_big:
        await client.chat.completions.create(model="gpt-4o", messages=user("huge"), max_tokens=5000)
    assert too_big.value.response.headers["x-should-retry"] == "false"

    other = claude(sim)
    await other.messages.create(model="claude-haiku", max_tokens=900, messages=user("a"))
    with pytest.raises(anthropic.RateLimitError) as claude_limited:
        await other.messages.create(model="claude-haiku", max_tokens=900, messages=user("b"))
    assert claude_limited.value.response.headers["anthropic-ratelimit-tokens-limit"] == "1000"

    window = sim.stats()["windows"]["openai"]["gpt-4o"]
    assert window["max_tokens_in_window"] == charged <= 1000
    await client.close()
    await other.close()


async def test_model_limits_override_global_limits(make_sim: SimFactory) -> None:
    sim = await make_sim(
        requests_per_minute=1, model_limits={"nano": ModelRateLimit(requests_per_minute=3)}
    )
    client = oai(sim)
    for _ in range(3):
        await client.chat.completions.create(model="nano", messages=user("x"), max_tokens=5)
    await client.chat.completions.create(model="big", messages=user("x"), max_tokens=5)
    for model in ("nano", "big"):
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=model, messages=user("x"), max_tokens=5)
    await client.close()


async def test_sdk_retry_honours_retry_after(sim: ProviderSimulator) -> None:
    client = oai(sim, max_retries=1)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="m", messages=user("#sim:status=429"))
    elapsed = time.monotonic() - started
    assert limited.value.response.headers["retry-after-ms"] == "1000"
    assert sim.stats()["by_status"] == {"429": 2}  # the SDK retried once...
    assert elapsed >= 1.0  # ...after the server-directed delay, not its 0.5 s backoff
    await client.close()


async def test_a_429_directive_can_ask_for_a_longer_retry_after(sim: ProviderSimulator) -> None:
    client = oai(sim)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="m", messages=user("#sim:status=429 #sim:retry_after=7.5"))
    assert limited.value.response.headers["retry-after-ms"] == "7500"
    assert limited.value.response.headers["retry-after"] == "8"
    await client.close()


# -- faults, latency, stats --------------------------------------------------------


async def test_error_rate_injects_5xx_reproducibly(make_sim: SimFactory) -> None:
    outcomes: list[list[int]] = []
    for _ in range(2):
        sim = await make_sim(error_rate=0.5, seed=1234)
        client = oai(sim)
        statuses: list[int] = []
        for i in range(30):
            try:
                await client.chat.completions.create(model="m", messages=user(str(i)), max_tokens=3)
                statuses.append(200)
            except openai.InternalServerError as exc:
                assert exc.status_code in (500, 503)
                statuses.append(exc.status_code)
        outcomes.append(statuses)
        stats = sim.stats()
        assert stats["errors_injected"] == sum(1 for code in statuses if code != 200)
        await client.close()
    assert outcomes[0] == outcomes[1]
    assert 200 in outcomes[0] and any(code != 200 for code in outcomes[0])


async def test_anthropic_injected_errors_are_500_or_529(make_sim: SimFactory) -> None:
    sim = await make_sim(error_rate=1.0, seed=3)
    client = claude(sim)
    for _ in range(6):
        with pytest.raises(anthropic.InternalServerError) as failed:
            await client.messages.create(model="c", max_tokens=5, messages=user("x"))
        assert failed.value.status_code in (500, 529)
    assert sim.stats()["errors_injected"] == 6
    await client.close()


async def test_timeout_rate_hangs_until_client_gives_up(make_sim: SimFactory) -> None:
    sim = await make_sim(timeout_rate=1.0, hang_seconds=60.0)
    client = oai(sim, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=user("x"), max_tokens=3)
    assert sim.stats()["timeouts_injected"] == 1
    # The hung handler is cancelled with the connection.
    await wait_until(lambda: sim.stats()["in_flight"], 5, "no call in flight", accept=lambda n: n == 0, interval=0.01)
    await client.close()


async def test_latency_is_applied(make_sim: SimFactory) -> None:
    sim = await make_sim(latency_ms_median=150.0, latency_ms_p99=150.0)
    client = oai(sim)
    started = time.monotonic()
    await client.chat.completions.create(model="m", messages=user("x"), max_tokens=3)
    assert time.monotonic() - started >= 0.15
    await client.close()


async def test_peak_in_flight_counts_concurrent_calls(make_sim: SimFactory) -> None:
    sim = await make_sim(latency_ms_median=300.0, latency_ms_p99=300.0)
    client = oai(sim)
    await asyncio.gather(
        *(
            client.chat.completions.create(model="m", messages=user(str(i)), max_tokens=3)
            for i in range(20)
        )
    )
    stats = sim.stats()
    assert stats["peak_in_flight"] == 20
    assert stats["in_flight"] == 0
    await client.close()


async def test_stats_counters_add_up_and_reset(make_sim: SimFactory) -> None:
    sim = await make_sim(requests_per_minute=4)
    client, other = oai(sim), claude(sim)
    input_tokens = output_tokens = 0
    for i in range(4):
        completion = await client.chat.completions.create(model="gpt-4o", messages=user(f"q{i}"))
        assert completion.usage is not None
        input_tokens += completion.usage.prompt_tokens
        output_tokens += completion.usage.completion_tokens
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=user("q4"))
    for i in range(2):
        message = await other.messages.create(
            model="claude-haiku", max_tokens=64, messages=user(str(i))
        )
        input_tokens += message.usage.input_tokens
        output_tokens += message.usage.output_tokens
    with pytest.raises(anthropic.InternalServerError):
        await other.messages.create(
            model="claude-haiku", max_tokens=64, messages=user("#sim:status=503")
        )
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(
            model="gpt-4o", messages=user("x"), extra_headers={"Authorization": openai.Omit()}
        )

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sim.base_url}/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        async with http.get(f"{sim.base_url}/stats") as resp:
            stats = await resp.json()
        assert stats["requests_total"] == 9
        assert sum(stats["by_status"].values()) == 9
        assert stats["by_status"] == {"200": 6, "401": 1, "429": 1, "503": 1}
        assert stats["by_api"] == {"openai": 6, "anthropic": 3}
        assert stats["by_model"] == {"gpt-4o": 5, "claude-haiku": 3}  # the 401 never named one
        assert stats["rate_limited"] == 1
        assert stats["status_directives"] == 1
        assert stats["errors_injected"] == 0
        assert stats["input_tokens"] == input_tokens
        assert stats["output_tokens"] == output_tokens
        assert stats["in_flight"] == 0 and stats["peak_in_flight"] == 1
        assert stats["windows"]["openai"]["gpt-4o"]["max_requests_in_window"] == 4
        assert stats["windows"]["anthropic"]["claude-haiku"]["max_requests_in_window"] == 2

        async with http.post(f"{sim.base_url}/stats/reset") as resp:
            assert resp.status == 200
        async with http.get(f"{sim.base_url}/stats") as resp:
            cleared = await resp.json()
    assert cleared["requests_total"] == 0 and cleared["by_status"] == {}
    assert cleared["windows"] == {}
    # The reset also forgot the rate-limit window, so gpt-4o is admitted again.
    await client.chat.completions.create(model="gpt-4o", messages=user("after reset"))
    sim.reset_stats()
    assert sim.stats()["requests_total"] == 0
    await client.close()
    await other.close()


# -- lifecycle and configuration ---------------------------------------------------


async def test_context_manager_binds_a_free_port() -> None:
    config = SimulatorConfig(port=0, latency_ms_median=0)
    async with ProviderSimulator(config) as sim:
        assert sim.port > 0
        assert sim.openai_base_url == f"http://127.0.0.1:{sim.port}/v1"
        assert sim.anthropic_base_url == f"http://127.0.0.1:{sim.port}"
        client = oai(sim)
        await client.chat.completions.create(model="m", messages=user("x"), max_tokens=2)
        await client.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http:
            await http.get(f"{sim.base_url}/health")


def test_config_validation() -> None:
    defaults = SimulatorConfig()
    assert (defaults.host, defaults.port, defaults.error_rate) == ("127.0.0.1", 8700, 0.0)
    assert defaults.requests_per_minute is None and defaults.tokens_per_minute is None
    assert SimulatorConfig(latency_ms_median=0).lognormal_params() is None
    for bad in (
        {"error_rate": 1.5},
        {"timeout_rate": -0.1},
        {"latency_ms_median": 100, "latency_ms_p99": 50},
        {"requests_per_minute": 0},
        {"output_tokens_min": 10, "output_tokens_max": 5},
        {"unknown_field": 1},
    ):
        with pytest.raises(pydantic.ValidationError):
            SimulatorConfig(**bad)


async def test_run_serves_until_sigterm() -> None:
    code = (
        "from streams.simulator import run, SimulatorConfig; "
        "run(SimulatorConfig(port=0, latency_ms_median=0))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        assert "provider-sim listening on http://127.0.0.1:" in line
        base = line.split()[3]
        async with aiohttp.ClientSession() as http, http.get(f"{base}/health") as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
