"""A rebalance while a worker is still loading its dedupe state, with resends of earlier events.

Scenario 15: `dedupe_keys` holds a long history (5M keys within the dedupe horizon, written straight
into ClickHouse so the test need not send them: keys of no event sent; only there, since a load reads
nothing else), so loading an owned partition's keys takes seconds. (1.6M keys were enough while a load
wrote key by key; loaded as SST files they took ~3 s in all on a quiet machine, over before worker 0's
leave reached worker 1, and the test failed its own check that a rebalance landed inside a load.) Events are sent through worker 0 and drained. Then a fresh worker 1 (empty cache: a
new machine) joins and must load every partition's keys before deciding anything, while events keep
coming: new ones, their retries, and resends of the drained ones. While worker 1 is loading, worker 0
leaves the group (stopped): its partitions move to worker 1 in the middle of the load. Then worker 0
joins again and takes partitions worker 1 had loaded, stores first sightings there that worker 1 never
sees (it has no batch meanwhile), and leaves: those partitions come back to worker 1, whose "loaded"
mark from before must not stand (the issue's rebalance race: a stale mark skips the reload and a resend
counts twice). A last round resends events of every phase. Every window must match the oracle; worker
1's log must show a rebalance landing inside one of its loads and the reload of the returned partitions
finding worker 0's keys.

Measured: with `DedupeState.forget_partitions` disabled (a stale mark), the returned partitions are not
reloaded and their resends count twice (340 of 1907 windows differ); the leave during the load alone does not catch that, because
Faust delivers the revoke only after the in-flight batch -- the load included -- finished
(`stream_wait_empty`).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from meterline.adapters.clickhouse import connect
from meterline.localinfra.stack import LocalStack
from tests.faults.harness import (
    SPAN,
    START,
    Background,
    MakeSender,
    MakeStack,
    Sender,
    Summary,
    assigned,
    batches,
    begin,
    caught_up,
    env_int,
    expected_totals,
    fault_events,
    finish,
    stream_with_retries,
    totals,
    wait_owners,
    wait_until,
)
from tests.oracle import EventFactory, first_sightings

pytestmark = pytest.mark.faults

#: What aiokafka logs on a worker when a rebalance reaches it (before the revoke callback runs).
REVOKING = "Revoking previously assigned partitions"


def store_history(stack: LocalStack, keys: int, partitions: int) -> None:
    """`keys` stored first sightings of an older log epoch, seen now (inside the horizon), spread over every
    partition: `dedupe_keys` rows as the sink writes them (the keys match no event of the test)."""
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    try:
        client.command(
            "INSERT INTO dedupe_keys (dedupe_key, log_epoch, kafka_partition, kafka_offset, batch_index, seen_at) "
            f"SELECT MD5(toString(number)), 'history-epoch', number % {partitions}, intDiv(number, {partitions}), "
            f"0, now64(3) FROM numbers({keys})")
    finally:
        client.close()


def last_assignment(path: Path) -> list[int]:
    """The partitions of the last assignment a worker logged."""
    found = [r for r in log_lines(path, 0) if r.get("event") == "assigned"]
    return [int(p) for p in found[-1]["partitions"]] if found else []  # type: ignore[attr-defined]


def subjects_on(stack: LocalStack, partitions: set[int]) -> set[str]:
    """The subjects whose events the ingest partitioner put on `partitions` (as stored)."""
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    try:
        rows = client.query("SELECT DISTINCT subject, kafka_partition FROM events WHERE source != 'history'").result_rows
    finally:
        client.close()
    return {str(subject) for subject, partition in rows if int(partition) in partitions}


def log_lines(path: Path, start: int) -> list[dict[str, object]]:
    """The JSON log records of `path` from byte `start` on (librdkafka's plain lines skipped)."""
    out = []
    with path.open("rb") as f:
        f.seek(start)
        for line in f.read().decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def when(record: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(record["timestamp"]))


def drained(stack: LocalStack, sender: Sender) -> None:
    """Wait until every accepted event is counted (the phases' drains; the end uses `caught_up`)."""
    want = expected_totals(first_sightings(sender.accepted))
    wait_until(lambda: totals(stack) == want, "every accepted event counted", stack)


def test_rebalance_during_dedupe_reload(make_stack: MakeStack, make_sender: MakeSender,
                                        summary: Summary) -> None:
    history = env_int("METERLINE_FAULT_HISTORY_KEYS", 5_000_000)
    started, row, seed, rng = begin(summary("15 rebalance during dedupe reload, resends"), 15)
    stack = make_stack(processors=1, partitions=4)
    # Enough subjects that every partition has traffic (the returned partitions need some).
    factory = EventFactory(seed=seed, start=START, span=SPAN, subjects=[f"customer-{i}" for i in range(1, 25)])
    n = fault_events() // 20
    first = stream_with_retries(factory, n, rng)
    sender = make_sender(stack.url)
    sender.send_all(first, rng)
    drained(stack, sender)
    store_history(stack, history, stack.partitions)  # after worker 0's first loads: only a fresh worker reads it

    # A fresh worker 1 loads every partition's keys while events keep coming; worker 0 leaves mid-load.
    second = stream_with_retries(factory, n // 2, rng)
    for old in rng.sample(first, n // 5):
        second.insert(rng.randrange(len(second) + 1), dict(old))
    chunks = batches(second, rng, 1, 30)  # small batches over ~20 s: messages whenever worker 1 joins
    feeder = Background(lambda: sender.send_chunks(chunks, pace=20.0 / len(chunks)))
    feeder.start()
    stack.add_processor(1)
    log = Path(stack.data_dir, "logs", "processor-1.log")
    wait_until(lambda: assigned(stack, 1) > 0, "the fresh worker 1 joining", stack)
    stack.workers[0].stop()  # leaves the group while worker 1 loads: its partitions move mid-load
    wait_owners(stack, [1], 4)
    feeder.join_checked(timeout=300)
    drained(stack, sender)

    # Worker 0 joins again and stores first sightings on partitions worker 1 had loaded, then leaves.
    log_mark = log.stat().st_size
    stack.add_processor(0)
    wait_owners(stack, [0, 1], 4)
    moved = set(last_assignment(Path(stack.data_dir, "logs", "processor-0.log")))
    on_moved = subjects_on(stack, moved)
    third = [e for e in (factory.event() for _ in range(n)) if e["subject"] in on_moved][: n // 4]
    sender.send_all(third, rng)
    drained(stack, sender)
    stack.workers[0].stop()
    wait_owners(stack, [1], 4)
    # The last round: resends of every phase, worker 0's last first sightings among them.
    sender.send_all([dict(e) for e in third + rng.sample(first + second, n // 5)], rng)
    counted = caught_up(stack, sender)

    records = log_lines(log, 0)
    # Its loads of stored keys, each timed: its own partitions', and the first merge of the others' (a
    # fresh worker's first batch merges every partition's history before deciding anything).
    loads = [(when(r) - timedelta(seconds=float(str(r["seconds"]))), when(r)) for r in records
             if r.get("event") in ("dedupe state loaded", "foreign dedupe keys merged")]
    rebalances = [when(r) for r in records if str(r.get("event", "")).startswith(REVOKING)]
    during = [t for t in rebalances if any(a <= t <= b for a, b in loads)]
    loaded = sum(int(str(r["keys"])) for r in records if r.get("event") == "dedupe state loaded")
    # The returned partitions were reloaded from worker 1's marker, and the reload found worker 0's keys.
    reloaded = sum(int(str(r["keys"])) for r in log_lines(log, log_mark)
                   if r.get("event") == "dedupe state loaded" and r.get("partition") in moved and r.get("since"))
    longest = max((b - a for a, b in loads), default=timedelta(0)).total_seconds()
    row.note = (f"{history // 1000}k stored keys; {len(during)} rebalance(s) inside worker 1's loads "
                f"(longest {longest:.1f}s); partitions {sorted(moved)} back from worker 0 with "
                f"{reloaded} keys reloaded")
    finish(row, stack, sender, counted, started)
    # Not vacuous: the rebalance hit a load, and the partitions that came back were really reloaded.
    assert loaded >= history, f"worker 1 loaded only {loaded} keys"
    assert during, (f"no rebalance landed inside a dedupe load of worker 1: loads {loads}, "
                    f"rebalances {rebalances}")
    assert third and reloaded >= len(first_sightings(third)), (
        f"worker 1 reloaded {reloaded} keys of partitions {sorted(moved)} back from worker 0, "
        f"which stored {len(first_sightings(third))}")
