"""The transport-neutral shape of a message in and out of a handler.

Handlers take a :class:`Source` and return :class:`Outgoing` messages; the Faust agents
(and the raw-aiokafka benchmark baseline) only move bytes. That keeps the logic testable
without a broker and the same in every transport.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from schemas.codec import DecodeError, encode, payload_field
from schemas.models import DeadLetter, DeadLetterCode


@dataclass(frozen=True, slots=True)
class Source:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float = 0.0  # the record's timestamp, epoch seconds


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    # Told the (partition, offset) the message was written at, once the broker acknowledged it.
    on_delivered: Callable[[int, int], None] | None = None


def dead_letter(
    dlq_topic: str,
    source: Source,
    *,
    code: DeadLetterCode,
    reason: str,
    stage: str,
    payload: object = None,
    attempts: int = 0,
) -> Outgoing:
    letter = DeadLetter(
        code=code,
        reason=reason,
        stage=stage,
        source_topic=source.topic,
        source_partition=source.partition,
        source_offset=source.offset,
        original_key=source.key,
        original_value=source.value or b"",
        request_id=payload_field(payload, "request_id"),
        workflow_id=payload_field(payload, "workflow_id"),
        attempts=attempts,
    )
    return Outgoing(dlq_topic, source.key, encode(letter))


def dead_letter_for(dlq_topic: str, source: Source, error: DecodeError, stage: str) -> Outgoing:
    return dead_letter(
        dlq_topic, source, code=error.code, reason=error.reason, stage=stage, payload=error.payload
    )
