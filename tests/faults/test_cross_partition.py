"""Scenario 17: retries under another subject on two workers. After a run is fully metered, 20% of the
accepted events are sent again with the same (source, id) but another subject -- a client bug, or a
retry after the partitioning changed -- so most copies land on a partition the other worker owns, mixed
with new events. Dedupe is global per namespace: no copy counts, every window stays exact, and neither
worker meets a key stored twice (`meterline_processor_dedupe_conflicts_total` stays 0).

(Copies decided by the two workers at the same moment both count; README "Cross-partition duplicates".
That race is not staged here: the copies are sent once the originals are written.)
"""

from __future__ import annotations

import pytest

from tests.faults.harness import (
    MakeSender,
    MakeStack,
    Summary,
    begin,
    caught_up,
    fault_events,
    fault_stream,
    settle,
    wait_owners,
    worker_metric,
)

pytestmark = pytest.mark.faults


def test_retries_under_another_subject_on_two_workers(make_stack: MakeStack, make_sender: MakeSender,
                                                      summary: Summary) -> None:
    started, row, seed, rng = begin(summary("17 cross-partition retries, 2 workers"), 17)
    stack = make_stack(processors=2, partitions=4)
    wait_owners(stack, [0, 1], 4)
    n = fault_events() // 4
    sender = make_sender(stack.url)
    sender.send_all(fault_stream(seed, n, rng), rng)
    caught_up(stack, sender)  # every original is written before its copies are sent
    copies = [dict(e, subject=f"{e['subject']}-retried") for e in rng.sample(sender.accepted, len(sender.accepted) // 5)]
    second = copies + fault_stream(seed + 1, n // 4, rng, dup_rate=0.0)
    rng.shuffle(second)
    sender.send_all(second, rng)
    row.note = f"{len(copies)} copies under another subject"
    settle(row, stack, sender, started)
    assert [worker_metric(stack, i, "meterline_processor_dedupe_conflicts") for i in (0, 1)] == [0, 0]
