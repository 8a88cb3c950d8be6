"""The transport-neutral shape of a message in and out of a handler.

Handlers take a :class:`Source` and return :class:`Outgoing` messages; the Faust agents
(and the raw-aiokafka benchmark baseline) only move bytes. That keeps the logic testable
without a broker and the same in every transport.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from schemas.codec import DecodeError, encode, payload_field
from schemas.models import AgentRequest, DeadLetter, DeadLetterCode


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


class DeadLetters:
    """The dead letters of one stage: each carries the reason, the original bytes and,
    when known, the request it was (so a reader can find the request it answers)."""

    def __init__(self, topic: str, stage: str) -> None:
        self.topic = topic
        self.stage = stage

    def letter(
        self, source: Source, code: DeadLetterCode, reason: str, request: object = None, attempts: int = 0,
    ) -> Outgoing:
        """``request``: the decoded request, or the parsed payload of an invalid one."""
        letter = DeadLetter(
            code=code,
            reason=reason,
            stage=self.stage,
            source_topic=source.topic,
            source_partition=source.partition,
            source_offset=source.offset,
            original_key=source.key,
            original_value=source.value or b"",
            request_id=_field(request, "request_id"),
            workflow_id=_field(request, "workflow_id"),
            attempts=attempts,
        )
        return Outgoing(self.topic, source.key, encode(letter))

    def undecodable(self, source: Source, error: DecodeError) -> Outgoing:
        return self.letter(source, error.code, error.reason, error.payload)

    def unknown_agent_type(self, source: Source, request: AgentRequest, known: Collection[str]) -> Outgoing | None:
        """The dead letter of a request whose agent type is not configured (None: it is).
        Checked again by the tier roles: tier topics can be written to directly, and a
        configuration change can reach the classifier and the tiers at different times."""
        if request.agent_type in known:
            return None
        return self.letter(
            source, "unknown_agent_type",
            f"agent_type '{request.agent_type}' is not configured (known: {', '.join(sorted(known))})", request,
        )


def _field(request: object, name: str) -> str | None:
    if request is None or isinstance(request, dict):
        return payload_field(request, name)
    value = getattr(request, name, None)
    return value if isinstance(value, str) else None
