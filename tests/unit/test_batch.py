"""The processor's batch logic (processor/batch.py) on an in-memory sink: dedupe, ack order, crashes.

The real RocksDB dedupe cache runs in a temp dir; storage and the Faust stream are fakes
(tests/fakes.py). The oracle is computed here from the generated log: each (source, id) counts once,
at its first occurrence in log order, whatever crashes, replays, lost caches and rebalances happen.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from meterline.core.errors import StorageError
from meterline.core.meters import Aggregation, Meter, MeterSet
from meterline.core.schema import EVENT_COLUMNS
from meterline.settings import Settings
from processor import metrics
from processor.batch import BatchProcessor, OffsetResetError, RetentionLossError
from processor.dedupe import DedupeState
from tests.fakes import Acks, FakeMessage, FakeSink, FakeStreamEvent

EPOCH = "cluster-1"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
METERS = MeterSet([
    Meter(slug="tokens", event_type="prompt", aggregation=Aggregation.SUM, value_property="$.tokens"),
    Meter(slug="prompts", event_type="prompt", aggregation=Aggregation.COUNT),
])


def settings(tmp_path: Path) -> Settings:
    return Settings(config_file=str(tmp_path / "absent.yaml"), dedupe_horizon_days=32, late_horizon_days=None,
                    window_size_seconds=60, strict_event_types=False)


def event(n: int, subject: str, tokens: int, minute: int) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"id-{n}", "source": "src", "type": "prompt", "subject": subject,
            "time": (T0 + timedelta(minutes=minute, seconds=n % 60)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "data": {"tokens": tokens}}


class Worker:
    """One processor process: a BatchProcessor on a (possibly surviving) RocksDB cache dir."""

    def __init__(self, tmp_path: Path, sink: FakeSink, state_dir: Path, owns: Iterable[int] = range(8)) -> None:
        config = settings(tmp_path)
        self.state = DedupeState(str(state_dir), 32, max_lag_seconds=config.topic_retention_hours * 3600)  # as app.py
        self.processor = BatchProcessor(config, METERS, self.state, sink, EPOCH)
        self.processor.assigned(owns)  # every partition of the topic unless a test splits them

    def stop(self) -> None:
        self.state.close()


def stream_events(messages: list[tuple[int, int, bytes]], generation: int = 1) -> list[FakeStreamEvent]:
    now = time.time()
    return [FakeStreamEvent(v, FakeMessage(p, o, now, generation)) for p, o, v in messages]


def oracle(log: dict[int, list[list[dict[str, Any]]]]) -> tuple[set[str], Counter[tuple[str, str, datetime]]]:
    """First occurrence of each id per partition order, and per (meter, subject, minute) the windows."""
    first: set[str] = set()
    windows: Counter[tuple[str, str, datetime]] = Counter()
    for msgs in log.values():
        for msg in msgs:
            for e in msg:
                if e["id"] in first:
                    continue
                first.add(e["id"])
                minute = datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC, second=0,
                                                                                        microsecond=0)
                windows[("tokens", e["subject"], minute)] += e["data"]["tokens"]
                windows[("prompts", e["subject"], minute)] += 1
    return first, windows


def stored_windows(sink: FakeSink) -> Counter[tuple[str, str, datetime]]:
    out: Counter[tuple[str, str, datetime]] = Counter()
    for row in sink.windows.values():
        meter, subject, start = row[0], row[1], row[2]
        out[(meter, subject, start)] += row[8] if meter == "prompts" else row[9]
    return {k: Decimal(v) for k, v in out.items()}  # type: ignore[return-value]


def make_log(rnd: random.Random, partitions: int, messages: int) -> dict[int, list[list[dict[str, Any]]]]:
    """Each partition holds one subject's messages; ~30% of events resend an earlier id of that subject."""
    log: dict[int, list[list[dict[str, Any]]]] = {}
    n = 0
    for p in range(partitions):
        sent: list[dict[str, Any]] = []
        msgs = []
        for _ in range(messages):
            msg = []
            for _ in range(rnd.randint(1, 6)):
                if sent and rnd.random() < 0.3:
                    msg.append(rnd.choice(sent))
                else:
                    n += 1
                    e = event(n, f"subject-{p}", rnd.randint(0, 10**6), rnd.randint(0, 5))
                    sent.append(e)
                    msg.append(e)
            msgs.append(msg)
        log[p] = msgs
    return log


class Crash(Exception):
    """The process died between two acks."""


@pytest.mark.parametrize("seed", range(6))
async def test_rows_match_first_occurrences_through_crashes_and_rebalances(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    log = make_log(rnd, partitions=3, messages=25)
    encoded = {p: [orjson.dumps(m) for m in msgs] for p, msgs in log.items()}
    sink = FakeSink()
    committed = dict.fromkeys(log, 0)  # Kafka's committed offset per partition
    dirs = 0
    worker = Worker(tmp_path, sink, tmp_path / f"state-{dirs}")
    generation = 1
    for _ in range(10_000):
        pending = [p for p in log if committed[p] < len(log[p])]
        if not pending:
            break
        batch = []
        for p in rnd.sample(pending, rnd.randint(1, len(pending))):
            start = committed[p]
            batch += [(p, o, encoded[p][o]) for o in range(start, min(start + rnd.randint(1, 4), len(log[p])))]
        events = stream_events(batch, generation)
        fault = rnd.random()
        if fault < 0.1:  # a rebalance happened after the fetch: the whole buffer is stale
            generation += 1
            worker.processor.state.forget_partitions(log)
        elif fault < 0.2:
            sink.fail_writes = 1
        crash_after = rnd.randrange(len(events)) if 0.2 <= fault < 0.3 else None
        acks = Acks([])

        async def ack(e: Any, acks: Acks = acks, crash_after: int | None = crash_after) -> None:
            if crash_after is not None and len(acks.acked) == crash_after:
                raise Crash
            await acks(e)

        try:
            await worker.processor.handle(events, generation, ack)
        except (StorageError, Crash):
            worker.stop()  # the worker dies; its successor keeps the cache dir or (sometimes) starts empty
            if rnd.random() < 0.5:
                dirs += 1
            worker = Worker(tmp_path, sink, tmp_path / f"state-{dirs}")
        for p, o in acks.acked:  # acks arrive in offset order, so each one extends the committed run
            assert o == committed[p]
            committed[p] = o + 1
    else:
        pytest.fail("the log was never consumed")
    worker.stop()

    first, windows = oracle(log)
    assert {row[1] for row in sink.events.values()} == first
    assert stored_windows(sink) == windows


async def test_acks_follow_the_write_in_offset_order(tmp_path: Path) -> None:
    journal: list[str] = []
    sink = FakeSink(journal)
    worker = Worker(tmp_path, sink, tmp_path / "state")
    msgs = [(0, 5, orjson.dumps([event(1, "a", 3, 0)])), (1, 2, orjson.dumps([event(2, "b", 4, 0)])),
            (0, 6, orjson.dumps([event(3, "a", 5, 0)]))]
    await worker.processor.handle(stream_events(msgs), 1, Acks(journal))
    assert journal == ["load partition 0", "load partition 1", "write 3 events", "ack 0:5", "ack 1:2", "ack 0:6"]
    assert worker.state.marker(0) == (worker.state.epoch_no(EPOCH), 7)
    assert worker.state.marker(1) == (worker.state.epoch_no(EPOCH), 3)
    worker.stop()


async def test_failed_write_acks_nothing_and_keeps_markers(tmp_path: Path) -> None:
    journal: list[str] = []
    sink = FakeSink(journal)
    worker = Worker(tmp_path, sink, tmp_path / "state")
    await worker.processor.handle(stream_events([(0, 0, orjson.dumps([event(1, "a", 3, 0)]))]), 1, Acks(journal))
    before = worker.state.marker(0)
    sink.fail_writes = 1
    acks = Acks(journal)
    with pytest.raises(StorageError):
        await worker.processor.handle(stream_events([(0, 1, orjson.dumps([event(2, "a", 4, 0)]))]), 1, acks)
    assert acks.acked == [] and journal[-1] == "write failed" and sink.failing
    assert worker.state.marker(0) == before
    # The replay of the unacked message is accepted again (same position) and then acked.
    rows = await worker.processor.handle(stream_events([(0, 1, orjson.dumps([event(2, "a", 4, 0)]))]), 1, acks)
    assert rows is not None and (rows.accepted, rows.duplicates) == (1, 0)
    assert acks.acked == [(0, 1)] and not sink.failing
    worker.stop()


async def test_stale_generation_is_neither_processed_nor_acked(tmp_path: Path) -> None:
    journal: list[str] = []
    sink = FakeSink(journal)
    worker = Worker(tmp_path, sink, tmp_path / "state")
    stale_before = metrics.STALE._value.get()
    old = stream_events([(0, 0, orjson.dumps([event(1, "a", 3, 0)]))], generation=4)
    live = stream_events([(1, 0, orjson.dumps([event(2, "b", 4, 0)]))], generation=5)
    acks = Acks(journal)
    assert await worker.processor.handle(old, 5, acks) is None
    assert journal == [] and sink.writes == 0
    rows = await worker.processor.handle([*old, *live], 5, acks)
    assert rows is not None and rows.accepted == 1
    assert acks.acked == [(1, 0)] and [row[1] for row in sink.events.values()] == ["id-2"]
    assert metrics.STALE._value.get() - stale_before == 2
    worker.stop()


async def test_duplicates_are_decided_in_log_order(tmp_path: Path) -> None:
    sink = FakeSink()
    worker = Worker(tmp_path, sink, tmp_path / "state")
    e1, e2 = event(1, "a", 10, 0), event(2, "a", 20, 0)
    msgs = [(0, 0, orjson.dumps([e1, e1, e2])), (0, 1, orjson.dumps([e2, event(3, "a", 30, 0)]))]
    rows = await worker.processor.handle(stream_events(msgs), 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (3, 2)
    positions = {row[1]: (row[10], row[11]) for row in sink.events.values()}
    assert positions == {"id-1": (0, 0), "id-2": (0, 2), "id-3": (1, 1)}
    assert sum(row[9] for row in sink.windows.values() if row[0] == "tokens") == 60
    worker.stop()


async def test_a_copy_on_another_workers_partition_is_a_duplicate_whoever_writes_first(tmp_path: Path) -> None:
    """Dedupe is global per namespace: a copy of an event on a partition another worker owns (a retry
    under another subject, a partition-count change, a message produced onto any partition) is dropped,
    whichever worker stored its key first; replays, also by a worker with a lost cache, decide the same."""
    sink = FakeSink()
    one = Worker(tmp_path, sink, tmp_path / "one", owns={0, 1, 2, 3})
    two = Worker(tmp_path, sink, tmp_path / "two", owns={4, 5, 6, 7})
    original = [event(1, "a", 10, 0), event(2, "a", 20, 0), event(3, "a", 30, 0)]
    retry = [dict(e, subject="b") for e in original[:2]] + [event(4, "b", 40, 0)]
    first = stream_events([(0, 0, orjson.dumps(original))])
    copies = stream_events([(5, 0, orjson.dumps(retry))])
    rows = await one.processor.handle(first, 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (3, 0)
    rows = await two.processor.handle(copies, 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (1, 2)
    # Later copies on a third partition (the first worker's): dropped too; then every replay agrees.
    third = stream_events([(2, 0, orjson.dumps([dict(retry[2], subject="c"), dict(original[2], subject="c")]))])
    rows = await one.processor.handle(third, 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (0, 2)
    for worker, batch, decided in ((two, copies, (1, 2)), (one, first, (3, 0)), (one, third, (0, 2))):
        worker.processor.assigned(worker.processor.owned)  # a replay comes with a new assignment
        rows = await worker.processor.handle(batch, 1, Acks([]))
        assert rows is not None and (rows.accepted, rows.duplicates) == decided
    one.stop()
    two.stop()
    fresh = Worker(tmp_path, sink, tmp_path / "fresh", owns={4, 5, 6, 7})  # the second worker's cache lost
    rows = await fresh.processor.handle(copies, 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (1, 2)
    # Its first merge of the other worker's partitions read each whole, sorted into SST files: the cache
    # holds exactly the stored first sightings of partitions 0-3, and each foreign marker follows them.
    col = {c: i for i, c in enumerate(EVENT_COLUMNS)}
    stored = [r for r in sink.events.values() if r[col["kafka_partition"]] < 4]
    assert stored and all(fresh.state.lookup(r[col["dedupe_key"]]) == (
        r[col["log_epoch"]], r[col["kafka_partition"]], r[col["kafka_offset"]], r[col["batch_index"]]) for r in stored)
    no = fresh.state.epoch_no(EPOCH)
    assert {p: fresh.state.foreign_marker(p) for p in range(4)} == {p: (no, 1) if any(
        r[col["kafka_partition"]] == p for r in stored) else (no, 0) for p in range(4)}
    fresh.stop()
    assert sorted(row[1] for row in sink.events.values()) == ["id-1", "id-2", "id-3", "id-4"]
    assert stored_windows(sink) == {("tokens", "a", T0): 60, ("prompts", "a", T0): 3,
                                    ("tokens", "b", T0): 40, ("prompts", "b", T0): 1}


async def test_only_losers_on_owned_partitions_are_retracted_and_each_is_forgotten_once_done(
        tmp_path: Path) -> None:
    """The sink retracts the pending losers of the partitions this worker owns between batches
    (`reconcile`, a timer); the others' stay noted for their owners."""
    sink = FakeSink()
    worker = Worker(tmp_path, sink, tmp_path / "w", owns={0})
    now = int(time.time())
    key, other = b"k" * 16, b"o" * 16
    worker.state.load_rows(EPOCH, 0, [(key, EPOCH, 0, 4, 0, now + 1)])          # this worker's copy ...
    worker.state.load_rows(EPOCH, 3, [(key, EPOCH, 3, 2, 0, now),                # ... loses to partition 3's
                                      (other, EPOCH, 3, 5, 0, now + 1)], owned=False)
    worker.state.load_rows(EPOCH, 2, [(other, EPOCH, 2, 1, 0, now)], owned=False)  # 3's copy loses to 2's
    assert {x.loser.partition for x in worker.state.pending_retractions()} == {0, 3}
    await worker.processor.reconcile()
    assert "retract 1" in sink.journal
    assert [x.loser.partition for x in worker.state.pending_retractions()] == [3]
    await worker.processor.reconcile()
    assert sink.journal.count("retract 1") == 1  # nothing left to do on partition 0
    worker.stop()


async def test_a_lagging_worker_judges_the_dedupe_horizon_on_broker_time(tmp_path: Path) -> None:
    """The original was appended 33 days ago, its retry 31.9 days after it; the worker processing the
    retry lags 1.1 days and has just taken the partition over (empty cache): it must still load the
    original's key (kept for the horizon plus the maximum lag) and drop the retry. A copy appended 33
    days after the original is a new event (the horizon is judged on broker time, not processing time)."""
    sink = FakeSink()
    now = time.time()
    original = now - 33 * 86_400
    e = event(1, "a", 5, 0)

    def at(offset: int, broker_time: float, payload: bytes) -> list[FakeStreamEvent]:
        return [FakeStreamEvent(payload, FakeMessage(0, offset, broker_time, 1))]

    first = Worker(tmp_path, sink, tmp_path / "first")
    rows = await first.processor.handle(at(0, original, orjson.dumps([e])), 1, Acks([]))
    assert rows is not None and rows.accepted == 1
    first.stop()
    takeover = Worker(tmp_path, sink, tmp_path / "takeover")
    rows = await takeover.processor.handle(at(1, original + 31.9 * 86_400, orjson.dumps([e])), 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (0, 1)
    rows = await takeover.processor.handle(at(2, original + 33 * 86_400, orjson.dumps([e])), 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (1, 0)
    rows = await takeover.processor.handle(at(3, now, orjson.dumps([e])), 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (0, 1)
    takeover.stop()


async def test_takeover_worker_loads_first_sightings_from_the_sink(tmp_path: Path) -> None:
    """A worker with an empty cache must still drop a resend whose original another worker wrote."""
    journal: list[str] = []
    sink = FakeSink(journal)
    first = Worker(tmp_path, sink, tmp_path / "a")
    await first.processor.handle(stream_events([(0, 0, orjson.dumps([event(1, "a", 3, 0)]))]), 1, Acks([]))
    first.stop()
    second = Worker(tmp_path, sink, tmp_path / "b")
    rows = await second.processor.handle(stream_events([(0, 1, orjson.dumps([event(1, "a", 3, 0)]))]), 1, Acks([]))
    assert rows is not None and (rows.accepted, rows.duplicates) == (0, 1)
    # Loaded once per assignment; a revoke makes the next batch load again.
    await second.processor.handle(stream_events([(0, 2, orjson.dumps([event(2, "a", 3, 0)]))]), 1, Acks([]))
    second.state.forget_partitions({0})
    await second.processor.handle(stream_events([(0, 3, orjson.dumps([event(3, "a", 3, 0)]))]), 1, Acks([]))
    assert [j for j in journal if j.startswith("load")] == ["load partition 0"] * 3
    second.stop()


async def test_undecodable_message_is_a_dead_letter_and_acked(tmp_path: Path) -> None:
    sink = FakeSink()
    worker = Worker(tmp_path, sink, tmp_path / "state")
    acks = Acks([])
    await worker.processor.handle(stream_events([(0, 0, b"not json")]), 1, acks)
    assert acks.acked == [(0, 0)]
    assert [row[11] for row in sink.dead_letters.values()] == ["invalid_event"]
    worker.stop()


@pytest.mark.parametrize("refused_table", ["events", "meter_windows"])
async def test_a_message_storage_refuses_is_quarantined_and_the_rest_written(tmp_path: Path,
                                                                             refused_table: str) -> None:
    """Storage refuses any rows of subject "bad" (as ClickHouse refuses a value it cannot hold): that
    message becomes one whole-message invalid_event dead letter, the others are written, all are acked."""
    sink = FakeSink()
    sink.reject = lambda rows: refused_table if any(r[4] == "bad" for r in rows.events) else None
    worker = Worker(tmp_path, sink, tmp_path / "state")
    good1, bad, good2 = [event(1, "ok", 5, 0)], [event(2, "bad", 7, 0), event(3, "bad", 1, 0)], [event(4, "ok", 9, 1)]
    msgs = [(0, 0, orjson.dumps(good1)), (0, 1, orjson.dumps(bad)), (0, 2, orjson.dumps(good2))]
    acks = Acks([])
    await worker.processor.handle(stream_events(msgs), 1, acks)
    assert acks.acked == [(0, 0), (0, 1), (0, 2)]
    stored_ids = sorted(r[1] for r in sink.events.values())
    assert stored_ids == (["id-1", "id-4"] if refused_table == "events" else ["id-1", "id-2", "id-3", "id-4"])
    assert [k[:4] for k, r in sink.dead_letters.items() if r[11] == "invalid_event"] == [(EPOCH, 0, 1, 2**32 - 1)]
    assert sorted({k[6] for k in sink.windows}) == [0, 2]  # only the written messages' windows
    # Refused events rows leave the cache too: a later copy of one of them is its first sighting.
    copy = (0, 3, orjson.dumps([event(2, "ok", 7, 0)]))
    sink.reject = None
    await worker.processor.handle(stream_events([copy]), 1, acks)
    assert ("id-2" in {r[1] for r in sink.events.values() if r[10] == 3}) is (refused_table == "events")
    worker.stop()


async def test_offsets_going_back_within_an_assignment_ask_whether_the_log_restarted(tmp_path: Path) -> None:
    """A consumer reset into a restarted log shows as offsets going back within one assignment; then the
    worker checks the broker's log epoch (a replay after a new assignment does not count)."""
    sink = FakeSink()
    worker = Worker(tmp_path, sink, tmp_path / "state")
    checks: list[str] = []

    async def check() -> None:
        checks.append("checked")

    worker.processor.check_epoch = check
    acks = Acks([])
    first = [(0, 5, orjson.dumps([event(1, "s", 1, 0)])), (0, 6, orjson.dumps([event(2, "s", 1, 0)]))]
    await worker.processor.handle(stream_events(first), 1, acks)
    assert checks == []
    worker.processor.assigned({0})  # a rebalance: replaying from the committed offset is normal
    await worker.processor.handle(stream_events(first[:1]), 1, acks)
    assert checks == []
    back = [(0, 0, orjson.dumps([event(3, "s", 1, 0)]))]  # same assignment, offset 0 after 5: suspicious
    acked_before, stored_before = len(acks.acked), dict(sink.events)
    with pytest.raises(OffsetResetError, match="partition 0: expected offset 6"):
        # The epoch did not change (check returned): an out-of-range reset stops loudly, never re-reads.
        await worker.processor.handle(stream_events(back), 1, acks)
    assert checks == ["checked"]
    assert len(acks.acked) == acked_before and sink.events == stored_before  # nothing of it processed
    worker.stop()


async def test_a_batch_acked_across_a_rebalance_does_not_set_the_new_assignments_start(tmp_path: Path) -> None:
    """A rebalance lands while a batch is in progress: its late acks are never committed, so the new
    assignment starts again from the group's commit (none: offset 0). That replay is normal; seen from
    the batch's offsets it would look like an out-of-range reset (CI saw "expected offset 24, the
    consumer delivered 0" on the 2-shard cluster)."""
    sink = FakeSink()
    worker = Worker(tmp_path, sink, tmp_path / "state")
    acks = Acks([])
    processor = worker.processor
    load = processor.ensure_loaded

    async def rebalanced_during_load(partitions: set[int]) -> None:
        await load(partitions)
        processor.assigned({0}, {})  # the rebalance callback runs while the batch awaits its load

    processor.ensure_loaded = rebalanced_during_load  # type: ignore[method-assign]
    batch = [(0, off, orjson.dumps([event(off, "s", 1, 0)])) for off in range(24)]
    await processor.handle(stream_events(batch), 1, acks)
    processor.ensure_loaded = load  # type: ignore[method-assign]
    await processor.handle(stream_events(batch[:3], 2), 2, acks)  # the new assignment replays from 0
    assert acks.acked == [(0, off) for off in range(24)] + [(0, 0), (0, 1), (0, 2)]
    assert sorted(r[1] for r in sink.events.values()) == sorted(f"id-{off}" for off in range(24))
    worker.stop()


async def test_a_first_offset_below_the_groups_commit_is_an_out_of_range_reset(tmp_path: Path) -> None:
    """A worker (re)assigned a partition whose committed offset is out of range (a commit of a re-created
    log, a truncated log) is handed the earliest offset: it stops instead of re-reading from there."""
    sink = FakeSink()
    worker = Worker(tmp_path, sink, tmp_path / "state")
    committed = 10
    acks = Acks([])
    worker.processor.assigned({0, 1}, {0: committed})  # partition 1: no commit, any start is right
    await worker.processor.handle(stream_events([(1, 0, orjson.dumps([event(1, "b", 1, 0)]))]), 1, acks)
    with pytest.raises(OffsetResetError, match=f"expected offset {committed}, the consumer delivered 0"):
        await worker.processor.handle(stream_events([(0, 0, orjson.dumps([event(2, "a", 1, 0)]))]), 1, acks)
    assert acks.acked == [(1, 0)]
    worker.processor.assigned({0}, {0: committed})  # resuming exactly at the commit is the normal case
    await worker.processor.handle(stream_events([(0, committed, orjson.dumps([event(3, "a", 1, 0)]))]), 1, acks)
    assert acks.acked == [(1, 0), (0, committed)]
    worker.stop()


async def test_offsets_jumping_past_messages_retention_deleted_stop_the_worker(tmp_path: Path) -> None:
    """A forward gap in offsets is a loss when the log now starts above the expected offset (the consumer
    fell out of the log and was reset to its start, past unprocessed messages), within an assignment as
    at its first offset after the group's commit; a gap the log still covers (transaction markers,
    compaction) is not. Nothing of a stopped batch is processed or acked."""
    sink = FakeSink()
    worker = Worker(tmp_path, sink, tmp_path / "state")
    log_start = {0: 0, 1: 0}
    asked: list[int] = []

    async def start_of(partition: int) -> int:
        asked.append(partition)
        return log_start[partition]

    worker.processor.log_start = start_of
    acks = Acks([])
    worker.processor.assigned({0, 1}, {0: 10})
    await worker.processor.handle(stream_events([(0, 10, orjson.dumps([event(1, "a", 1, 0)])),
                                                 (0, 11, orjson.dumps([event(2, "a", 1, 0)])),
                                                 (1, 0, orjson.dumps([event(3, "b", 1, 0)]))]), 1, acks)
    assert asked == []  # contiguous offsets: nothing to ask
    await worker.processor.handle(stream_events([(0, 14, orjson.dumps([event(4, "a", 1, 0)]))]), 1, acks)
    assert asked == [0] and acks.acked[-1] == (0, 14)  # 12 and 13 held no data: the log still starts at 0
    lost_before = metrics.RETENTION_LOST.labels(partition="0")._value.get()
    log_start[0] = 40
    acked_before, stored_before = list(acks.acked), dict(sink.events)
    with pytest.raises(RetentionLossError, match="partition 0: offsets 15..39 were deleted by retention"):
        await worker.processor.handle(stream_events([(1, 1, orjson.dumps([event(5, "b", 1, 0)])),
                                                     (0, 40, orjson.dumps([event(6, "a", 1, 0)]))]), 1, acks)
    assert acks.acked == acked_before and sink.events == stored_before
    assert metrics.RETENTION_LOST.labels(partition="0")._value.get() - lost_before == 25
    # A new assignment resuming from a commit retention has passed: the same stop, before any processing.
    log_start[1] = 7
    worker.processor.assigned({1}, {1: 1})
    with pytest.raises(RetentionLossError, match="partition 1: offsets 1..6"):
        await worker.processor.handle(stream_events([(1, 7, orjson.dumps([event(7, "b", 1, 0)]))]), 1, acks)
    assert isinstance(RetentionLossError("x"), OffsetResetError)
    worker.stop()


class GatedSink(FakeSink):
    """A sink whose writes wait, while `hold` is set, until the test opens their gate: what happens while
    a batch is being written (the next one being decided) becomes observable."""

    def __init__(self, journal: list[str]) -> None:
        super().__init__(journal)
        self.hold = True
        self.gates: list[asyncio.Event] = []

    async def write(self, rows: Any) -> None:
        if self.hold:
            gate = asyncio.Event()
            self.gates.append(gate)
            self.journal.append(f"writing {len(rows.events)} events")
            await gate.wait()
        await super().write(rows)


async def _until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never met")


async def test_the_next_batch_is_decided_while_one_is_written_and_acks_stay_in_order(tmp_path: Path) -> None:
    """Pipelining (processor/batch.py): `dispatch` decides batch B while batch A's write runs, B's
    decisions see A's first sightings, A is acked before B is written, B only once B is written; a batch
    nothing follows is acked as soon as its write returns."""
    journal: list[str] = []
    sink = GatedSink(journal)
    worker = Worker(tmp_path, sink, tmp_path / "state")
    acks = Acks(journal)
    e1, e2, e3 = event(1, "a", 10, 0), event(2, "a", 20, 0), event(3, "a", 30, 0)
    await worker.processor.dispatch(stream_events([(0, 0, orjson.dumps([e1])), (0, 1, orjson.dumps([e2]))]), 1, acks)
    await _until(lambda: sink.gates)
    assert journal == ["load partition 0", "writing 2 events"] and acks.acked == []
    second = asyncio.ensure_future(worker.processor.dispatch(
        stream_events([(0, 2, orjson.dumps([e2, e3]))]), 1, acks))
    await asyncio.sleep(0.01)
    assert not second.done() and acks.acked == []  # decided, waiting for the first write
    sink.gates[0].set()
    rows = await second
    assert rows is not None and (rows.accepted, rows.duplicates) == (1, 1)  # e2 was first seen in the first batch
    assert journal[2:] == ["write 2 events", "ack 0:0", "ack 0:1", "writing 1 events"]
    assert worker.state.marker(0) == (worker.state.epoch_no(EPOCH), 2)
    sink.gates[1].set()
    await _until(lambda: acks.acked[-1:] == [(0, 2)])  # nothing follows: acked once written
    assert journal[-2:] == ["write 1 events", "ack 0:2"]
    assert worker.state.marker(0) == (worker.state.epoch_no(EPOCH), 3)
    assert sorted(r[1] for r in sink.events.values()) == ["id-1", "id-2", "id-3"]
    worker.stop()


async def test_a_refused_batch_in_flight_makes_the_next_one_decide_again(tmp_path: Path) -> None:
    """Storage refuses batch A while batch B is being decided: A's messages are written one by one and
    the refused one quarantined (its first sightings forgotten), then B is decided again -- so B's copy of
    a quarantined event is its first sighting, as a replay (and the sequential worker) would decide."""
    sink = GatedSink([])
    sink.reject = lambda rows: "events" if any(r[4] == "bad" for r in rows.events) else None
    worker = Worker(tmp_path, sink, tmp_path / "state")
    acks = Acks([])
    bad = [event(2, "bad", 7, 0), event(3, "bad", 1, 0)]
    await worker.processor.dispatch(stream_events([(0, 0, orjson.dumps([event(1, "ok", 5, 0)])),
                                                   (0, 1, orjson.dumps(bad))]), 1, acks)
    second = asyncio.ensure_future(worker.processor.dispatch(
        stream_events([(0, 2, orjson.dumps([event(2, "ok", 7, 0), event(4, "ok", 9, 1)]))]), 1, acks))
    await asyncio.sleep(0.01)
    sink.hold = False
    sink.gates[0].set()
    rows = await second
    assert rows is not None and (rows.accepted, rows.duplicates) == (2, 0)
    await worker.processor.settle()
    assert acks.acked == [(0, 0), (0, 1), (0, 2)]
    assert sorted((r[1], r[10]) for r in sink.events.values()) == [("id-1", 0), ("id-2", 2), ("id-4", 2)]
    assert [k[:4] for k, r in sink.dead_letters.items() if r[11] == "invalid_event"] == [(EPOCH, 0, 1, 2**32 - 1)]
    worker.stop()


async def test_a_failed_write_in_flight_acks_neither_batch_and_a_restart_replays_both(tmp_path: Path) -> None:
    """Batch A's write fails (the sink was stopped mid-outage) while B is decided: `dispatch` of B raises,
    nothing is acked, and a worker restarted on the same cache replays A and B to the same decisions."""
    sink = GatedSink([])
    worker = Worker(tmp_path, sink, tmp_path / "state")
    acks = Acks([])
    a = stream_events([(0, 0, orjson.dumps([event(1, "a", 5, 0), event(2, "a", 6, 0)]))])
    b = stream_events([(0, 1, orjson.dumps([event(2, "a", 6, 0), event(3, "a", 7, 0)]))])
    await worker.processor.dispatch(a, 1, acks)
    second = asyncio.ensure_future(worker.processor.dispatch(b, 1, acks))
    await asyncio.sleep(0.01)
    sink.hold = False
    sink.fail_writes = 1
    sink.gates[0].set()
    with pytest.raises(StorageError):
        await second
    assert acks.acked == [] and sink.events == {}
    worker.stop()
    worker = Worker(tmp_path, sink, tmp_path / "state")
    first = await worker.processor.handle(a, 1, acks)
    rows = await worker.processor.handle(b, 1, acks)
    assert first is not None and rows is not None
    assert (first.accepted, rows.accepted, rows.duplicates) == (2, 1, 1)
    assert acks.acked == [(0, 0), (0, 1)]
    worker.stop()


async def test_a_partition_revoked_with_a_batch_in_flight_may_come_back_from_the_groups_commit(tmp_path: Path) -> None:
    """A batch in flight when its partition is revoked is acked too late to be committed; the partition
    comes back and its first batch, replayed from the group's commit, arrives before `assigned` has run:
    that is no out-of-range reset, and the replay decides as the first pass did."""
    sink = GatedSink([])
    worker = Worker(tmp_path, sink, tmp_path / "state")
    acks = Acks([])
    msgs = [(1, o, orjson.dumps([event(o, "a", o, 0)])) for o in range(3)]
    await worker.processor.dispatch(stream_events(msgs), 1, acks)
    await _until(lambda: sink.gates)
    worker.processor.revoked({1})
    sink.hold = False
    sink.gates[0].set()
    await worker.processor.settle()
    assert acks.acked == [(1, 0), (1, 1), (1, 2)]  # acked, but after the revoke: never committed
    rows = await worker.processor.handle(stream_events(msgs[1:], generation=2), 2, acks)  # from the commit, 1
    assert rows is not None and (rows.accepted, rows.duplicates) == (2, 0)  # replays of their own positions
    worker.processor.assigned({1}, {1: 1})
    worker.stop()


def test_a_build_pauses_the_cyclic_gc_and_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a batch runs without automatic collections (processor/batch.py `_gc_paused`); afterwards
    the collector is as it was -- also when the build raises, and left off when someone else turned it off."""
    import gc

    from processor import batch

    seen: list[bool] = []
    real = batch.message_rows

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "message_rows", spy)
    worker = Worker(tmp_path, FakeSink(), tmp_path / "state")
    message = (0, 0, orjson.dumps([event(1, "a", 5, 0)]), 1.7e9)
    try:
        assert gc.isenabled()
        rows = worker.processor.build([message])
        assert rows.accepted == 1 and seen == [False] and gc.isenabled()

        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

        monkeypatch.setattr(batch, "message_rows", fail)
        with pytest.raises(RuntimeError):
            worker.processor.build([message])
        assert gc.isenabled()
        gc.disable()
        try:
            monkeypatch.setattr(batch, "message_rows", spy)
            worker.processor.build([message])
            assert not gc.isenabled() and seen == [False, False]
        finally:
            gc.enable()
    finally:
        worker.stop()
