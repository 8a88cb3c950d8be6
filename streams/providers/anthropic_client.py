"""Anthropic Messages through the official async SDK."""

from __future__ import annotations

import anthropic

from schemas.models import ChatMessage
from streams.providers.base import Completion, error_from_status
from streams.providers.transport import anthropic_http_client


class AnthropicClient:
    provider = "anthropic"

    def __init__(self, api_key: str, base_url: str | None, timeout: float, max_retries: int) -> None:
        self._sdk = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries,
            http_client=anthropic_http_client(),
        )

    async def complete(
        self, model: str, messages: list[ChatMessage], max_output_tokens: int
    ) -> Completion:
        # The Messages API takes system prompts apart from the conversation.
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns = [{"role": m.role, "content": m.content} for m in messages if m.role != "system"]
        kwargs = {"system": system} if system else {}
        try:
            response = await self._sdk.messages.create(
                model=model, messages=turns, max_tokens=max_output_tokens, **kwargs
            )
        except anthropic.APIStatusError as exc:
            raise error_from_status(self.provider, exc, exc.status_code) from None
        except anthropic.APIError as exc:
            raise error_from_status(self.provider, exc, None) from None
        text = "".join(block.text for block in response.content if block.type == "text")
        usage = response.usage
        cached = (usage.cache_read_input_tokens or 0) if usage else 0
        return Completion(
            text=text,
            finish_reason=response.stop_reason,
            model=response.model,
            input_tokens=(usage.input_tokens + cached) if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            cached_input_tokens=cached,
        )

    async def close(self) -> None:
        await self._sdk.close()
