"""Infrastructure outages in the middle of a run.

Scenario 3: ClickHouse is killed (SIGKILL) for a while and started again on the same data dir and the
same ports. The documented behaviour (docs/design.md, "Exactly-once effect" 4; processor/sink.py) is
that the processor retries with backoff forever and never crashes, so the test does NOT restart it:
a worker that died is a failure.

Scenario 4: the broker is frozen (SIGSTOP) and thawed (SIGCONT). While it is frozen ingest must answer
503 within a bounded time -- every answer is 204 or 503, nothing else -- and a real client retries the
503s after the broker is back. Every event of a 2xx answer counts exactly once; events whose first try
got a 503 may already be in the log (timed out, then delivered) and their retry must then be dropped
as a duplicate, which the oracle's first-sighting rule checks.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.faults.harness import (
    Background,
    MakeSender,
    MakeStack,
    Summary,
    assert_worker_alive,
    batches,
    begin,
    caught_up,
    env_int,
    fault_events,
    fault_stream,
    feed_in_background,
    finish,
    settle,
    wait_until,
    worker_metric,
)

pytestmark = pytest.mark.faults


def test_clickhouse_killed_and_restarted(make_stack: MakeStack, make_sender: MakeSender,
                                         summary: Summary) -> None:
    outage = env_int("METERLINE_FAULT_CH_OUTAGE_SECONDS", 20)
    started, row, seed, rng = begin(summary(f"3 ClickHouse down {outage}s"), 3)
    stack = make_stack(processors=1)
    stream = fault_stream(seed, fault_events() // 3, rng)
    sender = make_sender(stack.url)
    feeder = feed_in_background(sender, stream, rng, over_seconds=30.0)
    wait_until(lambda: worker_metric(stack, 0, "meterline_processor_batches") > 0, "processor writing", stack)
    assert stack.clickhouse is not None
    stack.clickhouse.kill()
    killed = time.monotonic()
    retries = worker_metric(stack, 0, "meterline_processor_write_retries")
    # The outage has landed once the processor is retrying a write; it then lasts `outage` seconds in all.
    wait_until(lambda: worker_metric(stack, 0, "meterline_processor_write_retries") > retries,
               "processor retrying against the dead ClickHouse", stack)
    time.sleep(max(0.0, outage - (time.monotonic() - killed)))  # the fault's length, not a wait for an effect
    assert_worker_alive(stack, "while ClickHouse was down")
    old_url = stack.clickhouse.url
    stack.clickhouse.restart()  # same ports: every running process reconnects to the old URL
    assert stack.clickhouse.url == old_url
    feeder.join_checked(timeout=600)
    counted = caught_up(stack, sender)
    assert_worker_alive(stack, "after the ClickHouse outage")
    row.note = "processor survived, not restarted"
    finish(row, stack, sender, counted, started)


def test_broker_paused(make_stack: MakeStack, make_sender: MakeSender, summary: Summary) -> None:
    produce_timeout = 2.0
    pause_seconds = env_int("METERLINE_FAULT_PAUSE_SECONDS", 15)
    started, row, seed, rng = begin(summary(f"4 broker paused {pause_seconds}s"), 4)
    stack = make_stack(processors=1, extra_env={"METERLINE_PRODUCE_TIMEOUT_SECONDS": str(produce_timeout)})
    stream = fault_stream(seed, fault_events() // 3, rng)
    chunks = batches(stream, rng, 1, 60)
    sender = make_sender(stack.url, retry_delay=0.2)
    refused: list[list[dict[str, Any]]] = []

    def first_pass() -> None:
        # Every batch is tried once, spread over before/during/after the freeze; 503s are kept for later.
        pace = (8 + pause_seconds + 10) / len(chunks)
        for chunk in chunks:
            if sender.post_once(chunk) != 204:
                refused.append(chunk)
            time.sleep(pace)

    feeder = Background(first_pass)
    feeder.start()
    wait_until(lambda: sender.statuses[204] >= 5, "ingest accepting batches before the pause", stack)
    assert stack.broker is not None
    stack.broker.pause()
    paused = time.monotonic()
    paused_at = len(sender.attempts)
    try:
        # The pause has landed once ingest refuses a batch; it then lasts `pause_seconds` in all.
        wait_until(lambda: any(s == 503 for s, _ in sender.attempts[paused_at:]),
                   "ingest answering 503 while the broker is paused", stack)
        time.sleep(max(0.0, pause_seconds - (time.monotonic() - paused)))  # the fault's length
    finally:
        stack.broker.resume()
    during = sender.attempts[paused_at:]
    feeder.join_checked(timeout=600)
    # A real client retries what was refused, with the same ids, after the broker is back.
    for chunk in refused:
        sender.send(chunk)
    assert not sender.unexpected, f"answers other than 204/503: {sender.unexpected[:5]}"
    assert set(sender.statuses) <= {204, 503}, f"statuses {dict(sender.statuses)}"
    assert sender.statuses[503] > 0, f"no 503 while the broker was paused: {dict(sender.statuses)}"
    bound = produce_timeout + 1.0 + 5.0  # message.timeout.ms + the producer's slack + HTTP/scheduling
    slow = [(s, round(t, 1)) for s, t in during if t > bound]
    assert not slow, f"answers slower than {bound}s while paused: {slow[:10]}"
    row.note = f"503 x{sender.statuses[503]}, {len(refused)} batches retried"
    settle(row, stack, sender, started)
    assert_worker_alive(stack, "after the broker pause")
