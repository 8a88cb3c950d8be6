"""OpenAI Chat Completions through the official async SDK.

The call goes through the SDK's documented low-level request method
(``client.post(path, content=..., cast_to=httpx2.Response)``): authentication, base URL,
headers, timeouts, retries honouring Retry-After, typed errors with their status codes and
the aiohttp transport all stay the SDK's, while the per-call work that only builds and
parses typed objects (validating the body against its TypedDicts, constructing response
models) is skipped; the body is serialised with orjson (the SDK's ``content`` takes the
bytes as they are) and the answer is read with orjson into the project's own
:class:`~streams.providers.base.Completion`. ``TIERSTREAM_SDK_CALL=typed`` uses
``chat.completions.create`` instead (docs/benchmarks.md), which gives the same
Completion.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson

from schemas.models import ChatMessage
from streams.providers.base import Completion, error_from_status, malformed_response
from streams.providers.transport import openai_http_client, typed_calls


def completion_from_payload(payload: Any, model: str) -> Completion:
    """A Chat Completions response body, parsed."""
    choice = payload["choices"][0]
    usage = payload.get("usage") or {}
    return Completion(
        text=choice["message"].get("content") or "",
        finish_reason=choice.get("finish_reason"),
        model=payload.get("model") or model,
        input_tokens=usage.get("prompt_tokens") or 0,
        output_tokens=usage.get("completion_tokens") or 0,
        cached_input_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        reasoning_tokens=(usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0,
    )


def request_body(model: str, messages: list[ChatMessage], max_output_tokens: int) -> dict[str, Any]:
    """A Chat Completions request body (also a batch line's ``body``)."""
    return {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "max_completion_tokens": max_output_tokens,
    }


class OpenAIClient:
    provider = "openai"

    def __init__(self, api_key: str, base_url: str | None, timeout: float, max_retries: int) -> None:
        self._sdk = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries,
            http_client=openai_http_client(),
        )
        self._typed = typed_calls()

    async def complete(
        self, model: str, messages: list[ChatMessage], max_output_tokens: int
    ) -> Completion:
        body = request_body(model, messages, max_output_tokens)
        try:
            if self._typed:
                typed = await self._sdk.chat.completions.create(**body)  # type: ignore[call-overload]
                return completion_from_payload(typed.model_dump(), model)
            response = await self._sdk.post("/chat/completions", content=orjson.dumps(body), cast_to=httpx2.Response)
        except openai.APIStatusError as exc:
            raise error_from_status(self.provider, exc, exc.status_code) from None
        except openai.APIError as exc:  # connection errors and timeouts
            raise error_from_status(self.provider, exc, None) from None
        try:
            return completion_from_payload(orjson.loads(response.content), model)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise malformed_response(self.provider, response.status_code, exc) from None

    async def close(self) -> None:
        await self._sdk.close()
