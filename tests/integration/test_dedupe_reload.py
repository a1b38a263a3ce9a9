"""A worker's reload of its own partitions' dedupe keys, on a real ClickHouse.

The history is stored the way a version from before `dedupe_keys` stored it: `events` rows only (with
`dedupe_key` columns of the old key encoding). Starting the processor's schema step must make the reload
of one partition return exactly that partition's keys, recomputed (the oracle hashes `(source, id)` here),
while reading a range of `dedupe_keys`' sorting key -- not the whole `events` history.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import processor.sink as sink_module
from meterline.adapters.clickhouse import connect, create_schema, keep_dedupe_keys
from meterline.core.positions import KEY_VERSION, Position, dedupe_key
from meterline.core.schema import DEDUPE_KEY_BACKFILL_COLUMNS, DEDUPE_KEY_BACKFILLS, EVENT_COLUMNS
from processor.dedupe import DedupeState
from processor.key_backfill import backfill_dedupe_keys
from processor.sink import ClickHouseSink, dedupe_load_query

PARTITIONS = 8
PER_PARTITION = 25_000
GRANULE = 8192  # index_granularity: a range read may read up to a granule beyond each end
KEEP_DAYS = 47  # what the processor passes for the default horizon and retention (32 + 14 + 1)
EPOCH = "cluster-1/topic-1"


def old_key(source: str, event_id: str) -> bytes:
    """Version 1 of the key encoding (`source NUL id`): what `events.dedupe_key` of old rows holds."""
    return hashlib.blake2b(f"{source}\0{event_id}".encode(), digest_size=16).digest()


@pytest.fixture
def history(clickhouse_url: str, unique_name: Callable[[str], str]) -> Iterator[dict[str, Any]]:
    """A database whose `events` hold PARTITIONS x PER_PARTITION events of the last 40 days and whose
    `dedupe_keys` is empty, as after an upgrade from a version without it; the oracle keys per partition."""
    db = unique_name("reload")
    client = connect(clickhouse_url, database="default")
    create_schema(client, db)
    now = datetime.now(UTC)
    rows, keys = [], {p: set() for p in range(PARTITIONS)}
    for i in range(PARTITIONS * PER_PARTITION):
        p, offset = i % PARTITIONS, i // PARTITIONS
        source, event_id = f"src-{i % 7}", f"evt-{i}"
        seen = now - timedelta(days=40) + timedelta(seconds=offset * 100)
        values = {"dedupe_key": old_key(source, event_id), "id": event_id, "source": source, "type": "prompt",
                  "subject": f"cust-{i % 500}", "time": seen, "data": "{}", "ingested_at": seen,
                  "log_epoch": EPOCH, "kafka_partition": p, "kafka_offset": offset, "batch_index": 0,
                  "validation_errors": [], "attributes": "", "rejections": [], "namespace": "default"}
        rows.append([values[c] for c in EVENT_COLUMNS])
        keys[p].add((dedupe_key(source, event_id), EPOCH, p, offset, 0, int(seen.timestamp())))
    client.insert(f"`{db}`.events", rows, column_names=list(EVENT_COLUMNS))
    # A backfill of another key encoding is no backfill of this one.
    client.insert(f"`{db}`.{DEDUPE_KEY_BACKFILLS}", [[KEY_VERSION + 1, now - timedelta(days=100), 0]],
                  column_names=list(DEDUPE_KEY_BACKFILL_COLUMNS))
    try:
        yield {"db": db, "client": client, "url": f"{clickhouse_url.rstrip('/')}/{db}", "keys": keys}
    finally:
        client.command(f"DROP DATABASE IF EXISTS `{db}`")
        client.close()


def reload(sink: ClickHouseSink, partition: int, since: tuple[str, int] | None = None) -> set[tuple[Any, ...]]:
    got: list[tuple[Any, ...]] = []

    def merge(rows: Any) -> int:
        got.extend((bytes(k), e, int(p), int(o), int(i), int(s)) for k, e, p, o, i, s in rows)
        return len(got)

    sink.load_dedupe(partition, KEEP_DAYS - 1, since, merge)
    return set(got)  # a row may come twice until ReplacingMergeTree merges it: merging is idempotent


def test_the_reload_of_one_partition_reads_its_range_and_finds_keys_stored_before_dedupe_keys(
        history: dict[str, Any]) -> None:
    db, client, keys = history["db"], history["client"], history["keys"]
    sink = ClickHouseSink(history["url"], db)
    sink.ensure_schema(keys_keep_days=KEEP_DAYS)  # the processor's start: migrate, backfill
    for p in (0, 5):
        assert reload(sink, p) == keys[p]
    since = (EPOCH, PER_PARTITION - 100)
    assert reload(sink, 3, since) == {k for k in keys[3] if k[3] >= since[1]}

    sql, params = dedupe_load_query(db, 5, KEEP_DAYS - 1, None)
    found = client.query(sql, parameters=params, settings={"wait_end_of_query": 1})
    read = int(found.summary["read_rows"])
    total = PARTITIONS * PER_PARTITION
    # A range of one partition (plus at most a granule at each end), never the 200k rows of history.
    assert len(found.result_rows) == PER_PARTITION
    assert read <= PER_PARTITION + 2 * GRANULE < total, f"the reload read {read} rows of {total}"
    plan = "\n".join(r[0] for r in client.query(f"EXPLAIN indexes = 1 {sql}", parameters=params).result_rows)
    assert f"{db}.dedupe_keys" in plan and "Condition: (kafka_partition in [5, 5])" in plan, plan

    # Recorded: a second start does not backfill again; a longer keep window than was covered does.
    assert backfill_dedupe_keys(client, db, KEEP_DAYS) is None
    assert backfill_dedupe_keys(client, db, KEEP_DAYS + 5) == total
    assert reload(sink, 5) == keys[5]  # the same rows again: ReplacingMergeTree identity


def test_a_takeover_loads_the_partition_sorted_by_key_into_exactly_its_keys(
        history: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker without a marker (`load_dedupe_by_key` -> `DedupeState.load_sorted`, SST files): ClickHouse
    streams the partition sorted by key -- on disk past a sort memory made tiny here -- and the cache
    ends with exactly the oracle's keys of that partition, at their positions, and nothing of the others."""
    monkeypatch.setattr(sink_module, "SORT_IN_MEMORY_BYTES", 64 * 1024)
    sink = ClickHouseSink(history["url"], history["db"])
    sink.ensure_schema(keys_keep_days=KEEP_DAYS)
    streamed: list[tuple[Any, ...]] = []

    def collect(blocks: Any) -> int:
        for block in blocks:
            streamed.extend(zip(*block, strict=True))
        return len(streamed)

    sink.load_dedupe_by_key(5, KEEP_DAYS - 1, collect)
    assert [bytes(r[0]) for r in streamed] == sorted(bytes(r[0]) for r in streamed)
    assert {(bytes(k), e, p, o, i, s) for k, e, p, o, i, s in streamed} == history["keys"][5]

    state = DedupeState(str(tmp_path / "cache"), horizon_days=KEEP_DAYS - 1)
    assert sink.load_dedupe_by_key(5, KEEP_DAYS - 1, functools.partial(state.load_sorted, EPOCH, 5)) == PER_PARTITION
    for key, epoch, p, offset, index, _ in history["keys"][5]:
        assert state.lookup(key) == Position(epoch, p, offset, index)
    assert all(state.lookup(key) is None for key, *_ in history["keys"][3])
    assert state.marker(5) == (state.epoch_no(EPOCH), PER_PARTITION) and state.pending_retractions() == []
    state.close()


def test_the_dedupe_keys_ttl_is_only_ever_raised(history: dict[str, Any]) -> None:
    """Workers with different horizons share the table: the shorter one must not cut the longer one's keys."""
    db, client = history["db"], history["client"]

    def ttl_days() -> str:
        return str(client.command(f"SELECT engine_full FROM system.tables WHERE database = '{db}' "
                                  "AND name = 'dedupe_keys'"))

    assert keep_dedupe_keys(client, db, 47)
    assert "TTL toDateTime(seen_at) + toIntervalDay(47)" in ttl_days()
    assert not keep_dedupe_keys(client, db, 20)  # a worker with a 5-day horizon starts
    assert "TTL toDateTime(seen_at) + toIntervalDay(47)" in ttl_days()
    assert keep_dedupe_keys(client, db, 60)  # one with a longer horizon raises it
    assert "TTL toDateTime(seen_at) + toIntervalDay(60)" in ttl_days()
