"""Unit tests of streams/throttle_feed.py: the 429 back-off shared between replicas.

Each replica is a :class:`Throttles` with a :class:`ThrottleFeed` on simulated clocks (a
monotonic one per process, one shared wall clock); what one publishes is handed to the
others' ``apply``, as the throttles topic would. The broker-backed test is
``tests/test_throttle_e2e.py``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson
import pytest

from schemas.codec import decode, encode
from schemas.models import ThrottleEvent
from streams.ratelimit import Throttles
from streams.throttle_feed import ThrottleFeed
from topologies import Settings, load_settings

SETTINGS: Settings = load_settings(environ={})
MODEL = ("openai", "o3")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Replica:
    """One worker process: its throttles, its feed, and what it published."""

    def __init__(self, name: str, wall: Clock, monotonic_offset: float) -> None:
        self.wall = wall
        # Each process has its own monotonic clock: only differences of it mean anything.
        self.monotonic = Clock(wall.now - monotonic_offset)
        self.throttles = Throttles(dict(SETTINGS.providers), self.monotonic)
        self.published: list[tuple[bytes, bytes]] = []
        self.feed = ThrottleFeed(SETTINGS, self.throttles, self._publish, origin=name, wall=wall)

    async def _publish(self, key: bytes, value: bytes) -> None:
        self.published.append((key, value))

    def tick(self, seconds: float) -> None:
        self.monotonic.advance(seconds)

    @property
    def throttle(self):
        return self.throttles.get(*MODEL)


async def settled() -> None:
    """Let the feed's publishing tasks run (they only await the fake publish)."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.fixture
def wall() -> Clock:
    return Clock(1_750_000_000.0)


def advance(wall: Clock, *replicas: Replica, seconds: float) -> None:
    wall.advance(seconds)
    for replica in replicas:
        replica.tick(seconds)


def deliver(events: list[tuple[bytes, bytes]], *to: Replica) -> None:
    for _, value in events:
        for replica in to:
            replica.feed.apply(replica.feed.topic, value)


async def test_a_429_publishes_one_event_per_pause_with_absolute_times(wall: Clock) -> None:
    a = Replica("tier-premium/a", wall, monotonic_offset=1_749_000_000.0)
    a.throttles.on_rate_limited(*MODEL, 8.0)
    await settled()
    (key, value), = a.published
    event = decode(value, ThrottleEvent)
    assert key == b"openai/o3" and event.scope == "openai/o3"
    assert event.pause_until == datetime.fromtimestamp(wall.now + 8.0, UTC)
    assert event.cut_at == datetime.fromtimestamp(wall.now, UTC)
    assert (event.rate_factor, event.recovery_seconds, event.retry_after_seconds) == (0.5, 30, 8.0)
    assert event.origin == "tier-premium/a"
    # the wire holds the back-off and nothing else: no request, prompt or key
    assert set(orjson.loads(value)) == set(ThrottleEvent.model_fields)
    # the other calls in flight answer 429 too: no new cut, no new event
    advance(wall, a, seconds=0.1)
    a.throttles.on_rate_limited(*MODEL, 7.95)
    a.throttles.on_rate_limited(*MODEL, 8.0)
    await settled()
    assert len(a.published) == 1 and a.throttle.events_sent == 1 and a.throttle.rate_limited == 3
    # the provider asks for longer: published again
    a.throttles.on_rate_limited(*MODEL, 12.0)
    await settled()
    assert len(a.published) == 2
    assert decode(a.published[1][1], ThrottleEvent).pause_until == datetime.fromtimestamp(wall.now + 12.0, UTC)


async def test_replicas_pause_and_recover_together_without_a_feedback_loop(wall: Clock) -> None:
    a = Replica("a", wall, monotonic_offset=1_749_000_000.0)
    b = Replica("b", wall, monotonic_offset=1_000.0)  # another process, another monotonic clock
    c = Replica("c", wall, monotonic_offset=5.0)
    a.throttles.on_rate_limited(*MODEL, 10.0)
    await settled()
    advance(wall, a, b, c, seconds=0.2)  # the event's trip through Kafka
    deliver(a.published, a, b, c)  # every process reads the topic, its author included
    deliver(a.published, b, c)  # read twice (a restarted tail): idempotent
    await settled()
    assert a.throttle.events_applied == 0  # its own event changes nothing (and is skipped)
    for replica in (b, c):
        assert replica.throttle.events_applied == 1 and replica.throttle.rate_limited == 0
        assert replica.throttle.pause_remaining() == pytest.approx(9.8)
        assert replica.throttle.factor() == pytest.approx(a.throttle.factor())
        assert replica.published == []  # adopting publishes nothing: no feedback loop
    for seconds in (9.8, 5.0, 10.0, 20.0):  # the pause ends together; the rate recovers together
        advance(wall, a, b, c, seconds=seconds)
        factors = {round(r.throttle.factor(), 9) for r in (a, b, c)}
        pauses = {round(r.throttle.pause_remaining(), 9) for r in (a, b, c)}
        assert len(factors) == 1 and pauses == {0.0}, (seconds, factors, pauses)
    assert a.throttle.factor() == 1.0
    assert len(a.published) == 1


async def test_a_429_seen_elsewhere_during_a_pause_does_not_cut_again(wall: Clock) -> None:
    """B adopted A's pause; B's calls already in flight then get their 429s: the rate is
    cut once for the cluster, not once per replica."""
    a, b = Replica("a", wall, 0.0), Replica("b", wall, 0.0)
    a.throttles.on_rate_limited(*MODEL, 5.0)
    await settled()
    deliver(a.published, b)
    advance(wall, a, b, seconds=0.1)
    b.throttles.on_rate_limited(*MODEL, 4.9)
    await settled()
    assert b.throttle.factor() == pytest.approx(a.throttle.factor())
    assert b.published == []


async def test_a_lower_rate_from_another_replica_wins_and_a_higher_one_does_not(wall: Clock) -> None:
    a, b = Replica("a", wall, 0.0), Replica("b", wall, 0.0)
    b.throttles.on_rate_limited(*MODEL, None)  # b cut to 0.5 on its own
    a.throttles.on_rate_limited(*MODEL, None)
    advance(wall, a, b, seconds=1.0)
    a.throttles.on_rate_limited(*MODEL, None)  # a cut twice: 0.25-ish
    await settled()
    deliver(a.published[-1:], b)
    assert b.throttle.factor() == pytest.approx(a.throttle.factor())
    deliver(b.published, a)  # b's older, milder cut changes nothing in a
    assert a.throttle.events_applied == 0


@pytest.mark.parametrize(
    ("age", "expected_factor"),
    [(3600.0, 1.0), (40.0, 1.0), (10.0, 0.5 + 0.5 * 10 / 30)],
)
async def test_a_stale_event_at_startup_is_harmless(wall: Clock, age: float, expected_factor: float) -> None:
    """A compacted topic keeps the last event per model: a new worker reads events whose
    pause is over. It does not pause; it takes on what is left of the recovery."""
    event = ThrottleEvent(
        scope="openai/o3", provider="openai", model="o3",
        pause_until=datetime.fromtimestamp(wall.now - age + 2.0, UTC), rate_factor=0.5,
        cut_at=datetime.fromtimestamp(wall.now - age, UTC), recovery_seconds=30, retry_after_seconds=2.0,
        origin="tier-premium/old-worker",
    )
    fresh = Replica("fresh", wall, 123.0)
    fresh.feed.apply(fresh.feed.topic, encode(event))
    assert fresh.throttle.pause_remaining() == 0.0
    assert fresh.throttle.factor() == pytest.approx(expected_factor)
    assert fresh.throttle.events_applied == (1 if expected_factor < 1 else 0)
    fresh.throttles.ready.set()  # the topic is read
    await asyncio.wait_for(fresh.throttle.wait(), 1)  # no pause: the call goes at once
    assert fresh.published == []


async def test_what_is_not_a_throttle_event_of_a_known_provider_is_ignored(wall: Clock) -> None:
    replica = Replica("r", wall, 0.0)
    topic = replica.feed.topic
    other = ThrottleEvent(
        scope="mistral/large", provider="mistral", model="large",
        pause_until=datetime.fromtimestamp(wall.now + 60, UTC), rate_factor=0.1,
        cut_at=datetime.fromtimestamp(wall.now, UTC), recovery_seconds=30, origin="elsewhere",
    )
    for value in (None, b"not json", b'{"scope": "openai/o3"}', encode(other)):
        replica.feed.apply(topic, value)
    assert list(replica.throttles.items()) == []


async def test_no_call_goes_before_the_other_replicas_back_off_is_read(wall: Clock) -> None:
    replica = Replica("r", wall, 0.0)
    waiting = asyncio.create_task(replica.throttle.wait())
    await settled()
    assert not waiting.done()  # the feed has not read the topic yet
    replica.throttles.ready.set()  # what the feed does once its tail caught up
    await asyncio.wait_for(waiting, 1)
