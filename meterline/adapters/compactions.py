"""The fence between windows compaction and every other writer of old `meter_windows` partitions.

A compaction reads a partition, builds its merged copy and swaps it in with `REPLACE PARTITION`, which
replaces *every* part of the partition: a row written between the read and the swap would be lost, and a
replayed row written after the swap would be counted a second time (docs/design.md, "Windows compaction").
Two small tables make the two sides see each other without a lock server:

* `window_compactions`: the compactor records `running` before it reads a partition, `swapping` (with
  its watermarks) before the swap, `done` after it, refreshing the record between steps.
* `window_writers`: a writer that may touch an old partition (the processor's replays, a rebuild,
  `meterline recompute`, dead-letter replay, the drop of old generations) records itself `active` before
  it looks for compactions, and `finished` when its writes are done.

Each side first writes its own record and only then reads the other's (Dekker's rule): on one server
whatever one side wrote before reading is visible to the other's later read, so at least one of them
sees the other. A compactor that sees an active writer aborts (the partition is tried again next run);
a writer that sees a compaction in progress waits for it, then drops the rows at or below the watermarks
(replays of what the compaction already merged). A record not refreshed within the lease belongs to a
process that died (kill -9) and is ignored. Timestamps are ClickHouse's (`now64()`), so host clocks
never meet.

The fence also keeps coarse rows honest: a writer that passed it marks every month with coarse rows it
is about to write into as invalid in `meter_windows_coarse_valid` (`invalidate_coarse`) before its first
write, so the next query reads that month's minute rows without a check of its own (docs/design.md,
"Coarse rows"); the compaction marks a month valid again (`publish_coarse`) once it rebuilt its rows.

On a ClickHouse cluster compaction is refused (meterline/jobs/compaction.py), so there is nothing to fence.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from meterline.adapters.clickhouse import storage_errors
from meterline.core.compaction import (
    ACTIVE,
    FINISHED,
    Claim,
    coarse_fingerprints,
    fingerprint_query,
    in_progress,
    may_be_claimed,
    merged_watermarks,
    partition_id,
    replayed,
)
from meterline.core.errors import StorageError
from meterline.core.schema import (
    COARSE_VALID,
    METER_WINDOWS,
    WINDOW_COLUMNS,
    WINDOW_COMPACTION_COLUMNS,
    WINDOW_COMPACTIONS,
    WINDOW_WRITER_COLUMNS,
    WINDOW_WRITERS,
    qualified,
)
from meterline.settings import Settings

logger = logging.getLogger(__name__)

#: A compactor refreshes its record more often than this, a writer finishes within it; older records
#: belong to a process that died.
LEASE_SECONDS = 60.0
#: `window_writers.partitions` of a writer that may touch any partition.
EVERY_PARTITION = "*"

_START, _EPOCH = WINDOW_COLUMNS.index("window_start"), WINDOW_COLUMNS.index("log_epoch")


def read_claims(client: Client, database: str, partitions: Sequence[str] | None = None) -> list[Claim]:
    """The newest record of every compaction (of `partitions`), with its age on ClickHouse's clock."""
    sql = (f"SELECT partition, compaction_id, state, watermarks, dateDiff('millisecond', updated_at, now64(6)),"
           " fingerprint"
           f" FROM {qualified(database, WINDOW_COMPACTIONS)} FINAL")
    params: dict[str, Any] = {}
    if partitions is not None:
        sql += " WHERE partition IN {partitions:Array(String)}"
        params["partitions"] = sorted(partitions)
    with storage_errors():
        rows = client.query(sql, parameters=params).result_rows
    return [Claim(str(p), str(cid), str(state), int(age) / 1000, {(str(e), int(kp)): int(o) for e, kp, o in wm},
                  int(fp)) for p, cid, state, wm, age, fp in rows]


def write_claim(client: Client, database: str, partition: str, compaction_id: str, state: str, *,
                watermarks: dict[tuple[str, int], int] | None = None, rows_before: int = 0, rows_after: int = 0,
                owner: str = "", fingerprint: int = 0) -> None:
    """Record (or refresh) a compaction's state; `updated_at` is ClickHouse's now. `fingerprint` (done
    only): the partition's right after the swaps, when coarse rows were swapped in with it."""
    marks = [(e, kp, o) for (e, kp), o in sorted((watermarks or {}).items())]
    with storage_errors():
        client.insert(qualified(database, WINDOW_COMPACTIONS),
                      [[partition, compaction_id, state, marks, rows_before, rows_after, owner, fingerprint]],
                      column_names=list(WINDOW_COMPACTION_COLUMNS), settings={"async_insert": 0})


def publish_coarse(client: Client, database: str, partition: str, fingerprint: int) -> None:
    """Let queries read `partition`'s coarse rows, built for `fingerprint` (the compaction, after both swaps
    and before its done record: a query only knows the fingerprint from that record)."""
    _set_coarse(client, database, [(partition, fingerprint)])


def invalidate_coarse(client: Client, database: str, partitions: Iterable[str]) -> None:
    """Make queries read these months from their minute rows until the next compaction rebuilds their coarse
    rows: a writer, after passing the fence and before writing into them. 0 is no fingerprint."""
    _set_coarse(client, database, [(p, 0) for p in sorted(set(partitions))])


def _set_coarse(client: Client, database: str, rows: Sequence[tuple[str, int]]) -> None:
    if rows:
        with storage_errors():
            client.insert(qualified(database, COARSE_VALID), [list(r) for r in rows],
                          column_names=["partition", "fingerprint"], settings={"async_insert": 0})


def partition_fingerprints(client: Client, database: str, partitions: Sequence[str]) -> dict[str, int]:
    """`meter_windows`' current fingerprint of each of `partitions` that has active parts."""
    if not partitions:
        return {}
    sql, params = fingerprint_query(database, METER_WINDOWS, partitions)
    with storage_errors():
        return {str(p): int(fp) for p, fp in client.query(sql, parameters=params).result_rows}


def published_coarse(client: Client, database: str) -> dict[str, int]:
    """Partition -> the fingerprint its coarse rows are marked valid for (absent or 0: not valid)."""
    with storage_errors():
        rows = client.query(f"SELECT partition, fingerprint FROM {qualified(database, COARSE_VALID)}").result_rows
    return {str(p): int(fp) for p, fp in rows}


def active_writers(client: Client, database: str, partition: str, lease_seconds: float = LEASE_SECONDS) -> list[str]:
    """Writers that announced writes into `partition` (or any) and have not finished or died."""
    sql = (f"SELECT writer FROM {qualified(database, WINDOW_WRITERS)} FINAL WHERE state = '{ACTIVE}'"
           " AND dateDiff('millisecond', updated_at, now64(6)) < {lease:UInt64}"
           f" AND (has(partitions, {{p:String}}) OR has(partitions, '{EVERY_PARTITION}'))")
    with storage_errors():
        rows = client.query(sql, parameters={"p": partition, "lease": int(lease_seconds * 1000)}).result_rows
    return [str(r[0]) for r in rows]


def _announce(client: Client, database: str, writer: str, partitions: Sequence[str], state: str) -> None:
    with storage_errors():
        client.insert(qualified(database, WINDOW_WRITERS), [[writer, sorted(partitions), state]],
                      column_names=list(WINDOW_WRITER_COLUMNS), settings={"async_insert": 0})


class WriterFence:
    """An announced writer: `refresh()` it at least every lease/4 while writing (cheap when not due)."""

    def __init__(self, client: Client, database: str, writer: str, partitions: Sequence[str],
                 lease_seconds: float) -> None:
        self.client, self.database, self.writer, self.partitions = client, database, writer, list(partitions)
        self.lease_seconds = lease_seconds
        self._refreshed = time.monotonic()

    def refresh(self) -> None:
        if time.monotonic() - self._refreshed >= self.lease_seconds / 4:
            _announce(self.client, self.database, self.writer, self.partitions, ACTIVE)
            self._refreshed = time.monotonic()


@contextlib.contextmanager
def fenced_writes(client: Client, database: str, owner: str, *, enabled: bool = True,
                  lease_seconds: float = LEASE_SECONDS, poll_seconds: float = 0.5) -> Iterator[WriterFence | None]:
    """Around a job's writes into any `meter_windows` partition: announce them, then wait until no
    compaction is in progress (at most about a lease: a dead compactor's record goes stale).

    `enabled` False (a cluster, where compaction is refused) yields None and touches nothing.
    """
    if not enabled:
        yield None
        return
    writer = f"{owner}:{uuid.uuid4().hex}"
    _announce(client, database, writer, [EVERY_PARTITION], ACTIVE)
    try:
        while True:
            claims = read_claims(client, database)
            if not (busy := in_progress(claims, lease_seconds)):
                break
            logger.info("waiting for windows compaction to finish", extra={"partitions": [c.partition for c in busy]})
            time.sleep(poll_seconds)
        # No compaction runs now and none can finish before this writer does (it would see the writer and
        # abort): months with coarse rows are marked invalid before the first write, for good.
        invalidate_coarse(client, database, coarse_fingerprints(claims))
        yield WriterFence(client, database, writer, [EVERY_PARTITION], lease_seconds)
    finally:
        with contextlib.suppress(StorageError):  # a stale record is ignored after the lease anyway
            _announce(client, database, writer, [EVERY_PARTITION], FINISHED)


class ReplayGuard:
    """The processor side: window rows of old partitions pass the fence before they are inserted.

    Only rows in a partition a compaction may have claimed (`may_be_claimed`) cost anything -- a replayed
    message, or a worker lagging by more than the late horizon; rows of recent partitions pass untouched.
    """

    def __init__(self, database: str, late_horizon: timedelta, margin: timedelta, owner: str,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.database, self.late_horizon, self.margin, self.owner = database, late_horizon, margin, owner
        self.lease_seconds = lease_seconds
        self.dropped = 0

    def old_partitions(self, rows: Sequence[Sequence[Any]], now: datetime | None = None) -> set[str]:
        now = now or datetime.now(UTC)
        parts = {partition_id(r[_START]) for r in rows}
        return {p for p in parts if may_be_claimed(p, now, self.late_horizon, self.margin)}

    @contextlib.contextmanager
    def admit(self, client: Client, rows: Sequence[Sequence[Any]]) -> Iterator[Sequence[Sequence[Any]]]:
        """Yield the rows to insert (inside the block): replays of compacted positions are left out.

        Raises `StorageError` (the sink retries with backoff) while a compaction of one of the rows'
        partitions is in progress.
        """
        old = self.old_partitions(rows)
        if not old:
            yield rows
            return
        writer = f"{self.owner}:{uuid.uuid4().hex}"
        _announce(client, self.database, writer, sorted(old), ACTIVE)
        try:
            claims = read_claims(client, self.database, sorted(old))
            busy = in_progress(claims, self.lease_seconds)
            if busy:
                raise StorageError(f"meter_windows partition {busy[0].partition} is being compacted")
            marks = {p: merged_watermarks(c for c in claims if c.partition == p) for p in old}
            kept = [r for r in rows if (p := partition_id(r[_START])) not in old
                    or not replayed(str(r[_EPOCH]), int(r[_EPOCH + 1]), int(r[_EPOCH + 2]), marks[p])]
            # Before the insert: a compacted month these rows change answers from its minute rows from now on.
            written = {partition_id(r[_START]) for r in kept} & set(coarse_fingerprints(claims))
            invalidate_coarse(client, self.database, written)
            if len(kept) < len(rows):
                self.dropped += len(rows) - len(kept)
                logger.info("replayed window rows of compacted partitions dropped",
                            extra={"rows": len(rows) - len(kept), "partitions": sorted(old)})
            yield kept
        finally:
            with contextlib.suppress(StorageError):
                _announce(client, self.database, writer, sorted(old), FINISHED)


def replay_guard(settings: Settings, owner: str) -> ReplayGuard | None:
    """The processor's guard, or None where compaction cannot run (no late horizon, or a cluster)."""
    if settings.late_horizon_days is None or settings.clickhouse_topology.cluster is not None:
        return None
    return ReplayGuard(settings.clickhouse_database, timedelta(days=settings.late_horizon_days),
                       timedelta(minutes=settings.compaction_margin_minutes), owner)
