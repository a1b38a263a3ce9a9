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

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meterline.localinfra import clickhouse_server
from meterline.localinfra.stack import LocalStack
from tests.faults.harness import (
    SPAN,
    START,
    Background,
    ScenarioRow,
    Sender,
    batches,
    compare,
    env_int,
    fault_events,
    fault_seed,
    finish,
    log_excerpt,
    stream_with_retries,
    wait_caught_up,
)
from tests.oracle import EventFactory, first_sightings

pytestmark = pytest.mark.faults


def restart_clickhouse_on_same_ports(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the stack's ClickHouse again on its data dir with its old ports, so every running
    process (configured with the old URL) reconnects to it as it would to a restarted server."""
    ch = stack.clickhouse
    assert ch is not None
    old_url = ch.url
    ports: Iterator[int] = iter([int(ch.http_port or 0), int(ch.tcp_port or 0)])
    real_free_port = clickhouse_server.free_port
    monkeypatch.setattr(clickhouse_server, "free_port", lambda *a: next(ports, None) or real_free_port(*a))
    ch.start()
    monkeypatch.setattr(clickhouse_server, "free_port", real_free_port)
    assert ch.url == old_url, f"ClickHouse came back on {ch.url}, not {old_url}; processes cannot follow"


def test_clickhouse_killed_and_restarted(make_stack: Callable[..., LocalStack], monkeypatch: pytest.MonkeyPatch,
                                         summary: Callable[[str], ScenarioRow]) -> None:
    started = time.monotonic()
    outage = env_int("METERLINE_FAULT_CH_OUTAGE_SECONDS", 20)
    row = summary(f"3 ClickHouse down {outage}s")
    seed = fault_seed() + 3
    rng = random.Random(seed)
    stack = make_stack(processors=1)
    stream = stream_with_retries(EventFactory(seed=seed, start=START, span=SPAN), fault_events() // 3, rng)
    chunks = batches(stream, rng)
    sender = Sender(stack.url)
    pace = max(0.0, min(0.2, 30.0 / len(chunks)))
    feeder = Background(lambda: sender.send_all(chunks, pace=pace))
    feeder.start()
    time.sleep(10)
    assert stack.clickhouse is not None
    stack.clickhouse.kill()
    time.sleep(outage)
    assert stack.workers[0].running, f"processor died while ClickHouse was down:\n{log_excerpt(stack)}"
    restart_clickhouse_on_same_ports(stack, monkeypatch)
    feeder.join_checked(timeout=600)
    counted = first_sightings(sender.accepted)
    wait_caught_up(stack, counted)
    assert stack.workers[0].running, f"processor died after the ClickHouse outage:\n{log_excerpt(stack)}"
    row.note = "processor survived, not restarted"
    finish(row, stack, sender, counted, compare(stack, counted), started)
    sender.close()


def test_broker_paused(make_stack: Callable[..., LocalStack], summary: Callable[[str], ScenarioRow]) -> None:
    started = time.monotonic()
    produce_timeout = 2.0
    pause_seconds = env_int("METERLINE_FAULT_PAUSE_SECONDS", 15)
    row = summary(f"4 broker paused {pause_seconds}s")
    seed = fault_seed() + 4
    rng = random.Random(seed)
    stack = make_stack(processors=1, extra_env={"METERLINE_PRODUCE_TIMEOUT_SECONDS": str(produce_timeout)})
    stream = stream_with_retries(EventFactory(seed=seed, start=START, span=SPAN), fault_events() // 3, rng)
    chunks = batches(stream, rng, 1, 60)
    sender = Sender(stack.url, retry_delay=0.2)
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
    time.sleep(8)
    assert stack.broker is not None
    stack.broker.pause()
    paused_at = len(sender.attempts)
    try:
        time.sleep(pause_seconds)
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
    counted = first_sightings(sender.accepted)
    wait_caught_up(stack, counted)
    row.note = f"503 x{sender.statuses[503]}, {len(refused)} batches retried"
    finish(row, stack, sender, counted, compare(stack, counted), started)
    assert stack.workers[0].running, f"processor died after the broker pause:\n{log_excerpt(stack)}"
    sender.close()
