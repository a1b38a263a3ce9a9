"""`EventProducer.publish`'s own deadline: a request whose delivery report never comes is a 503, in time.

librdkafka's `message.timeout.ms` normally fails such a message first (tests/integration/test_ingest.py,
a paused broker); this is the safety net behind it, kept by the loop's poll tick rather than a timer per
request. The librdkafka producer is replaced by one that queues and never reports (what a lost report
looks like from the loop), so the oracle is the clock: each request fails no earlier than its deadline
(timeout + slack) and within a few poll ticks after it, whatever else settles around it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import ingest.producer
from ingest.producer import EventProducer
from meterline.core.errors import BrokerUnavailableError
from meterline.settings import Settings

TIMEOUT = 0.2
SLACK = 0.1


class Silent:
    """A librdkafka producer stand-in: takes every message, reports none unless told to."""

    def __init__(self) -> None:
        self.queued: list[Any] = []  # the delivery callbacks of messages not yet reported

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        self.queued.append(on_delivery)

    def poll(self, timeout: float) -> int:
        return 0

    def deliver_all(self) -> None:
        queued, self.queued = self.queued, []
        for report in queued:
            report(None, None)

    def __len__(self) -> int:
        return len(self.queued)

    def flush(self, timeout: float) -> int:
        return len(self.queued)


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> tuple[EventProducer, Silent]:
    monkeypatch.setattr(ingest.producer, "DEADLINE_SLACK_SECONDS", SLACK)
    events = EventProducer(Settings(kafka_bootstrap="unused:9092", produce_timeout_seconds=TIMEOUT))
    silent = Silent()
    events._producer = silent  # type: ignore[assignment]
    return events, silent


async def timed(publish: Any) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await asyncio.wait_for(publish, TIMEOUT + SLACK + 2)  # a missed deadline fails here, not at pytest's
    except BrokerUnavailableError as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


async def test_an_unreported_publish_fails_at_its_deadline(producer: tuple[EventProducer, Silent]) -> None:
    events, _ = producer
    elapsed, error = await timed(events.publish([(b"k", b"[]"), (b"k2", b"[]")]))
    assert isinstance(error, BrokerUnavailableError)
    assert "did not acknowledge 2 message(s)" in str(error)
    assert TIMEOUT + SLACK <= elapsed < TIMEOUT + SLACK + 0.5


async def test_reported_requests_settle_and_a_stuck_one_still_expires(producer: tuple[EventProducer, Silent]) -> None:
    """A request stuck at the head of the deadlines does not hold back the ones behind it, nor they it."""
    events, silent = producer
    stuck = asyncio.ensure_future(timed(events.publish([(b"k", b"[]")])))
    await asyncio.sleep(0.05)
    stuck_report = silent.queued.pop()  # this one's report is lost
    later = [asyncio.ensure_future(timed(events.publish([(b"k", b"[]")]))) for _ in range(3)]
    await asyncio.sleep(0.01)  # each has produced and waits for its report
    assert len(silent) == 3
    silent.deliver_all()  # the three later requests are acknowledged
    for elapsed, error in await asyncio.gather(*later):
        assert error is None and elapsed < TIMEOUT
    elapsed, error = await stuck
    assert isinstance(error, BrokerUnavailableError)
    assert TIMEOUT + SLACK <= elapsed + 0.05 < TIMEOUT + SLACK + 0.5
    stuck_report(None, None)  # a report arriving after the 503 changes nothing
    assert not events._deadlines


async def test_after_close_the_tick_still_expires_what_is_in_flight(producer: tuple[EventProducer, Silent]) -> None:
    events, _ = producer
    pending = asyncio.ensure_future(timed(events.publish([(b"k", b"[]")])))
    await asyncio.sleep(0.01)
    events.close(timeout=0)  # the report never comes: shutdown must not wait for ever
    elapsed, error = await asyncio.wait_for(pending, TIMEOUT + SLACK + 1)
    assert elapsed >= TIMEOUT + SLACK - 0.01
    assert isinstance(error, BrokerUnavailableError)
    await asyncio.sleep(0.01)
    assert events._poll_timer is None  # nothing in flight, no producer: the tick stopped
