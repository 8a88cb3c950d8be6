"""Says when a spent hour starts and stops holding a tier role's model calls.

The budget gate holds every model call while the hour is spent; consumption is not also
paused with Faust's ``pause_partitions``: Faust drops records already fetched for a
partition paused mid-batch and then commits past them as a gap, which loses requests.
Fetched but unanswered requests stay uncommitted, bounded by Faust's stream buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from streams.guardrails.view import GuardrailView

log = logging.getLogger(__name__)
CHECK_SECONDS = 0.2


class PauseReport:
    def __init__(self, view: GuardrailView, source_topic: str) -> None:
        self.view = view
        self.source_topic = source_topic
        self.paused = False

    async def check(self) -> None:
        paused = self.view.hour_paused()
        if paused != self.paused:
            log.warning(
                "hourly budget %s model calls on %s",
                "spent: pausing" if paused else "available again: resuming", self.source_topic,
            )
            self.paused = paused

    def timer(self) -> tuple[float, Callable[[], Awaitable[None]]]:
        return CHECK_SECONDS, self.check
