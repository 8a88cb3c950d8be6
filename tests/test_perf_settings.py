"""The performance choices made in one place each: the SDKs' HTTP transport, the event
loop, and the producers' batch size."""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest

from streams.providers.transport import anthropic_http_client, openai_http_client, transport
from streams.runtime.worker import producer_max_batch_bytes, use_event_loop
from topologies.config import load_settings


async def test_the_sdks_get_the_aiohttp_transport_unless_httpx_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERSTREAM_HTTP_TRANSPORT", raising=False)
    assert transport() == "aiohttp"
    for make, sdk in ((openai_http_client, openai), (anthropic_http_client, anthropic)):
        client = make()
        assert isinstance(client, sdk.DefaultAioHttpClient)
        await client.aclose()
    monkeypatch.setenv("TIERSTREAM_HTTP_TRANSPORT", "httpx")
    assert openai_http_client() is None and anthropic_http_client() is None
    monkeypatch.setenv("TIERSTREAM_HTTP_TRANSPORT", "curl")
    with pytest.raises(ValueError, match="TIERSTREAM_HTTP_TRANSPORT"):
        openai_http_client()


def test_event_loop_is_uvloop_unless_asyncio_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    before = asyncio.get_event_loop_policy()
    try:
        monkeypatch.setenv("TIERSTREAM_EVENT_LOOP", "asyncio")
        assert use_event_loop() == "asyncio"
        assert asyncio.get_event_loop_policy() is before
        monkeypatch.delenv("TIERSTREAM_EVENT_LOOP")
        assert use_event_loop() == "uvloop"
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
        monkeypatch.setenv("TIERSTREAM_EVENT_LOOP", "trio")
        with pytest.raises(ValueError, match="TIERSTREAM_EVENT_LOOP"):
            use_event_loop()
    finally:
        asyncio.set_event_loop_policy(before)


def test_producer_batch_is_256_kib_capped_by_the_message_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERSTREAM_PRODUCER_MAX_BATCH_BYTES", raising=False)
    settings = load_settings(environ={})
    assert producer_max_batch_bytes(settings) == 256 * 1024
    monkeypatch.setenv("TIERSTREAM_PRODUCER_MAX_BATCH_BYTES", "16384")
    assert producer_max_batch_bytes(settings) == 16384
    monkeypatch.setenv("TIERSTREAM_PRODUCER_MAX_BATCH_BYTES", str(10 * 1024 * 1024))
    assert producer_max_batch_bytes(settings) == settings.kafka.max_message_bytes
