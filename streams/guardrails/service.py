"""Runs the guardrail view inside a Faust worker and pauses its source partitions while
the hour's budget is spent."""

from __future__ import annotations

import logging

import faust
import mode

from streams.guardrails.view import GuardrailView

log = logging.getLogger(__name__)
CHECK_SECONDS = 0.2


class GuardrailService(mode.Service):
    def __init__(self, app: faust.App, view: GuardrailView, source_topic: str | None, **kwargs: object) -> None:
        self.app = app
        self.view = view
        self.source_topic = source_topic
        self.paused = False
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.view.start()

    async def on_stop(self) -> None:
        await self.view.stop()

    def _source_partitions(self) -> set[object]:
        return {tp for tp in self.app.consumer.assignment() if tp.topic == self.source_topic}

    @mode.Service.timer(CHECK_SECONDS)
    async def _apply_pause(self) -> None:
        """Stop fetching the tier topic while the hour is spent (the budget gate already
        holds every call); re-applied on every tick, so a rebalance cannot undo it."""
        if self.source_topic is None:
            return
        paused = self.view.hour_paused()
        if paused != self.paused:
            log.warning(
                "hourly budget %s: %s consumption of %s",
                "spent" if paused else "available again", "pausing" if paused else "resuming",
                self.source_topic,
            )
            self.paused = paused
        partitions = self._source_partitions()
        if paused:
            self.app.consumer.pause_partitions(partitions)
        elif partitions:
            self.app.consumer.resume_partitions(partitions)
