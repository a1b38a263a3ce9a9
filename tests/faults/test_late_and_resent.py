"""Scenario 5: after a run has been fully metered, 10% of all events are sent again and new events
arrive hours and days late (event times inside windows that are already written, and days before any
window) -> every window exact.

And the late-horizon rule: with METERLINE_LATE_HORIZON_DAYS=1, events older than a day go to the
dead-letter store as `too_late` (visible through GET /api/v1/dead-letters?reasonCode=too_late) and are
not metered; their retries are still duplicates.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.faults.harness import (
    SPAN,
    START,
    MakeSender,
    MakeStack,
    Summary,
    begin,
    caught_up,
    dead_letters_api,
    fault_events,
    fault_factory,
    finish,
    settle,
    stream_with_retries,
    wait_caught_up,
)
from tests.oracle import EventFactory, first_sightings, parse_time

pytestmark = pytest.mark.faults


def test_resent_and_late_events(make_stack: MakeStack, make_sender: MakeSender, summary: Summary) -> None:
    started, row, seed, rng = begin(summary("5 resend 10% + hours/days late"), 5)
    stack = make_stack(processors=1)
    factory = fault_factory(seed)
    n = fault_events() // 3
    sender = make_sender(stack.url)
    # 2% of token counts are 34-digit decimals: late and resent windows must stay exact beyond 28 digits.
    sender.send_all(stream_with_retries(factory, n, rng, dup_rate=0.0, large_rate=0.02), rng)
    caught_up(stack, sender)  # every window of the span is written

    resent = [dict(e) for e in rng.sample(sender.accepted, len(sender.accepted) // 10)]
    hours_late = [factory.event(when=START + timedelta(milliseconds=rng.randrange(int(SPAN.total_seconds() * 1000))))
                  for _ in range(n // 10)]
    days_late = [factory.event(when=START - timedelta(days=rng.uniform(1, 9))) for _ in range(n // 20)]
    late = hours_late + days_late
    second = resent + late + [dict(e) for e in rng.sample(late, len(late) // 10)]
    rng.shuffle(second)
    sender.send_all(second, rng)
    row.late = len(late)
    row.note = f"{len(resent)} resent after the fact"
    settle(row, stack, sender, started)


def test_late_horizon_dead_letters(make_stack: MakeStack, make_sender: MakeSender, summary: Summary) -> None:
    started, row, seed, rng = begin(summary("5b late horizon 1 day"), 55)
    stack = make_stack(processors=1, extra_env={"METERLINE_LATE_HORIZON_DAYS": "1"})
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    # Fresh events 2-12 h old; late ones 2-9 days old: far from the 1-day boundary on purpose, so
    # processing time (which the rule is relative to) cannot flip a decision.
    factory = EventFactory(seed=seed, start=now - timedelta(hours=12), span=timedelta(hours=10))
    n = fault_events() // 5
    fresh = [factory.event() for _ in range(n)]
    late = [factory.event(when=now - timedelta(days=rng.uniform(2, 9))) for _ in range(n // 10)]
    stream = fresh + late
    rng.shuffle(stream)
    stream += [dict(e) for e in rng.sample(stream, len(stream) // 10)]  # retries, including of late ones
    sender = make_sender(stack.url)
    sender.send_all(stream, rng)
    window_from, window_to = now - timedelta(days=10), now + timedelta(days=1)
    horizon = now - timedelta(days=1)
    firsts = first_sightings(sender.accepted)
    counted = [e for e in firsts if parse_time(e["time"]) >= horizon]
    too_late = {(e["source"], e["id"]) for e in firsts if parse_time(e["time"]) < horizon}
    wait_caught_up(stack, counted, start=window_from, end=window_to)
    deadline = time.monotonic() + 60
    while True:
        letters = dead_letters_api(stack, reasonCode="too_late")
        got = {(d["event"]["source"], d["event"]["id"]) for d in letters}
        if got == too_late or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(too_late) < 1000, "raise the page size or lower METERLINE_FAULT_EVENTS"
    assert got == too_late, f"too_late dead letters differ: missing {len(too_late - got)}, extra {len(got - too_late)}"
    assert all(d["meter"] is None and d["reasonCode"] == "too_late" for d in letters)
    row.late = len(too_late)
    finish(row, stack, sender, counted, started, start=window_from, end=window_to)
