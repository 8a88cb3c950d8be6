"""A 429 slows down every replica: back-off shared through the throttles topic.

When a call of this process gets a 429 that changes its back-off for a provider model (a
new cut of the rate, or a longer Retry-After pause), the feed publishes a
:class:`~schemas.models.ThrottleEvent` keyed ``<provider>/<model>``: the pause's end as
an absolute time, the cut rate and its recovery. Every process that calls models follows
the compacted topic with a group-less :class:`~streams.tail.TopicTail` from the start and
applies the other replicas' events with :meth:`Throttle.adopt`: the longer pause, the
lower rate. So the replicas pause together and recover together.

- *No feedback loop*: only a provider's 429 publishes (``Throttles.listeners``); adopting
  an event tells no listener, and a process skips its own events (``origin``).
- *Stale events are harmless*: a pause already over is not adopted, and a curve that has
  recovered is not lower than the full rate. A new process reads the topic before its
  first call (``Throttles.ready``), so it starts inside a pause still running.
- *Clocks*: times on the wire are wall-clock (UTC); each process converts them to its
  monotonic clock on receipt, so clock skew between hosts shifts a pause by the skew.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from schemas.codec import DecodeError, decode, encode
from schemas.models import ThrottleEvent
from streams.ratelimit import BackoffCurve, Clock, Throttle, Throttles, ThrottleState
from streams.tail import TopicTail
from topologies.config import Settings
from topologies.topics import topology_of

log = logging.getLogger(__name__)
Publish = Callable[[bytes, bytes], Awaitable[object]]
# A 429 that only lengthens a pause already published by less than this is not published
# again: a burst of 429s on the calls in flight must not become a burst of events.
MIN_EXTENSION_SECONDS = 0.5
LONG_AGO_SECONDS = 86_400.0


def process_origin(role: str) -> str:
    """Names this process in the events it publishes (no secret, no request data)."""
    return f"{role}/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class ThrottleFeed:
    def __init__(
        self,
        settings: Settings,
        throttles: Throttles,
        publish: Publish,
        origin: str,
        wall: Clock = time.time,
    ) -> None:
        self.topic = topology_of(settings).throttles.name
        self.throttles = throttles
        self.publish = publish
        self.origin = origin
        self._wall = wall
        self._published: dict[str, ThrottleState] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._tail = TopicTail(settings, [self.topic], self.apply)
        self._ready_task: asyncio.Task[None] | None = None
        throttles.listeners.append(self._on_local_change)
        throttles.ready.clear()  # no call until the other replicas' back-off is read

    # ------------------------------------------------------------------ clocks
    def _to_wall(self, monotonic: float) -> datetime:
        now = self.throttles.clock()
        # A rate never cut is "cut at -inf": any time long past says the same.
        monotonic = max(monotonic, now - LONG_AGO_SECONDS)
        return datetime.fromtimestamp(self._wall() + (monotonic - now), UTC)

    def _to_monotonic(self, at: datetime) -> float:
        return self.throttles.clock() + (at.timestamp() - self._wall())

    # -------------------------------------------------------------- publishing
    def event(self, provider: str, model: str, throttle: Throttle, retry_after: float | None = None) -> ThrottleEvent:
        state = throttle.state()
        return ThrottleEvent(
            scope=f"{provider}/{model}", provider=provider, model=model,
            pause_until=self._to_wall(state.blocked_until), rate_factor=state.curve.cut_factor,
            cut_at=self._to_wall(state.curve.cut_at), recovery_seconds=state.curve.recovery_seconds,
            retry_after_seconds=retry_after, origin=self.origin,
        )

    def _on_local_change(self, provider: str, model: str, throttle: Throttle, retry_after: float | None) -> None:
        scope = f"{provider}/{model}"
        state = throttle.state()
        last = self._published.get(scope)
        if (
            last is not None
            and last.curve == state.curve
            and state.blocked_until < last.blocked_until + MIN_EXTENSION_SECONDS
        ):
            return
        self._published[scope] = state
        event = self.event(provider, model, throttle, retry_after)
        task = asyncio.ensure_future(self._send(scope, event, throttle))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, scope: str, event: ThrottleEvent, throttle: Throttle) -> None:
        try:
            await self.publish(scope.encode(), encode(event))
        except Exception as exc:  # noqa: BLE001 - this process is throttled anyway
            log.warning("could not publish the 429 back-off of %s: %r", scope, exc)
            return
        throttle.events_sent += 1
        log.info(
            "429 from %s: published back-off to every replica (pause until %s, rate x%.2f)",
            scope, event.pause_until.isoformat(), event.rate_factor,
        )

    # ----------------------------------------------------------------- applying
    def apply(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        try:
            event = decode(value, ThrottleEvent)
        except DecodeError as exc:
            log.warning("ignoring an undecodable message on %s: %s", topic, exc.reason)
            return
        if event.origin == self.origin or not self.throttles.knows(event.provider):
            return  # our own back-off is in force already; another provider is not ours
        state = ThrottleState(
            self._to_monotonic(event.pause_until),
            BackoffCurve(event.rate_factor, self._to_monotonic(event.cut_at), event.recovery_seconds),
        )
        throttle = self.throttles.get(event.provider, event.model)
        if throttle.adopt(state):
            log.info(
                "back-off from another replica for %s: paused %.1f s, rate x%.2f now",
                event.scope, throttle.pause_remaining(), throttle.factor(),
            )

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self._tail.start()
        self._ready_task = asyncio.create_task(self._release_when_caught_up())

    async def _release_when_caught_up(self) -> None:
        await self._tail.caught_up.wait()
        self.throttles.ready.set()

    async def stop(self) -> None:
        if self._ready_task is not None:
            self._ready_task.cancel()
        if self._sending:
            await asyncio.wait(list(self._sending), timeout=2.0)
        await self._tail.stop()
