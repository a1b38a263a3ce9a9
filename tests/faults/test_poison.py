"""Messages written straight onto the topic, bypassing ingest (anyone with topic access can):

Scenario 9: an event with `time: 9999-12-31T23:59:59Z`, then 50 valid events of its subject through the
API. Before the processor validated storage rules, the batch was retried for ever and the partition
stalled: none of the 50 was counted. Now the poison is an `invalid_event` dead letter and all 50 count.

Scenario 10: two events whose (source, id) differ only around a NUL (`("a\\0b", "c")` and `("a", "b\\0c")`),
which shared a dedupe key when the key hashed `source NUL id`: both must count.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from meterline.localinfra.ports import wait_for
from meterline.localinfra.stack import LocalStack
from tests.faults.harness import (
    MakeSender,
    MakeStack,
    Summary,
    begin,
    caught_up,
    dead_letter_count,
    fault_factory,
    finish,
    worker_metric,
)
from tests.oracle import EventFactory

pytestmark = pytest.mark.faults


def produce_raw(stack: LocalStack, messages: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Produce messages in ingest's wire format, as a foreign producer would, and wait for the acks."""
    producer = Producer({"bootstrap.servers": str(stack.kafka_bootstrap)})
    for subject, events in messages:
        producer.produce(str(stack.topic), orjson.dumps(events), key=subject.encode())
    assert producer.flush(30) == 0


def prompt(factory: EventFactory, subject: str, **over: Any) -> dict[str, Any]:
    """A valid event of the prompt meters (the progress meter prompt_count counts it)."""
    while True:
        event = factory.event()
        if event["type"] == "prompt" and isinstance(event["data"]["tokens"], int):
            return {**event, "subject": subject, **over}


def test_poison_time_does_not_stall_its_partition(make_stack: MakeStack, make_sender: MakeSender,
                                                  summary: Summary) -> None:
    started, row, seed, _ = begin(summary("9 poison message (time 9999) on the topic"), 9)
    factory = fault_factory(seed)
    stack = make_stack(processors=1)
    subject = "customer-1"
    produce_raw(stack, [(subject, [prompt(factory, subject, id="poison", time="9999-12-31T23:59:59Z")])])
    sender = make_sender(stack.url)
    valid = [prompt(factory, subject) for _ in range(50)]
    sender.send_all(valid, random.Random(seed), 1, 10)
    counted = caught_up(stack, sender, stable_seconds=30)
    assert len(counted) == 50
    finish(row, stack, sender, counted, started)
    assert dead_letter_count(stack, "invalid_event") == 1
    # Completeness gauges (processor/progress.py): the partition moved past the poison and is caught up.
    assert worker_metric(stack, 0, "meterline_processor_processed_offset") >= 2
    wait_for(lambda: worker_metric(stack, 0, "meterline_processor_oldest_unprocessed_age_seconds") == 0,
             timeout=60, what="oldest unprocessed age back to 0")
    row.note = "poison dead-lettered as invalid_event"


def test_nul_separated_pairs_are_distinct_events(make_stack: MakeStack, make_sender: MakeSender,
                                                 summary: Summary) -> None:
    started, row, seed, _ = begin(summary("10 (a\\0b, c) vs (a, b\\0c) on the topic"), 10)
    factory = fault_factory(seed)
    stack = make_stack(processors=1)
    subject = "customer-2"
    pair = [prompt(factory, subject, source="a\u0000b", id="c"), prompt(factory, subject, source="a", id="b\u0000c")]
    produce_raw(stack, [(subject, pair[:1]), (subject, pair[1:])])
    sender = make_sender(stack.url)
    sender.send_all([prompt(factory, subject) for _ in range(20)], random.Random(seed), 1, 10)
    refused = sender.post_once([prompt(factory, subject, source="a\u0000b", id="d")])
    assert refused == 400  # ingest refuses control characters; only the topic can carry them
    sender.unexpected.clear()
    finish(row, stack, sender, caught_up(stack, sender, extra=pair, stable_seconds=30), started)
    row.note = "both counted; ingest answers 400 for NUL"
