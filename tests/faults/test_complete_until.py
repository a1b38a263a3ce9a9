"""Scenario 13: a query answer's `completeUntil` is a promise: every event acknowledged (204) before that
instant is in that very answer. Events stream in while a worker is killed; after the last 204 an empty
message (`[]`, no events) is appended to every partition, so every partition's log moves past that
instant, and the test polls a query until its `completeUntil` passes the last 204. That answer, and then
every window of every meter, must equal the oracle.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import Producer

from meterline.core.times import parse_time
from meterline.localinfra.ports import wait_for
from meterline.localinfra.stack import LocalStack
from tests.faults.harness import (
    METERS,
    RANGE_FROM,
    RANGE_TO,
    MakeSender,
    MakeStack,
    Summary,
    begin,
    fault_events,
    fault_stream,
    feed_in_background,
    finish,
    liveness_timeout,
    query,
)
from tests.oracle import expected, first_sightings, response_windows

pytestmark = pytest.mark.faults


def append_empty_message_to_every_partition(stack: LocalStack) -> None:
    producer = Producer({"bootstrap.servers": str(stack.kafka_bootstrap), "acks": "all"})
    for p in range(stack.partitions):
        producer.produce(str(stack.topic), b"[]", partition=p)
    assert producer.flush(30) == 0


def test_complete_until_covers_every_acknowledged_event(make_stack: MakeStack, make_sender: MakeSender,
                                                        summary: Summary) -> None:
    started, row, seed, rng = begin(summary("13 completeUntil: the answer holds every event acked before it"), 13)
    stack = make_stack(processors=2, partitions=4)
    stream = fault_stream(seed, fault_events() // 4, rng)
    sender = make_sender(stack.url)
    feeder = feed_in_background(sender, stream, rng, over_seconds=20.0)
    wait_for(lambda: len(sender.accepted) > len(stream) // 3, timeout=120, what="a third of the events acked")
    stack.workers[1].kill()  # its partitions move to worker 0 mid-stream
    feeder.join_checked(timeout=600)
    last_ack = datetime.now(UTC)
    append_empty_message_to_every_partition(stack)
    counted = first_sightings(sender.accepted)
    meter = METERS["tokens_total"]
    group_by = list(meter.group_fields)
    params: dict[str, Any] = {"from": RANGE_FROM.isoformat(), "to": RANGE_TO.isoformat(), "windowSize": "HOUR",
                              "groupBy": ["subject", *group_by]}
    answers: list[dict[str, Any]] = []

    def complete() -> bool:
        answer = query(stack, meter.slug, params)
        if answer.get("completeUntil") is None or parse_time(answer["completeUntil"]) < last_ack:
            return False
        answers.append(answer)
        return True

    wait_for(complete, timeout=liveness_timeout(), interval=0.5, what="completeUntil past the last 204")
    want = expected(counted, meter, start=RANGE_FROM, end=RANGE_TO, window="HOUR", group_by=group_by)
    assert response_windows(answers[0], group_by) == want, "the answer claiming completeness is not complete"
    finish(row, stack, sender, counted, started)
    row.note = f"completeUntil {answers[0]['completeUntil']} >= last 204"
