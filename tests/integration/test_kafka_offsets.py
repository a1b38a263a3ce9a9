"""`committed_offsets` against the REAL broker: what a group committed is what the processor compares a
new assignment's first offset with (an offset below it is an out-of-range auto-reset)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, Producer, TopicPartition

from meterline.adapters.kafka import committed_offsets, log_start_offsets
from meterline.localinfra.broker import ensure_topic


def test_committed_offsets_are_the_groups_and_leave_out_partitions_without_a_commit(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("offsets"), f"g-{uuid.uuid4().hex}"
    ensure_topic(kafka_bootstrap, topic, 3)
    committed = {0: 7, 2: 3}  # the oracle: what this test commits; partition 1 gets nothing
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in committed.items()], asynchronous=False)
    finally:
        c.close()
    assert committed_offsets(kafka_bootstrap, group, topic, range(3)) == committed
    assert committed_offsets(kafka_bootstrap, f"other-{group}", topic, range(3)) == {}


def test_log_start_offsets_are_the_low_watermarks(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> None:
    """Nothing was deleted from a fresh topic, so every partition's log starts at 0 -- also after messages
    were appended. (The local broker cannot delete records, so a log start above 0 is staged in
    tests/unit/test_batch.py only.)"""
    topic = unique_name("logstart")
    ensure_topic(kafka_bootstrap, topic, 2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(5):
        producer.produce(topic, b"m%d" % i, partition=i % 2)
    assert producer.flush(10) == 0
    assert log_start_offsets(kafka_bootstrap, topic, range(2)) == {0: 0, 1: 0}
