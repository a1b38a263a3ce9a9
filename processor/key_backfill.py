"""The one-time fill of `dedupe_keys` from `events`, so the owned-partition reload can read only `dedupe_keys`.

Why: a worker taking over a partition loads that partition's stored keys (docs/design.md, "Exactly-once
effect" 6). `events` is ordered by (subject, time) for queries, so a per-partition read of it scans all
history; `dedupe_keys` is ordered by (partition, epoch, offset), a range per partition. But `dedupe_keys`
only has the keys written since it existed, and a version of meterline from before it stored keys in
`events` alone. So at schema migration each processor checks `dedupe_key_backfills`: unless a finished
backfill of the current key encoding covers the keep window (the dedupe horizon plus the maximum lag),
it reads `events` of that window once, recomputes every key from the stored `(source, id, namespace)`
with the current `dedupe_key` (rows stored before a change of encoding carry an old `dedupe_key`), writes
the `dedupe_keys` rows, and only then records the backfill. Idempotent: a row it writes is identical to
the row the live sink writes for the same event (same key, position and broker time), so
ReplacingMergeTree collapses them; a crash before the record means the next start does it again, and two
workers starting together both do it, harmlessly. A new key encoding names a new table
(`schema.dedupe_keys_table`), whose backfill is recorded under its own version.

Limit: a worker of a version from before `dedupe_keys` still running beside the new ones keeps storing
keys in `events` only; upgrade from such a version by stopping the old workers first.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from meterline.adapters.clickhouse import storage_errors
from meterline.core.positions import KEY_VERSION, dedupe_key
from meterline.core.schema import (
    DEDUPE_KEY_BACKFILL_COLUMNS,
    DEDUPE_KEY_BACKFILLS,
    DEDUPE_KEY_COLUMNS,
    DEDUPE_KEYS,
    EVENTS,
    qualified,
)

logger = logging.getLogger(__name__)

#: Rows per insert: big enough for few parts, small enough to keep memory flat.
CHUNK_ROWS = 200_000


def covered_query(database: str, keep_days: int) -> tuple[str, dict[str, Any]]:
    """SQL + parameters counting the recorded backfills of the current key encoding that cover the last
    `keep_days` of broker time (anything after a backfill the live sink wrote itself)."""
    sql = (f"SELECT count() FROM {qualified(database, DEDUPE_KEY_BACKFILLS)} "
           "WHERE key_version = {version:UInt32} AND covers_from <= now() - toIntervalDay({days:UInt32})")
    return sql, {"version": KEY_VERSION, "days": keep_days}


def events_query(database: str, covers_from: int) -> tuple[str, dict[str, Any]]:
    """SQL + parameters of what a `dedupe_keys` row is computed from, for every event stored with a broker
    time at or after `covers_from` (unix seconds). No FINAL: duplicate rows of one event are identical."""
    sql = ("SELECT source, id, namespace, log_epoch, kafka_partition, kafka_offset, batch_index, ingested_at "
           f"FROM {qualified(database, EVENTS)} WHERE ingested_at >= toDateTime({{from:UInt32}}, 'UTC')")
    return sql, {"from": covers_from}


def backfill_dedupe_keys(client: Client, database: str, keep_days: int) -> int | None:
    """Fill `dedupe_keys` from the `events` of the last `keep_days` unless a recorded backfill of the
    current key encoding already covers them; returns the rows written, or None when none was needed."""
    with storage_errors():
        sql, params = covered_query(database, keep_days)
        if int(client.query(sql, parameters=params).result_rows[0][0]) > 0:
            return None
        started = time.perf_counter()
        now = int(client.query("SELECT toUnixTimestamp(now())").result_rows[0][0])
        covers_from = now - keep_days * 86_400
        sql, params = events_query(database, covers_from)
        table = qualified(database, DEDUPE_KEYS)
        n = 0
        chunk: list[list[Any]] = []
        with client.query_row_block_stream(sql, parameters=params) as stream:
            for block in stream:
                for source, event_id, namespace, epoch, partition, offset, index, seen in block:
                    chunk.append([dedupe_key(source, event_id, namespace), epoch, partition, offset, index, seen])
                if len(chunk) >= CHUNK_ROWS:
                    client.insert(table, chunk, column_names=list(DEDUPE_KEY_COLUMNS))
                    n += len(chunk)
                    chunk = []
        if chunk:
            client.insert(table, chunk, column_names=list(DEDUPE_KEY_COLUMNS))
            n += len(chunk)
        client.insert(qualified(database, DEDUPE_KEY_BACKFILLS), [[KEY_VERSION, datetime.fromtimestamp(covers_from, UTC), n]],
                      column_names=list(DEDUPE_KEY_BACKFILL_COLUMNS))
    logger.info("dedupe_keys backfilled from events", extra={
        "key_version": KEY_VERSION, "keep_days": keep_days, "rows": n,
        "seconds": round(time.perf_counter() - started, 3)})
    return n


def newest_backfill(client: Client, database: str) -> str:
    """An identity of the newest recorded backfill of the current key encoding ('' if none): a worker whose
    cache merged other partitions' keys before it must merge them again (`DedupeState.since_backfill`)."""
    with storage_errors():
        found = client.query(
            f"SELECT toString(max(done_at)), count() FROM {qualified(database, DEDUPE_KEY_BACKFILLS)} "
            "WHERE key_version = {version:UInt32}", parameters={"version": KEY_VERSION}).result_rows[0]
    return f"{KEY_VERSION}@{found[0]}" if int(found[1]) else ""
