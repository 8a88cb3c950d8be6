"""Labelled routing data: prompts with the quality each tier's model reached on them.

The format ``tierstream router train`` and ``router eval`` read: JSON Lines, one
:class:`RoutingExample` per line. It is a data format for people who grade their own
traffic, not a Kafka message, so it is versioned with the file format of the router
(``streams.routing``) and exported beside the wire schemas for other tools.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.models import AgentType, ChatMessage, Tier

Quality = Annotated[float, Field(ge=0, le=1)]


class RoutingExample(BaseModel):
    """One prompt and, per tier, the quality in [0, 1] of that tier's model's answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = Field(default=None, min_length=1, description="The task as plain text (or use messages).")
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="The task as chat messages (or use prompt)."
    )
    agent_type: AgentType | None = Field(default=None, description="The request's agent type, if known.")
    source: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="The task family; cross-validation holds out whole families.",
    )
    scores: dict[Tier, Quality] = Field(
        min_length=2, max_length=3,
        description="Tier name -> the quality of that tier's model on this prompt (1: right, 0: wrong).",
    )

    @model_validator(mode="after")
    def _exactly_one_prompt_form(self) -> RoutingExample:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def text(self) -> str:
        return "\n".join(self.contents())

    def contents(self) -> list[str]:
        """The prompt as the message contents a request would carry."""
        if self.messages is not None:
            return [m.content for m in self.messages]
        assert self.prompt is not None
        return [self.prompt]


DATA_MODELS: dict[str, type[BaseModel]] = {"routing_example": RoutingExample}
