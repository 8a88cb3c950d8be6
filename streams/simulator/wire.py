"""Request parsing and response/error shapes of the OpenAI and Anthropic APIs.

The shapes follow what the official SDKs read: OpenAI's ``{"error": {message, type,
param, code}}`` and ``x-request-id``; Anthropic's ``{"type": "error", "error": {type,
message}, "request_id"}`` and ``request-id``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson

from .content import (
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    Answer,
    content_text,
    estimate_text_tokens,
)
from .limiter import Quota

ApiName = Literal["openai", "anthropic"]

ORGANIZATION = "org-tierstream-sim"
"""The organization named in rate-limit messages."""


STREAM_UNSUPPORTED = "stream=true is not supported by provider-sim."


class RequestError(Exception):
    """A request the provider would refuse with a 4xx (or, for a batch queue limit, 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    model: str
    max_tokens: int
    input_tokens: int
    texts: list[str]
    """Every message's text (system included), for the deterministic answer hash."""
    user_text: str
    """Text of the last user message: where test directives are read."""
    system_text: str
    stream: bool


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``120ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


def _rfc3339_in(seconds: float) -> str:
    moment = datetime.fromtimestamp(time.time() + seconds, UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def rfc3339(timestamp: float) -> str:
    """A Unix time as Anthropic writes it: ``2024-09-24T18:37:24.100435Z``."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _text_of_messages(
    messages: list[Any], system_roles: frozenset[str], allowed_roles: frozenset[str]
) -> tuple[int, list[str], str, list[str]]:
    """Input tokens, all texts, last user text and system texts of ``messages``."""
    tokens = REPLY_PRIMING_TOKENS
    texts: list[str] = []
    systems: list[str] = []
    user_text = ""
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            message_error = f"messages.{index}: Input should be an object"
            raise RequestError(400, message_error, param="messages")
        role = message.get("role")
        if role not in allowed_roles:
            raise RequestError(
                400, f"Invalid value for 'messages[{index}].role': {role!r}", param="messages"
            )
        text, extra = content_text(message.get("content"))
        tool_calls = message.get("tool_calls")
        if tool_calls:
            extra += estimate_text_tokens(orjson.dumps(tool_calls).decode())
        tokens += MESSAGE_OVERHEAD_TOKENS + extra + (estimate_text_tokens(text) if text else 0)
        texts.append(text)
        if role == "user":
            user_text = text
        elif role in system_roles:
            systems.append(text)
    return tokens, texts, user_text, systems


def _positive_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"Invalid type for '{field}': expected an integer", param=field)
    if value < 1:
        message = f"Invalid '{field}': integer below minimum value. Expected a value >= 1"
        raise RequestError(400, message, param=field)
    return value


def _require_model(body: dict[str, Any], message: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, message, param="model")
    return model


class Wire(Protocol):
    name: ApiName
    request_id_header: str
    missing_key_message: str

    def authenticated(self, headers: Any) -> bool: ...
    def parse(self, body: dict[str, Any]) -> ParsedRequest: ...
    def response(self, request: ParsedRequest, answer: Answer, serial: int) -> dict[str, Any]: ...
    def error_body(
        self,
        status: int,
        message: str,
        request_id: str,  # OpenAI sends it only as a header
        *,
        error_type: str | None = None,
        param: str | None = None,  # not part of Anthropic's error shape
        code: str | None = None,
    ) -> dict[str, Any]: ...
    def quota_headers(self, quota: Quota) -> dict[str, str]: ...
    def rate_limit_type(self, kind: str) -> str: ...


def _bearer(headers: Any) -> bool:
    value = headers.get("Authorization", "")
    return value[:7].lower() == "bearer " and bool(value[7:].strip())


class OpenAIWire:
    name: ApiName = "openai"
    request_id_header = "x-request-id"
    missing_key_message = (
        "You didn't provide an API key. You need to provide your API key in an "
        "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
    )
    _roles = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
    _system_roles = frozenset({"system", "developer"})
    _error_types = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "permission_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
        422: "invalid_request_error",
        429: "requests",
    }

    def __init__(self, default_max_tokens: int) -> None:
        self._default_max_tokens = default_max_tokens

    def authenticated(self, headers: Any) -> bool:
        return _bearer(headers)

    def parse(self, body: dict[str, Any]) -> ParsedRequest:
        model = _require_model(body, "you must provide a model parameter")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "[] is too short - 'messages'", param="messages")
        completion_limit = _positive_int(body, "max_completion_tokens")
        legacy_limit = _positive_int(body, "max_tokens")
        limit = completion_limit if completion_limit is not None else legacy_limit
        n = body.get("n")
        if n is not None and n != 1:
            raise RequestError(400, "provider-sim supports only n=1", param="n")
        tokens, texts, user_text, systems = _text_of_messages(
            messages, self._system_roles, self._roles
        )
        tools = body.get("tools")
        if tools:
            tokens += estimate_text_tokens(orjson.dumps(tools).decode())
        return ParsedRequest(
            model=model,
            max_tokens=limit or self._default_max_tokens,
            input_tokens=tokens,
            texts=texts,
            user_text=user_text,
            system_text="\n".join(systems),
            stream=bool(body.get("stream")),
        )

    def response(self, request: ParsedRequest, answer: Answer, serial: int) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-sim{serial:020d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": answer.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "length" if answer.truncated else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": request.input_tokens,
                "completion_tokens": answer.output_tokens,
                "total_tokens": request.input_tokens + answer.output_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_tierstream_sim",
        }

    def rate_limit_type(self, kind: str) -> str:
        return kind  # OpenAI reports "requests" or "tokens"

    def error_body(
        self,
        status: int,
        message: str,
        request_id: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> dict[str, Any]:
        if error_type is None:
            error_type = self._error_types.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            )
        return {"error": {"message": message, "type": error_type, "param": param, "code": code}}

    def quota_headers(self, quota: Quota) -> dict[str, str]:
        headers: dict[str, str] = {}
        if quota.requests_limit is not None:
            headers["x-ratelimit-limit-requests"] = str(quota.requests_limit)
            headers["x-ratelimit-remaining-requests"] = str(quota.requests_remaining)
            headers["x-ratelimit-reset-requests"] = format_duration(quota.requests_reset_s)
        if quota.tokens_limit is not None:
            headers["x-ratelimit-limit-tokens"] = str(quota.tokens_limit)
            headers["x-ratelimit-remaining-tokens"] = str(quota.tokens_remaining)
            headers["x-ratelimit-reset-tokens"] = format_duration(quota.tokens_reset_s)
        return headers


class AnthropicWire:
    name: ApiName = "anthropic"
    request_id_header = "request-id"
    missing_key_message = "x-api-key header is required"
    _roles = frozenset({"user", "assistant"})
    _error_types = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        504: "timeout_error",
        529: "overloaded_error",
    }

    def authenticated(self, headers: Any) -> bool:
        # The real API takes x-api-key; SDK 2.x sends the api key as a Bearer token.
        return bool(headers.get("x-api-key", "").strip()) or _bearer(headers)

    def parse(self, body: dict[str, Any]) -> ParsedRequest:
        model = _require_model(body, "model: Field required")
        if body.get("max_tokens") is None:
            raise RequestError(400, "max_tokens: Field required", param="max_tokens")
        max_tokens = _positive_int(body, "max_tokens")
        assert max_tokens is not None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages: at least one message is required", param="messages")
        system = body.get("system")
        if system is not None and not isinstance(system, (str, list)):
            message = "system: Input should be a valid string or list"
            raise RequestError(400, message, param="system")
        system_text, system_extra = content_text(system)
        tokens, texts, user_text, _ = _text_of_messages(messages, frozenset(), self._roles)
        if system_text or system_extra:
            tokens += system_extra + (estimate_text_tokens(system_text) if system_text else 0)
            texts.insert(0, system_text)
        tools = body.get("tools")
        if tools:
            tokens += estimate_text_tokens(orjson.dumps(tools).decode())
        return ParsedRequest(
            model=model,
            max_tokens=max_tokens,
            input_tokens=tokens,
            texts=texts,
            user_text=user_text,
            system_text=system_text,
            stream=bool(body.get("stream")),
        )

    def response(self, request: ParsedRequest, answer: Answer, serial: int) -> dict[str, Any]:
        return {
            "id": f"msg_sim{serial:020d}",
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": [{"type": "text", "text": answer.text}],
            "stop_reason": "max_tokens" if answer.truncated else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": request.input_tokens,
                "output_tokens": answer.output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "service_tier": "standard",
            },
        }

    def rate_limit_type(self, kind: str) -> str:
        return "rate_limit_error"

    def error_body(
        self,
        status: int,
        message: str,
        request_id: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> dict[str, Any]:
        if error_type is None:
            error_type = self._error_types.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
        return {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": request_id,
        }

    def quota_headers(self, quota: Quota) -> dict[str, str]:
        headers: dict[str, str] = {}
        if quota.requests_limit is not None:
            headers["anthropic-ratelimit-requests-limit"] = str(quota.requests_limit)
            headers["anthropic-ratelimit-requests-remaining"] = str(quota.requests_remaining)
            headers["anthropic-ratelimit-requests-reset"] = _rfc3339_in(quota.requests_reset_s)
        if quota.tokens_limit is not None:
            headers["anthropic-ratelimit-tokens-limit"] = str(quota.tokens_limit)
            headers["anthropic-ratelimit-tokens-remaining"] = str(quota.tokens_remaining)
            headers["anthropic-ratelimit-tokens-reset"] = _rfc3339_in(quota.tokens_reset_s)
        return headers
