"""How the official SDK clients are reached and called: chosen here, in one place.

The SDKs' default transport (httpx) answered about 230-320 calls/s per process against
the simulator on 2 cores; their aiohttp transport (``DefaultAioHttpClient``, the
``openai[aiohttp]`` / ``anthropic[aiohttp]`` extras) does the same calls with less CPU
(see docs/benchmarks.md). aiohttp is the default; ``TIERSTREAM_HTTP_TRANSPORT=httpx``
switches back (for comparison, or should the aiohttp transport misbehave somewhere).

Calls go through the SDKs' low-level ``post`` and are parsed with orjson (see
:mod:`streams.providers.openai_client`); ``TIERSTREAM_SDK_CALL=typed`` uses the typed
resource methods instead, for comparison.
"""

from __future__ import annotations

import os

import anthropic
import openai

TRANSPORT_ENV = "TIERSTREAM_HTTP_TRANSPORT"
TRANSPORTS = ("aiohttp", "httpx")
CALL_ENV = "TIERSTREAM_SDK_CALL"
CALLS = ("raw", "typed")


def _choice(env: str, choices: tuple[str, ...]) -> str:
    name = os.environ.get(env, choices[0]).strip().lower() or choices[0]
    if name not in choices:
        raise ValueError(f"{env}={name!r}: expected one of {', '.join(choices)}")
    return name


def transport() -> str:
    return _choice(TRANSPORT_ENV, TRANSPORTS)


def typed_calls() -> bool:
    """Whether model calls use the SDKs' typed resource methods (not the default)."""
    return _choice(CALL_ENV, CALLS) == "typed"


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
