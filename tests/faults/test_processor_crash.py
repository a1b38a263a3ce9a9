"""kill -9 of processor workers while tens of thousands of events (with retried duplicates) stream in.

Scenario 1: one worker, killed at random moments (startup, partition load, mid-batch, mid-write) at
least METERLINE_FAULT_KILLS times and restarted on its own state dir.
Scenario 2: two workers; one is killed (its partitions move to the other), later restarted while the
other is killed, so partitions move back onto a worker whose local cache is stale.
Both end with every HOUR window of every meter equal to the oracle.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import (
    MakeSender,
    MakeStack,
    Summary,
    begin,
    env_int,
    fault_events,
    fault_stream,
    feed_in_background,
    settle,
    wait_owners,
    wait_until,
    worker_metric,
)

pytestmark = pytest.mark.faults


def test_kill_9_processor_repeatedly(make_stack: MakeStack, make_sender: MakeSender,
                                     summary: Summary) -> None:
    kills = env_int("METERLINE_FAULT_KILLS", 10)
    started, row, seed, rng = begin(summary(f"1 kill -9 processor x{kills}"))
    stack = make_stack(processors=1)
    stream = fault_stream(seed, fault_events(), rng)
    sender = make_sender(stack.url)
    feeder = feed_in_background(sender, stream, rng, over_seconds=45.0)  # the kill period
    done = 0
    while done < kills:
        time.sleep(rng.uniform(0.5, 6.0))  # sometimes during startup/partition load, sometimes mid-batch
        stack.workers[0].kill()
        done += 1
        time.sleep(rng.uniform(0.0, 1.0))
        stack.restart_processor(0)
    feeder.join_checked(timeout=600)
    row.note = f"{done} kills"
    settle(row, stack, sender, started)


def test_two_workers_one_killed(make_stack: MakeStack, make_sender: MakeSender, summary: Summary) -> None:
    started, row, seed, rng = begin(summary("2 two workers, kill one"), 2)
    stack = make_stack(processors=2, partitions=4)
    stream = fault_stream(seed, fault_events() // 2, rng)
    sender = make_sender(stack.url)
    feeder = feed_in_background(sender, stream, rng, over_seconds=40.0)
    # Each fault waits until the previous one has visibly landed: the group's assignment moved.
    wait_owners(stack, [0, 1], 4)
    wait_until(lambda: worker_metric(stack, 1, "meterline_processor_batches") > 0, "worker 1 writing", stack)
    stack.workers[1].kill()  # its partitions move to worker 0
    wait_owners(stack, [0], 4)
    stack.restart_processor(1)  # a rebalance hands some back to worker 1 (stale local cache)
    wait_owners(stack, [0, 1], 4)
    stack.workers[0].kill()  # worker 1 takes everything, including what worker 0 wrote meanwhile
    wait_owners(stack, [1], 4)
    feeder.join_checked(timeout=600)
    row.note = "kill w1, restart w1, kill w0"
    settle(row, stack, sender, started)
    assert stack.workers[1].running
