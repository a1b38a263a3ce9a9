"""The broker re-created under a running pipeline: a new log epoch, offsets from 0 again.

Scenario 14: events are sent and drained (every one written, offsets committed), then the local broker
is stopped and started fresh on the same port (tansu, memory storage: a new cluster id and topic id,
no topics, no committed offsets, every partition's log from offset 0 again) while ingest and the worker
keep running. Events are sent on: new ones, client retries of them, and retries of events sent before
the restart (their keys are stored under the old epoch). The worker must notice the new epoch
(docs/design.md, "Exactly-once effect" 1: checked on assignment and every 5 s), stop instead of writing
the new log's positions under the old epoch (they would collide with the old log's rows), and, started
again (what `meterline run`'s supervisor does), read the new log from offset 0 -- its old positions and
commits are higher than the new log's ends, so keeping them would skip it. Every window must match the
oracle: each event counts once, across both epochs.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from meterline.adapters.kafka import committed_offsets
from meterline.localinfra.broker import ensure_topic
from meterline.localinfra.stack import LocalStack
from tests.faults.harness import (
    MakeSender,
    MakeStack,
    Summary,
    begin,
    caught_up,
    clickhouse_scalar,
    expected_totals,
    fault_events,
    fault_factory,
    feed_in_background,
    finish,
    stream_with_retries,
    totals,
    wait_until,
)

pytestmark = pytest.mark.faults

#: What the worker logs when it stops on a changed epoch (processor/agents.py, check_epoch).
RESTARTED_LOG = "the topic's log restarted"


def worker_epoch(stack: LocalStack, index: int = 0) -> str:
    """The log epoch worker `index` writes positions under (its /readyz)."""
    return str(httpx.get(stack.processor_url(index) + "/readyz", timeout=5).json()["log_epoch"])


def end_offsets(stack: LocalStack) -> dict[int, int]:
    """Each partition's end offset on the broker (tansu's can trail what it handed out by a message or two)."""
    consumer = Consumer({"bootstrap.servers": str(stack.kafka_bootstrap), "group.id": "epoch-test-reader"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(str(stack.topic), p), timeout=10)[1]
                for p in range(stack.partitions)}
    finally:
        consumer.close()


def test_broker_recreated_with_a_new_epoch(make_stack: MakeStack, make_sender: MakeSender,
                                           summary: Summary) -> None:
    started, row, seed, rng = begin(summary("14 broker re-created: new epoch, offsets from 0"), 14)
    stack = make_stack(processors=1)
    assert stack.broker is not None
    factory = fault_factory(seed)
    n = fault_events() // 8
    before = stream_with_retries(factory, n, rng)
    sender = make_sender(stack.url)
    sender.send_all(before, rng)
    # The drain: every accepted event written and its offset committed, before the broker goes.
    counted = caught_up(stack, sender, stable_seconds=30)
    assert totals(stack) == expected_totals(counted), "the first half was not drained before the restart"
    old_epoch = worker_epoch(stack)
    # (tansu's end offsets can trail what it handed out, so "at or past the end" is the drained state)
    wait_until(lambda: all(c.get(p, 0) >= end for c in [committed_offsets(
        str(stack.kafka_bootstrap), stack.consumer_group, str(stack.topic), range(stack.partitions))]
        for p, end in end_offsets(stack).items()), "the group committing every offset of the old log", stack)
    old_commits = committed_offsets(str(stack.kafka_bootstrap), stack.consumer_group, str(stack.topic),
                                    range(stack.partitions))

    bootstrap = stack.broker.bootstrap
    stack.broker.stop()
    stack.broker.restart()  # same port: ingest and the worker reconnect to an empty broker
    assert stack.broker.bootstrap == bootstrap
    ensure_topic(bootstrap, str(stack.topic), stack.partitions)  # as an operator re-creating it would

    # After: fewer new events than before (so the old commits lie past the new log's ends), their
    # retries, and retries of a tenth of the events sent before the restart.
    after = stream_with_retries(factory, n // 3, rng)
    for old in rng.sample(before, n // 10):
        after.insert(rng.randrange(len(after) + 1), dict(old))
    feeder = feed_in_background(sender, after, rng, over_seconds=8.0)
    log = Path(stack.data_dir, "logs", "processor-0.log")
    wait_until(lambda: RESTARTED_LOG in log.read_text(errors="replace"), "the worker noticing the new epoch",
               stack, timeout=60)
    wait_until(lambda: not stack.workers[0].is_alive(), "the worker stopping on the new epoch", stack, timeout=60)
    stack.restart_processor(0)  # what the supervisor of `meterline run` does
    feeder.join_checked(timeout=300)
    counted = caught_up(stack, sender)

    new_epoch = worker_epoch(stack)
    assert new_epoch != old_epoch and new_epoch.split("/")[0] == stack.broker.cluster_id
    new_ends = end_offsets(stack)
    # Non-vacuous: the old log's commits lie past the new log's ends, so reading on from them would skip it.
    assert old_commits and all(old_commits[p] > new_ends[p] for p in old_commits), (old_commits, new_ends)
    stored = dict(clickhouse_scalar(
        stack, "SELECT groupArray((log_epoch, n)) FROM (SELECT log_epoch, count() AS n FROM events FINAL "
               "GROUP BY log_epoch)"))
    assert set(stored) == {old_epoch, new_epoch}, stored
    new_from = int(clickhouse_scalar(
        stack, f"SELECT min(kafka_offset) FROM dedupe_keys FINAL WHERE log_epoch = '{new_epoch}'"))
    row.note = (f"epoch changed, worker stopped and restarted; new log read from offset {new_from} "
                f"(old commits {sum(old_commits.values())}, new ends {sum(new_ends.values())}); "
                f"events stored per epoch {sorted(stored.values())}")
    finish(row, stack, sender, counted, started)
