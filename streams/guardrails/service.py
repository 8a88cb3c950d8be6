"""Runs the guardrail view inside a Faust worker and reports when the hour is spent.

The budget gate holds every model call while the hour is spent; this service does not
also call Faust's ``pause_partitions``: Faust drops records already fetched for a
partition paused mid-batch and then commits past them as a gap, which loses requests.
Fetched but unanswered requests stay uncommitted, bounded by Faust's stream buffer.
"""

from __future__ import annotations

import logging

import mode

from streams.guardrails.view import GuardrailView
from streams.tail import FollowerService

log = logging.getLogger(__name__)
CHECK_SECONDS = 0.2


class GuardrailService(FollowerService):
    def __init__(self, view: GuardrailView, source_topic: str | None, **kwargs: object) -> None:
        self.view = view
        self.source_topic = source_topic
        self.paused = False
        super().__init__(view, **kwargs)

    @mode.Service.timer(CHECK_SECONDS)
    async def _report_pause(self) -> None:
        if self.source_topic is None:
            return
        paused = self.view.hour_paused()
        if paused != self.paused:
            log.warning(
                "hourly budget %s model calls on %s",
                "spent: pausing" if paused else "available again: resuming", self.source_topic,
            )
            self.paused = paused
