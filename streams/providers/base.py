"""What a model call returns, and how its failures are told apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from schemas.models import ChatMessage


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None
    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0


class ProviderError(Exception):
    """A call that failed after the SDK's own retries.

    ``retryable`` is False for request errors (4xx other than 408/409/429), which fail the
    same way however often they are sent. The message never holds credentials.
    """

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int | None,
        retryable: bool,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts = 0


class ModelClient(Protocol):
    provider: str

    async def complete(
        self, model: str, messages: list[ChatMessage], max_output_tokens: int
    ) -> Completion: ...

    async def close(self) -> None: ...


def _retry_after(exc: Exception) -> float | None:
    """The server's requested wait, from ``retry-after-ms`` or ``retry-after`` seconds."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue  # an HTTP-date: fall back to our own backoff
    return None


def error_from_status(provider: str, exc: Exception, status: int | None) -> ProviderError:
    retryable = status is None or status in (408, 409, 429) or status >= 500
    kind = type(exc).__name__
    detail = f"HTTP {status} {kind}" if status is not None else kind
    message = getattr(exc, "message", None) or str(exc)
    return ProviderError(
        provider,
        f"{detail}: {message}"[:500],
        status=status,
        retryable=retryable,
        retry_after=_retry_after(exc),
    )


def malformed_response(provider: str, status: int, exc: Exception) -> ProviderError:
    """A 2xx answer that is not the API's response shape: retried like a server error."""
    return ProviderError(
        provider, f"HTTP {status}: malformed response body ({type(exc).__name__}: {exc})"[:500],
        status=status, retryable=True,
    )
