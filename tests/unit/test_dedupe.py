"""First-sighting dedupe against an oracle, with crashes at every step of the batch protocol.

The processor's exactly-once effect rests on one property: whatever crashes happen and whatever local
cache survives, the set of positions whose rows reach ClickHouse equals "the first occurrence of each
key in the log". This test replays a generated log with duplicates through `DedupeState` using the same
protocol as processor.batch (prefetch -> decide -> flush -> write -> mark_written -> commit), crashing at
random points, sometimes losing the RocksDB cache, and compares what was written with the oracle.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline.core.positions import Position, dedupe_key
from processor.dedupe import DedupeState

EPOCH = "cluster-a"


def make_log(rnd: random.Random, partitions: int, messages: int) -> dict[int, list[list[bytes]]]:
    """Per partition, a list of messages, each a list of keys; duplicates within and across messages."""
    log: dict[int, list[list[bytes]]] = {}
    counter = 0
    for p in range(partitions):
        seen: list[bytes] = []
        msgs = []
        for _ in range(messages):
            msg = []
            for _ in range(rnd.randint(1, 8)):
                if seen and rnd.random() < 0.3:
                    msg.append(rnd.choice(seen))
                else:
                    counter += 1
                    k = dedupe_key("src", f"id-{counter}")
                    seen.append(k)
                    msg.append(k)
            msgs.append(msg)
        log[p] = msgs
    return log


def oracle(log: dict[int, list[list[bytes]]]) -> set[Position]:
    first: dict[bytes, Position] = {}
    for p, msgs in log.items():
        for off, msg in enumerate(msgs):
            for i, k in enumerate(msg):
                first.setdefault(k, Position(EPOCH, p, off, i))
    return set(first.values())


class FakeClickHouse:
    """The `events` table: accepted first sightings, keyed by dedupe key (ReplacingMergeTree identity)."""

    def __init__(self) -> None:
        self.rows: dict[bytes, Position] = {}
        self.written: set[Position] = set()

    def insert(self, accepted: list[tuple[bytes, Position]]) -> None:
        for k, pos in accepted:
            self.rows[k] = pos
            self.written.add(pos)

    def load(self, partition: int, since: tuple[str, int] | None) -> list[tuple]:
        now = int(time.time())
        out = []
        for k, pos in self.rows.items():
            if pos.partition != partition:
                continue
            if since is not None and (pos.log_epoch != since[0] or pos.offset < since[1]):
                continue
            out.append((k, pos.log_epoch, pos.partition, pos.offset, pos.index, now))
        return out


class CrashError(Exception):
    pass


def run(log: dict[int, list[list[bytes]]], tmp: Path, seed: int, crash_rate: float) -> FakeClickHouse:
    rnd = random.Random(seed)
    ch = FakeClickHouse()
    committed = {p: 0 for p in log}
    generation = 0
    path = tmp / "state0"
    state = DedupeState(str(path))
    while any(committed[p] < len(log[p]) for p in log):
        try:
            for p in log:
                if not state.is_loaded(p):
                    marker = state.marker(p)
                    since = (EPOCH, marker[1]) if marker and marker[0] == state.epoch_no(EPOCH) else None
                    state.load_rows(EPOCH, p, ch.load(p, since))
            # a batch: a few messages from random partitions, each partition in offset order
            pending = {p: committed[p] for p in log if committed[p] < len(log[p])}
            batch: list[tuple[int, int]] = []
            for _ in range(rnd.randint(1, 6)):
                live = [p for p in pending if pending[p] < len(log[p])]
                if not live:
                    break
                p = rnd.choice(live)
                batch.append((p, pending[p]))
                pending[p] += 1
            state.prefetch([k for p, off in batch for k in log[p][off]])
            accepted = []
            for p, off in batch:
                for i, k in enumerate(log[p][off]):
                    pos = Position(EPOCH, p, off, i)
                    if state.decide(k, pos):
                        accepted.append((k, pos))
            if rnd.random() < crash_rate:
                raise CrashError("before flush")
            state.flush()
            if rnd.random() < crash_rate:
                raise CrashError("before write")
            ch.insert(accepted)
            if rnd.random() < crash_rate:
                raise CrashError("before mark_written")
            for p, off in batch:
                state.mark_written(EPOCH, p, off + 1)
            if rnd.random() < crash_rate:
                raise CrashError("before commit")
            for p, off in batch:
                committed[p] = max(committed[p], off + 1)
        except CrashError:
            state.discard_batch()
            state.close()
            # committed offsets may lag what was written: replay from a random earlier committed point
            for p, c in list(committed.items()):
                committed[p] = rnd.randint(max(0, c - 3), c)
            if rnd.random() < 0.5:
                generation += 1
                path = tmp / f"state{generation}"  # the local cache is lost
            state = DedupeState(str(path))
    state.close()
    return ch


@pytest.mark.parametrize("seed", range(12))
def test_written_positions_equal_first_occurrences_despite_crashes(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    log = make_log(rnd, partitions=3, messages=40)
    ch = run(log, tmp_path, seed, crash_rate=0.08)
    assert ch.written == oracle(log)


def test_no_crash_run_matches_oracle(tmp_path: Path) -> None:
    log = make_log(random.Random(99), partitions=2, messages=60)
    assert run(log, tmp_path, 99, crash_rate=0.0).written == oracle(log)


def test_decide_rules(tmp_path: Path) -> None:
    state = DedupeState(str(tmp_path / "s"))
    k = dedupe_key("s", "1")
    first = Position(EPOCH, 0, 10, 2)
    assert state.decide(k, first)                          # absent -> record, accept
    assert state.decide(k, first)                          # same position -> replay -> accept
    assert not state.decide(k, Position(EPOCH, 0, 11, 0))  # later -> duplicate
    assert not state.decide(k, Position(EPOCH, 1, 5, 0))   # other partition -> duplicate
    assert not state.decide(k, Position("new", 0, 0, 0))   # new log epoch -> the recorded one is older
    state.flush()
    assert state.lookup(k) == first
    state.close()
    reopened = DedupeState(str(tmp_path / "s"))
    assert reopened.decide(k, first)
    assert not reopened.decide(k, Position("new", 0, 10, 2))  # same numbers, other epoch: not the same event
    reopened.close()


def test_duplicate_inside_one_message(tmp_path: Path) -> None:
    state = DedupeState(str(tmp_path / "s"))
    k = dedupe_key("s", "1")
    state.prefetch([k, k])
    assert state.decide(k, Position(EPOCH, 0, 0, 0))
    assert not state.decide(k, Position(EPOCH, 0, 0, 1))
    state.close()


def test_purge_drops_keys_past_the_horizon(tmp_path: Path) -> None:
    state = DedupeState(str(tmp_path / "s"), horizon_days=1)
    old, new = dedupe_key("s", "old"), dedupe_key("s", "new")
    state.decide(old, Position(EPOCH, 0, 0, 0))
    state.flush(now=time.time() - 2 * 86_400)
    state.decide(new, Position(EPOCH, 0, 1, 0))
    state.flush()
    assert state.purge() == 1
    assert state.lookup(old) is None
    assert state.lookup(new) == Position(EPOCH, 0, 1, 0)
    state.close()


def test_load_respects_horizon_and_keeps_cached_records(tmp_path: Path) -> None:
    state = DedupeState(str(tmp_path / "s"), horizon_days=1)
    k1, k2, k3 = (dedupe_key("s", str(i)) for i in range(3))
    state.decide(k1, Position(EPOCH, 0, 7, 0))
    state.flush()
    now = time.time()
    rows = [
        (k1, EPOCH, 0, 9, 0, now),            # the cache already knows k1: never overwritten
        (k2, EPOCH, 0, 3, 1, now),
        (k3, EPOCH, 0, 4, 0, now - 3 * 86_400),  # past the horizon: skipped
    ]
    assert state.load_rows(EPOCH, 0, rows) == 2
    assert state.lookup(k1) == Position(EPOCH, 0, 7, 0)
    assert state.lookup(k2) == Position(EPOCH, 0, 3, 1)
    assert state.lookup(k3) is None
    assert state.marker(0) == (state.epoch_no(EPOCH), 10)
    assert state.is_loaded(0)
    state.forget_partitions([0])
    assert not state.is_loaded(0)
    state.close()


def test_a_key_stored_at_two_positions_is_a_conflict_and_the_first_ranked_copy_stays(tmp_path: Path) -> None:
    """Two workers that decided copies before either was written both counted them: merging the other's
    stored key must count the conflict, keep the copy `first_sighting` ranks first (broker time, then
    position) whichever side it is on, note the other as a pending retraction, and merge a foreign
    partition without marking it loaded (it is not this worker's to process)."""
    state = DedupeState(str(tmp_path / "s"), horizon_days=1)
    k1, k2, k3 = dedupe_key("s", "1"), dedupe_key("s", "2"), dedupe_key("s", "3")
    now = int(time.time())
    state.decide(k1, Position(EPOCH, 0, 7, 0), seen=now)       # this worker's copy, sent first: stays
    state.decide(k3, Position(EPOCH, 0, 8, 0), seen=now + 5)   # sent after the other's: loses
    state.flush()
    rows = [(k1, EPOCH, 5, 2, 0, now + 1), (k2, EPOCH, 5, 3, 0, now), (k2, EPOCH, 5, 3, 0, now),
            (k2, EPOCH, 6, 1, 0, now), (k3, EPOCH, 5, 4, 0, now + 2)]  # k2 twice at one position, then elsewhere
    assert state.load_rows(EPOCH, 5, rows, owned=False) == 5
    assert state.conflicts == 3
    assert state.lookup(k1) == Position(EPOCH, 0, 7, 0)
    assert state.lookup(k2) == Position(EPOCH, 5, 3, 0)  # same second: the smaller partition
    assert state.lookup(k3) == Position(EPOCH, 5, 4, 0)  # the earlier broker time, on the other partition
    assert [x.position for x in state.pending_retractions([0])] == [(EPOCH, 0, 8, 0)]  # only partition 0's
    pending = {(x.key, x.position, x.winner_position) for x in state.pending_retractions()}
    assert pending == {(k1, (EPOCH, 5, 2, 0), (EPOCH, 0, 7, 0)), (k2, (EPOCH, 6, 1, 0), (EPOCH, 5, 3, 0)),
                       (k3, (EPOCH, 0, 8, 0), (EPOCH, 5, 4, 0))}
    # A replay decides as the retraction does: the loser is a duplicate, the winner is accepted again.
    assert not state.decide(k3, Position(EPOCH, 0, 8, 0), seen=now + 5)
    assert state.decide(k1, Position(EPOCH, 0, 7, 0), seen=now)
    state.flush()
    assert state.foreign_marker(5) == (state.epoch_no(EPOCH), 5) and state.marker(5) is None
    assert not state.is_loaded(5)
    state.close()


def test_a_pending_retraction_survives_a_crash_until_it_is_done(tmp_path: Path) -> None:
    """The record that a stored copy must be retracted is written with the cache's switch to the winner,
    so a worker that dies before retracting still has it; `retracted` forgets it."""
    path = str(tmp_path / "s")
    state = DedupeState(path, horizon_days=1)
    k = dedupe_key("s", "1")
    now = int(time.time())
    assert state.load_rows(EPOCH, 0, [(k, EPOCH, 0, 3, 1, now + 1)]) == 1
    assert state.load_rows(EPOCH, 1, [(k, EPOCH, 1, 9, 0, now)], owned=False) == 1
    state.close()
    state = DedupeState(path, horizon_days=1)
    [loser] = state.pending_retractions()
    assert loser.position == (EPOCH, 0, 3, 1) and loser.winner_position == (EPOCH, 1, 9, 0)
    assert loser.message == (EPOCH, 0, 3)
    state.retracted(loser)
    assert state.pending_retractions() == []
    assert state.lookup(k) == Position(EPOCH, 1, 9, 0)
    state.close()


def test_whatever_order_a_load_meets_copies_in_the_same_one_stays(tmp_path: Path) -> None:
    """Within one chunk or across loads, owned or foreign: the smallest copy is cached and every other is
    pending, so all workers agree and the loser's owner retracts it."""
    now = int(time.time())
    k = dedupe_key("s", "x")
    copies = [(k, EPOCH, 2, 5, 0, now + 1), (k, EPOCH, 0, 9, 0, now + 1), (k, EPOCH, 1, 1, 0, now + 3)]
    for i, order in enumerate(([0, 1, 2], [2, 1, 0], [1, 2, 0])):
        state = DedupeState(str(tmp_path / f"s{i}"), horizon_days=1)
        state.load_rows(EPOCH, 7, [copies[j] for j in order], owned=False)
        assert state.lookup(k) == Position(EPOCH, 0, 9, 0)
        assert {x.position for x in state.pending_retractions()} == {(EPOCH, 2, 5, 0), (EPOCH, 1, 1, 0)}
        state.close()


DAY = 86_400


def test_expiry_is_judged_on_log_time_and_keys_outlive_the_horizon_by_the_maximum_lag(tmp_path: Path) -> None:
    """A copy is a duplicate iff its broker time is within the horizon of the recorded first sighting's,
    whenever either is processed; the worker's clock only decides when a key may be deleted: after the
    horizon plus the maximum lag (a worker 10 days behind still has every key it needs)."""
    state = DedupeState(str(tmp_path / "s"), horizon_days=32, max_lag_seconds=14 * DAY)
    t0 = 1_700_000_000
    k = dedupe_key("s", "retried")
    assert state.decide(k, Position(EPOCH, 0, 1, 0), seen=t0)
    state.flush(now=t0 + 3 * DAY)  # processed late: the record keeps the broker time
    assert state.purge(now=t0 + 42 * DAY) == 0  # a worker catching up 10 days behind
    assert not state.decide(k, Position(EPOCH, 1, 5, 0), seen=t0 + int(31.9 * DAY))  # day 31.9: duplicate
    assert state.decide(k, Position(EPOCH, 1, 9, 0), seen=t0 + 33 * DAY)  # day 33: the first sighting expired
    state.flush(now=t0 + 50 * DAY)
    assert state.lookup(k) == Position(EPOCH, 1, 9, 0)
    assert not state.decide(k, Position(EPOCH, 2, 0, 0), seen=t0 + 40 * DAY)  # within 32 days of day 33
    assert state.decide(k, Position(EPOCH, 1, 9, 0), seen=t0 + 33 * DAY)  # replays decide alike
    assert not state.decide(k, Position(EPOCH, 1, 5, 0), seen=t0 + int(31.9 * DAY))
    state.flush()
    assert state.purge(now=t0 + (33 + 32 + 14) * DAY - 1) == 0
    assert state.purge(now=t0 + (33 + 32 + 14) * DAY + 1) == 1
    state.close()


def test_a_load_keeps_the_sighting_later_copies_compare_with(tmp_path: Path) -> None:
    """Stored: a first sighting and, more than the horizon later in log time, a new one of the same key
    (the old had expired). Whatever order a load meets them in, the cache keeps the later one, and
    neither is a conflict; a key's records closer than the horizon are one."""
    t0 = 1_700_000_000
    k = dedupe_key("s", "twice")
    old, new = (k, EPOCH, 0, 1, 0, t0), (k, EPOCH, 3, 7, 0, t0 + 33 * DAY)
    for i, rows in enumerate(([old, new], [new, old])):
        state = DedupeState(str(tmp_path / f"s{i}"), horizon_days=32, max_lag_seconds=14 * DAY)
        assert state.load_rows(EPOCH, 0, rows[:1], now=t0 + 40 * DAY) == 1
        assert state.load_rows(EPOCH, 3, rows[1:], now=t0 + 40 * DAY, owned=False) == 1
        assert state.lookup(k) == Position(EPOCH, 3, 7, 0) and state.conflicts == 0
        assert not state.decide(k, Position(EPOCH, 5, 0, 0), seen=t0 + 40 * DAY)
        state.close()


def test_a_cache_of_another_key_version_is_rebuilt(tmp_path: Path) -> None:
    """Keys cached under an older dedupe_key encoding would never match new keys: the cache (keys and
    markers) is dropped so every partition reloads from ClickHouse under the current encoding."""
    from rocksdict import Options, Rdict

    state = DedupeState(str(tmp_path / "s"))
    k = dedupe_key("s", "1")
    state.decide(k, Position(EPOCH, 0, 3, 0))
    state.flush()
    state.mark_written(EPOCH, 0, 4)
    state.close()
    reopened = DedupeState(str(tmp_path / "s"))  # same version: kept
    assert reopened.lookup(k) == Position(EPOCH, 0, 3, 0) and reopened.marker(0) is not None
    reopened.close()
    raw = Rdict(str(tmp_path / "s"), Options(raw_mode=True))
    raw.put(b"v", (1).to_bytes(4, "big"))  # as if written by the version-1 encoding
    raw.close()
    rebuilt = DedupeState(str(tmp_path / "s"))
    assert rebuilt.lookup(k) is None and rebuilt.marker(0) is None
    rebuilt.close()


def test_forget_first_sightings_of_a_refused_message_only(tmp_path: Path) -> None:
    state = DedupeState(str(tmp_path / "s"))
    mine, earlier, other = dedupe_key("s", "mine"), dedupe_key("s", "earlier"), dedupe_key("s", "other")
    state.decide(earlier, Position(EPOCH, 0, 4, 0))
    state.decide(mine, Position(EPOCH, 0, 5, 1))
    state.decide(other, Position(EPOCH, 1, 5, 0))  # same offset, another partition
    state.flush()
    # the refused message (partition 0, offset 5) carried `mine` first and a copy of `earlier`
    assert state.forget_first_sightings(Position(EPOCH, 0, 5, 0), [mine, earlier]) == 1
    assert state.lookup(mine) is None
    assert state.lookup(earlier) == Position(EPOCH, 0, 4, 0)
    assert state.lookup(other) == Position(EPOCH, 1, 5, 0)
    assert state.decide(mine, Position(EPOCH, 0, 9, 0))  # a later copy is now the first sighting
    state.close()


def test_a_load_overtaken_by_a_revoke_does_not_mark_the_partition_loaded(tmp_path: Path) -> None:
    """Rebalance race: the partition is revoked while its reload runs in a thread. The load must not
    re-mark it loaded, or the next assignment skips the reload and misses what the other owner wrote."""
    state = DedupeState(str(tmp_path / "s"))
    now = time.time()
    keys = [dedupe_key("s", str(i)) for i in range(3)]

    def rows() -> Iterator[tuple[Any, ...]]:
        yield (keys[0], EPOCH, 0, 1, 0, now)
        state.forget_partitions([0])  # on_partitions_revoked, on the event loop, mid-load
        yield (keys[1], EPOCH, 0, 2, 0, now)

    generation = state.generation(0)
    assert state.load_rows(EPOCH, 0, rows(), generation=generation) == 2
    assert not state.is_loaded(0)
    assert state.lookup(keys[1]) == Position(EPOCH, 0, 2, 0)  # the keys themselves are kept: true firsts
    assert state.load_rows(EPOCH, 0, [(keys[2], EPOCH, 0, 3, 0, now)], generation=state.generation(0)) == 1
    assert state.is_loaded(0)  # an undisturbed load marks it
    state.close()


def test_closing_during_a_load_stops_the_load_instead_of_writing_to_a_closed_database(tmp_path: Path) -> None:
    import threading

    from processor.dedupe import DedupeStateClosedError

    state = DedupeState(str(tmp_path / "s"))
    now = time.time()

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(25_000):  # more than one 10k chunk on each side of the close
            if i == 12_000:
                closer = threading.Thread(target=state.close)
                closer.start()
                closer.join(10)
                assert not closer.is_alive(), "close waited for the whole load"
            yield (dedupe_key("s", str(i)), EPOCH, 0, i, 0, now)

    with pytest.raises(DedupeStateClosedError):
        state.load_rows(EPOCH, 0, rows())
    state.close()  # twice is harmless


def test_a_backfill_of_dedupe_keys_makes_the_foreign_partitions_merge_again(tmp_path: Path) -> None:
    """A backfill adds stored keys below positions a foreign marker passed: those markers must go (the
    owned-partition markers stay: their loads already read every key stored for them)."""
    path = str(tmp_path / "s")
    state = DedupeState(path, horizon_days=1)
    now = time.time()
    state.load_rows(EPOCH, 5, [(dedupe_key("s", "1"), EPOCH, 5, 9, 0, now)], owned=False)
    state.load_rows(EPOCH, 6, [(dedupe_key("s", "2"), EPOCH, 6, 3, 0, now)], owned=False)
    state.load_rows(EPOCH, 0, [(dedupe_key("s", "3"), EPOCH, 0, 4, 0, now)])
    assert state.since_backfill("2@2026-12-01 12:00:00.000") == 2  # first met: whatever was merged before
    assert state.foreign_marker(5) is None and state.foreign_marker(6) is None
    assert state.marker(0) == (state.epoch_no(EPOCH), 5)
    state.load_rows(EPOCH, 5, [(dedupe_key("s", "1"), EPOCH, 5, 9, 0, now)], owned=False)
    state.close()
    state = DedupeState(path, horizon_days=1)  # a restart: the same backfill keeps the markers
    assert state.since_backfill("2@2026-12-01 12:00:00.000") == 0
    assert state.foreign_marker(5) == (state.epoch_no(EPOCH), 10)
    assert state.since_backfill("2@2026-12-02 08:00:00.000") == 1  # a newer backfill drops them again
    assert state.foreign_marker(5) is None
    state.close()


@pytest.mark.parametrize("order", ["by key", "shuffled"])
def test_a_sorted_load_caches_exactly_the_first_ranked_copy_of_every_key(tmp_path: Path, monkeypatch: Any,
                                                                         order: str) -> None:
    """`load_sorted` (a takeover: SST files ingested whole, in chunks) against an oracle computed here: every
    key of the rows is cached at its smallest (broker time, epoch, partition, offset, index) copy, rows
    past the kept days are skipped, a cached record is kept unless a row ranks before it, each other copy
    is a pending retraction, and the marker covers the partition. Small chunks put copies of one key in
    different files; shuffled rows (not what ClickHouse sends) must give the same cache."""
    import processor.dedupe as dedupe_module
    monkeypatch.setattr(dedupe_module, "_INGEST_CHUNK", 97)
    rnd = random.Random(order)
    now = 1_700_000_000
    state = DedupeState(str(tmp_path / "s"), horizon_days=32, max_lag_seconds=14 * DAY)
    rows = [(dedupe_key("s", f"k{i}"), EPOCH, 0, i, i % 3, now - rnd.randint(0, 40 * DAY)) for i in range(2000)]
    kept = [r for r in rows if r[5] >= now - 46 * DAY]
    copies = [(r[0], EPOCH, 0, 5000 + i, 0, r[5] + rnd.randint(-3, 3)) for i, r in enumerate(rnd.sample(kept, 40))]
    twice = rnd.sample(kept, 20)  # a row met twice (ReplacingMergeTree has not merged them yet)
    cached = rnd.sample(kept, 60)  # this worker's own or another partition's records of some keys
    for i, r in enumerate(cached):
        state.decide(r[0], Position(EPOCH, 1 + i % 3, 9000 + i, 0), seen=r[5] + rnd.choice([-2, 0, 2]))
    state.flush()
    cached_at = {r[0]: (r[5], EPOCH, 1 + i % 3, 9000 + i, 0) for i, r in enumerate(cached)}
    for i, r in enumerate(cached):  # the records as `decide` stored them, broker time included
        cached_at[r[0]] = (int.from_bytes(state._db[b"k" + r[0]][20:24], "big"), EPOCH, 1 + i % 3, 9000 + i, 0)
    loaded = rows + copies + twice
    loaded.sort(key=lambda r: (r[0], r[3])) if order == "by key" else rnd.shuffle(loaded)

    copies_of: dict[bytes, set[tuple[Any, ...]]] = {}
    for key, epoch, part, offset, index, seen in loaded:
        if seen >= now - 46 * DAY:
            copies_of.setdefault(key, set()).add((seen, epoch, part, offset, index))
    for key, sighting in cached_at.items():
        copies_of[key].add(sighting)
    first = {k: min(c) for k, c in copies_of.items()}
    losers = {(k, (c[1], c[2], c[3], c[4])) for k, cs in copies_of.items() for c in cs if c != first[k]}

    blocks = [[list(col) for col in zip(*loaded[i:i + 300])] for i in range(0, len(loaded), 300)]
    assert state.load_sorted(EPOCH, 0, blocks, now=now) == sum(r[5] >= now - 46 * DAY for r in loaded)
    for key, _, _, _, _, _ in rows:
        want = first.get(key)
        assert state.lookup(key) == (None if want is None else Position(*want[1:]))
    assert {(x.key, tuple(x.position)) for x in state.pending_retractions()} == losers
    assert state.conflicts >= len(losers) > 0  # counted per meeting: a row met twice may count twice
    assert state.marker(0) == (state.epoch_no(EPOCH), 5000 + len(copies)) and state.is_loaded(0)
    state.close()
    assert not list((tmp_path / "s.ingest").iterdir())  # no SST file left beside the database
