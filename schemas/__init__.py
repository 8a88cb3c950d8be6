"""tierstream's wire contract: pydantic models, their JSON codec and exported JSON Schema."""

from schemas.codec import DecodeError, decode, encode
from schemas.models import (
    SCHEMA_VERSION,
    AgentRequest,
    AgentResult,
    ChatMessage,
    CostEvent,
    DeadLetter,
    GuardrailEvent,
    Tier,
    TieredRequest,
    Timings,
)

__all__ = [
    "SCHEMA_VERSION",
    "AgentRequest",
    "AgentResult",
    "ChatMessage",
    "CostEvent",
    "DeadLetter",
    "DecodeError",
    "GuardrailEvent",
    "Tier",
    "TieredRequest",
    "Timings",
    "decode",
    "encode",
]
