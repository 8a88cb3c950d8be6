"""Bytes <-> models, with failures classified so they can be dead-lettered with a reason."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from schemas.models import SCHEMA_VERSION, BudgetRecord, CostEvent, DeadLetterCode, WireModel

M = TypeVar("M", bound=WireModel)


class DecodeError(ValueError):
    """A message that cannot become a model. ``code`` is machine-readable, ``reason`` human."""

    def __init__(self, code: DeadLetterCode, reason: str, payload: Any = None) -> None:
        super().__init__(reason)
        self.code: DeadLetterCode = code
        self.reason = reason
        # The parsed JSON, when it was JSON: lets a dead letter name the request it came from.
        self.payload = payload


def encode(model: WireModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def parse(raw: bytes | None, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The JSON object of a message of this contract's version, not yet validated."""
    if raw is None:
        raise DecodeError("invalid_json", "message has no value (a tombstone?)")
    if max_bytes is not None and len(raw) > max_bytes:
        raise DecodeError(
            "too_large", f"message is {len(raw)} bytes, over the limit of {max_bytes} bytes"
        )
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise DecodeError(
            "schema_invalid", f"expected a JSON object, got {type(payload).__name__}", payload
        )
    version = payload.get("schema_version", SCHEMA_VERSION)
    # `type(...) is int`: JSON true and 1.0 compare equal to 1 in Python, but are not versions.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise DecodeError(
            "unsupported_schema_version",
            f"schema_version {version!r} is not supported (this worker reads {SCHEMA_VERSION})",
            payload,
        )
    return payload


def validate(payload: dict[str, Any], model: type[M]) -> M:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise DecodeError(
            "schema_invalid",
            f"{model.__name__} is invalid: {describe_validation_error(exc)}",
            payload,
        ) from None


def decode(raw: bytes | None, model: type[M], *, max_bytes: int | None = None) -> M:
    return validate(parse(raw, max_bytes=max_bytes), model)


def decode_cost_record(raw: bytes | None) -> CostEvent | BudgetRecord:
    """A record of the costs topic: a budget lease's record has a ``budget`` field."""
    payload = parse(raw)
    return validate(payload, BudgetRecord if "budget" in payload else CostEvent)


def payload_field(payload: Any, name: str) -> str | None:
    """A string field of a parsed-but-invalid payload, for labelling its dead letter."""
    if isinstance(payload, dict):
        value = payload.get(name)
        if isinstance(value, str) and len(value) <= 128:
            return value
    return None


def is_cost_event(raw: bytes | None) -> bool:
    """Whether a costs-topic record is a call's cost (not a budget lease's record)."""
    try:
        payload = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "budget" not in payload
