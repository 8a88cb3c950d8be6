"""Anthropic Messages through the official async SDK.

As :mod:`streams.providers.openai_client`: the SDK's low-level ``post`` with a body built
once and serialised with orjson, the answer read with orjson; ``TIERSTREAM_SDK_CALL=typed`` uses
``messages.create``, which gives the same Completion.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import orjson

from schemas.models import ChatMessage
from streams.providers.base import Completion, error_from_status, malformed_response
from streams.providers.transport import anthropic_http_client, typed_calls


def completion_from_payload(payload: Any, model: str) -> Completion:
    """A Messages response body, parsed. Cached input tokens are part of the input."""
    usage = payload.get("usage") or {}
    cached = usage.get("cache_read_input_tokens") or 0
    return Completion(
        text="".join(block["text"] for block in payload["content"] if block.get("type") == "text"),
        finish_reason=payload.get("stop_reason"),
        model=payload.get("model") or model,
        input_tokens=(usage.get("input_tokens") or 0) + cached,
        output_tokens=usage.get("output_tokens") or 0,
        cached_input_tokens=cached,
    )


def request_body(model: str, messages: list[ChatMessage], max_output_tokens: int) -> dict[str, Any]:
    """A Messages request body (also a batch item's ``params``)."""
    body: dict[str, Any] = {
        "model": model,
        # The Messages API takes system prompts apart from the conversation.
        "messages": [{"role": m.role, "content": m.content} for m in messages if m.role != "system"],
        "max_tokens": max_output_tokens,
    }
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    if system:
        body["system"] = system
    return body


class AnthropicClient:
    provider = "anthropic"

    def __init__(self, api_key: str, base_url: str | None, timeout: float, max_retries: int) -> None:
        self._sdk = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries,
            http_client=anthropic_http_client(),
        )
        self._typed = typed_calls()

    async def complete(
        self, model: str, messages: list[ChatMessage], max_output_tokens: int
    ) -> Completion:
        body = request_body(model, messages, max_output_tokens)
        try:
            if self._typed:
                typed = await self._sdk.messages.create(**body)
                return completion_from_payload(typed.model_dump(), model)
            response = await self._sdk.post("/v1/messages", content=orjson.dumps(body), cast_to=httpx2.Response)
        except anthropic.APIStatusError as exc:
            raise error_from_status(self.provider, exc, exc.status_code) from None
        except anthropic.APIError as exc:  # connection errors and timeouts
            raise error_from_status(self.provider, exc, None) from None
        try:
            return completion_from_payload(orjson.loads(response.content), model)
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise malformed_response(self.provider, response.status_code, exc) from None

    async def close(self) -> None:
        await self._sdk.close()
