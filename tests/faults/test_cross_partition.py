"""Scenario 17: retries under another subject on two workers. After a run is fully metered, 20% of the
accepted events are sent again with the same (source, id) but another subject -- a client bug, or a
retry after the partitioning changed -- so most copies land on a partition the other worker owns, mixed
with new events. Dedupe is global per namespace: no copy counts, every window stays exact, and neither
worker meets a key stored twice (`meterline_processor_dedupe_conflicts_total` stays 0).

Scenario 21 makes the race likely: each copy is sent in the same request as its original, so ingest
produces the two as messages of two subjects, mostly on partitions the two workers own, processed at the
same moment. Copies decided before either was written are both stored for a moment; the first-ranked one
stays and its partition's owner retracts the other (README "Cross-partition duplicates"). Which copy
stays is the broker's to decide, so the oracle sums windows over subjects (a copy differs from its
original only in subject): every window must equal the oracle's, and `events` must hold each event once.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.faults.harness import (
    METERS,
    RANGE_FROM,
    RANGE_TO,
    MakeSender,
    MakeStack,
    Summary,
    begin,
    caught_up,
    fault_events,
    fault_stream,
    log_excerpt,
    query,
    settle,
    stored_event_count,
    wait_owners,
    worker_metric,
)
from tests.oracle import expected, first_sightings, response_windows

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


def test_copies_sent_with_their_originals_race_and_count_once(make_stack: MakeStack, make_sender: MakeSender,
                                                               summary: Summary) -> None:
    started, row, seed, rng = begin(summary("21 cross-partition race, 2 workers"), 21)
    stack = make_stack(processors=2, partitions=4)
    wait_owners(stack, [0, 1], 4)
    events = fault_stream(seed, fault_events() // 4, rng, dup_rate=0.0)
    racing = set(rng.sample(range(len(events)), len(events) // 5))
    sent: list[dict[str, Any]] = []
    for i, e in enumerate(events):
        sent.append(e)
        if i in racing:  # right behind its original: almost always the same request
            sent.append(dict(e, subject=f"{e['subject']}-raced"))
    sender = make_sender(stack.url)
    sender.send_chunks([sent[i:i + 200] for i in range(0, len(sent), 200)])
    counted = caught_up(stack, sender)  # totals over subjects: the same whichever copy stays
    mismatches = []
    windows = 0
    for slug, meter in sorted(METERS.items()):
        if meter.aggregation == "LATEST":
            continue  # which of two events of one instant is latest depends on their positions
        group_by = list(meter.group_fields)
        params: dict[str, Any] = {"from": RANGE_FROM.isoformat(), "to": RANGE_TO.isoformat(), "windowSize": "HOUR",
                                  "groupBy": group_by}
        got = response_windows(query(stack, slug, params), group_by)
        want = expected(counted, meter, start=RANGE_FROM, end=RANGE_TO, window="HOUR", group_by=group_by,
                        by_subject=False)
        windows += len(set(got) | set(want))
        mismatches += [f"{slug} {k}: got {got.get(k)} want {want.get(k)}" for k in sorted(set(got) | set(want), key=repr)
                       if got.get(k) != want.get(k)]
    conflicts = sum(worker_metric(stack, i, "meterline_processor_dedupe_conflicts") for i in (0, 1))
    retracted = sum(worker_metric(stack, i, "meterline_processor_dedupe_retracted") for i in (0, 1))
    unrepaired = sum(worker_metric(stack, i, "meterline_processor_dedupe_unrepaired") for i in (0, 1))
    row.sent, row.accepted = sender.sent, len(sender.accepted)
    row.duplicates_dropped = len(sender.accepted) - len(first_sightings(sender.accepted))
    row.windows_checked, row.mismatches = windows, len(mismatches)
    row.seconds = time.monotonic() - started
    row.note = f"{len(racing)} copies sent with their originals; {conflicts:.0f} raced, {retracted:.0f} retracted"
    assert not mismatches, f"{len(mismatches)} of {windows} windows differ:\n" + "\n".join(mismatches[:25]) \
        + f"\n{log_excerpt(stack)}"
    assert stored_event_count(stack) == len(counted)
    assert unrepaired == 0
