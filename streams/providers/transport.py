"""The HTTP transport under the official SDK clients: chosen here, in one place.

The SDKs' default transport (httpx) answered about 230-320 calls/s per process against
the simulator on 2 cores; their aiohttp transport (``DefaultAioHttpClient``, the
``openai[aiohttp]`` / ``anthropic[aiohttp]`` extras) does the same calls with less CPU
(see docs/benchmarks.md). aiohttp is the default; ``TIERSTREAM_HTTP_TRANSPORT=httpx``
switches back (for comparison, or should the aiohttp transport misbehave somewhere).
"""

from __future__ import annotations

import os

import anthropic
import openai

TRANSPORT_ENV = "TIERSTREAM_HTTP_TRANSPORT"
TRANSPORTS = ("aiohttp", "httpx")


def transport() -> str:
    name = os.environ.get(TRANSPORT_ENV, "aiohttp").strip().lower() or "aiohttp"
    if name not in TRANSPORTS:
        raise ValueError(f"{TRANSPORT_ENV}={name!r}: expected one of {', '.join(TRANSPORTS)}")
    return name


def _aiohttp_client(sdk: object) -> object | None:
    # SDK releases before the aiohttp transport have no DefaultAioHttpClient: their default.
    factory = getattr(sdk, "DefaultAioHttpClient", None)
    return factory() if factory is not None and transport() == "aiohttp" else None


def openai_http_client() -> object | None:
    """``http_client`` for ``openai.AsyncOpenAI`` (None: the SDK's own default)."""
    return _aiohttp_client(openai)


def anthropic_http_client() -> object | None:
    """``http_client`` for ``anthropic.AsyncAnthropic`` (None: the SDK's own default)."""
    return _aiohttp_client(anthropic)
