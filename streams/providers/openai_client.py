"""OpenAI Chat Completions through the official async SDK."""

from __future__ import annotations

import openai

from schemas.models import ChatMessage
from streams.providers.base import Completion, error_from_status
from streams.providers.transport import openai_http_client


class OpenAIClient:
    provider = "openai"

    def __init__(self, api_key: str, base_url: str | None, timeout: float, max_retries: int) -> None:
        self._sdk = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries,
            http_client=openai_http_client(),
        )

    async def complete(
        self, model: str, messages: list[ChatMessage], max_output_tokens: int
    ) -> Completion:
        try:
            response = await self._sdk.chat.completions.create(
                model=model,
                messages=[{"role": m.role, "content": m.content} for m in messages],
                max_completion_tokens=max_output_tokens,
            )
        except openai.APIStatusError as exc:
            raise error_from_status(self.provider, exc, exc.status_code) from None
        except openai.APIError as exc:  # connection errors and timeouts
            raise error_from_status(self.provider, exc, None) from None
        choice = response.choices[0]
        usage = response.usage
        prompt_details = getattr(usage, "prompt_tokens_details", None) if usage else None
        completion_details = getattr(usage, "completion_tokens_details", None) if usage else None
        return Completion(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            model=response.model,
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            cached_input_tokens=(getattr(prompt_details, "cached_tokens", 0) or 0),
            reasoning_tokens=(getattr(completion_details, "reasoning_tokens", 0) or 0),
        )

    async def close(self) -> None:
        await self._sdk.close()
