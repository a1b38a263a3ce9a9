"""Windows compaction: merge the delta rows of closed months into one row per key, one partition at a time.

What and why: docs/design.md, "Windows compaction"; the merged rows and the rules that keep them exact are
`meterline.core.compaction`; the fence against concurrent writers is `meterline.adapters.compactions`.
Steps for one partition (a month of `meter_windows`), each recorded in `window_compactions`:

    running   claimed; no announced writer was active (else: aborted, tried again next run)
              -> merged copy built in a staging table `meter_windows_compacting_<month>_<id>`, merged
                 into one part (OPTIMIZE ... FINAL)
              -> the month's 15-minute rows built from it in `..._<month>_coarse_<id>`, one part too
    swapping  watermarks recorded; no writer became active meanwhile
              -> ALTER TABLE meter_windows REPLACE PARTITION ID '<month>' FROM staging (atomic)
              -> the partition's fingerprint read, then meter_windows_coarse's month replaced the same way
              -> the month marked valid for that fingerprint in meter_windows_coarse_valid
    done      with the fingerprint: from now on queries may read the coarse rows (until a writer marks the
              month invalid); staging dropped

A kill -9 at any point is safe: before the swap the partition is untouched (the record goes stale after
the lease and the staging table is dropped by the next run); a swap either happened or not, and the
watermarks recorded before it drop only rows that the partition already holds in both cases. Coarse rows
answer only after `done` (its fingerprint), so a kill between the two swaps leaves queries on minute rows.
Running it again compacts whatever still has delta rows, or coarse rows that no longer match their month
(its fingerprint moved, or the month is not marked valid for it: a writer invalidated it, or the mark was
never written or lost).

Why merge before the swap: `INSERT ... SELECT` writes several parts whose key ranges overlap, and
`REPLACE PARTITION` moves them in as they are, so every FINAL read of the month merged them again until a
background merge caught up (measured at 10M events: the coarse read 27.5-36.3 ms over 6 parts, 7.2 ms over
one). Merged in staging, the month is one part from the instant it is swapped in. A merge (like every
statement of a compaction) may outlast half the lease: `ClaimLease.renewed` refreshes the claim from a
second thread while it runs, and a renewal that fails or comes late makes the compaction abort before
the swap, as a slow step did before (docs/design.md, "Windows compaction").

Refused on a ClickHouse cluster (Distributed tables; a partition lives on every shard and the swap would
be one per shard, not atomic) and without a late horizon (nothing is ever closed).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from meterline.adapters.clickhouse import storage_errors
from meterline.adapters.compactions import (
    LEASE_SECONDS,
    active_writers,
    partition_fingerprints,
    publish_coarse,
    published_coarse,
    read_claims,
    write_claim,
)
from meterline.adapters.meter_store import MeterCatalog
from meterline.core.compaction import (
    ABORTED,
    COMPACTED_PREFIX,
    DONE,
    FITS,
    KEY,
    RUNNING,
    SWAPPING,
    Watermarks,
    coarse_fingerprints,
    coarse_statements,
    cutoff,
    foldable,
    in_progress,
    merge_statements,
    merged_watermarks,
    partition_end,
    watermark_query,
)
from meterline.core.errors import ConfigError
from meterline.core.schema import (
    COARSE_WINDOWS,
    METER_WINDOWS,
    PARTITION_PROGRESS,
    SINGLE_NODE,
    WINDOW_COLUMNS,
    Topology,
    qualified,
    quote_identifier,
)
from meterline.jobs.background import BackgroundLoop
from meterline.settings import Settings

logger = logging.getLogger(__name__)

STAGING_PREFIX = f"{METER_WINDOWS}_compacting_"
_PARTITION = re.compile(r"^\d{6}$")


@dataclass
class PartitionResult:
    partition: str
    outcome: str  # compacted | nothing to merge | aborted: <why>
    rows_before: int = 0
    rows_after: int = 0
    seconds: float = 0.0


@dataclass
class CompactionReport:
    cutoff: datetime | None
    partitions: list[PartitionResult] = field(default_factory=list)


def active_generations(catalog: MeterCatalog) -> dict[tuple[str, str], int]:
    """Each live meter's active generation by (namespace, slug): the only rows a compaction merges
    (building ones may still be rewritten by their rebuild, deleted ones are about to go)."""
    return {key: s.latest.active_generation for key, s in catalog.states.items()
            if not s.deleted and s.latest.active_generation}


def compact_with_settings(client: Client, settings: Settings, catalog: MeterCatalog, *, owner: str = "compaction",
                          only: Sequence[str] | None = None,
                          step: Callable[[str, str], None] = lambda partition, name: None) -> CompactionReport:
    """`compact` with everything it needs from the settings and the meter catalog."""
    return compact(client, settings.clickhouse_database, active_generations(catalog),
                   late_horizon_days=settings.late_horizon_days,
                   margin=timedelta(minutes=settings.compaction_margin_minutes), topic=settings.events_topic,
                   topic_partitions=settings.topic_partitions, topology=settings.clickhouse_topology,
                   owner=owner, only=only, step=step)


class _Expired(Exception):
    """A step took longer than half the lease: writers may have taken the claim for a dead one."""


class ClaimLease:
    """One compaction's claim on its partition, kept fresh for the writers that wait on it.

    `record(state)` refreshes the record (ClickHouse's now) and refuses (`_Expired`) once more than half the
    lease passed since the last refresh: a writer may have taken the claim for a dead compactor's and written
    into the partition, so nothing read before may be swapped in. `renewed()` wraps one long statement (a
    merge, an INSERT ... SELECT of a big month): a thread refreshes the record every lease/4 while it runs,
    on the same client (it has no session, so requests may overlap). A renewal that fails or comes late
    stops the renewals and makes the next `record` refuse, so a long statement never outlives the fence
    unnoticed; a kill -9 stops the thread with the process, and the claim goes stale after the lease as before.
    """

    def __init__(self, client: Client, database: str, partition: str, compaction_id: str, *, owner: str,
                 lease_seconds: float) -> None:
        self.client, self.database, self.partition, self.compaction_id = client, database, partition, compaction_id
        self.owner, self.lease_seconds = owner, lease_seconds
        self.last = time.monotonic()
        self.lapsed = False

    def record(self, state: str, **fields: Any) -> None:
        if self.lapsed or time.monotonic() - self.last > self.lease_seconds / 2:
            self.lapsed = True
            raise _Expired(state)
        write_claim(self.client, self.database, self.partition, self.compaction_id, state, owner=self.owner,
                    **fields)
        self.last = time.monotonic()

    @contextlib.contextmanager
    def renewed(self) -> Iterator[None]:
        """Refresh the `running` record every lease/4 while the block runs (one statement, no records of its own)."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_seconds / 4):
                try:
                    self.record(RUNNING)
                except _Expired:
                    return
                except Exception:  # a failed refresh is retried; a late one ends the lease
                    logger.warning("refreshing the compaction claim failed", exc_info=True)

        thread = threading.Thread(target=renew, name=f"compaction-lease-{self.partition}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def compact(client: Client, database: str, active: Mapping[tuple[str, str], int], *, late_horizon_days: int | None,
            margin: timedelta, topic: str, topic_partitions: int, topology: Topology = SINGLE_NODE,
            owner: str = "compaction", lease_seconds: float = LEASE_SECONDS, now: datetime | None = None,
            only: Sequence[str] | None = None, step: Callable[[str, str], None] = lambda partition, name: None,
            ) -> CompactionReport:
    """Compact every closed month of `meter_windows` that still has delta rows to merge.

    `active` maps each (namespace, meter) to its active generation (the only rows merged). `only` limits the run to
    some partitions (still only closed ones). `step(partition, name)` is called after each recorded step
    (claimed, staged, swapping, swapped, coarse-swapped, published, done), for progress output and the fault test.
    """
    if topology.cluster is not None:
        raise ConfigError("windows compaction is not supported on a ClickHouse cluster (clickhouse_cluster is set):"
                          " a partition lives on every shard and could not be swapped atomically")
    if late_horizon_days is None:
        raise ConfigError("windows compaction needs late_horizon_days: without a late horizon a month never closes")
    report = CompactionReport(cutoff=_cutoff(client, database, topic, topic_partitions,
                                             timedelta(days=late_horizon_days), margin, now))
    _drop_abandoned_staging(client, database, lease_seconds)
    if report.cutoff is None:
        logger.info("nothing to compact: a partition of the topic has no progress yet", extra={"topic": topic})
        return report
    for partition, _rows in _partitions(client, database):
        if (only is not None and partition not in only) or partition_end(partition) > report.cutoff:
            continue
        started = time.monotonic()
        if not _has_deltas(client, database, partition, active) and _coarse_current(client, database, partition):
            report.partitions.append(PartitionResult(partition, "nothing to merge"))
            continue
        result = _compact_partition(client, database, partition, active, owner, lease_seconds, step)
        result.seconds = round(time.monotonic() - started, 3)
        report.partitions.append(result)
        logger.info("windows compaction", extra={"partition": partition, "outcome": result.outcome,
                                                 "rows_before": result.rows_before, "rows_after": result.rows_after})
    return report


def _cutoff(client: Client, database: str, topic: str, topic_partitions: int, late_horizon: timedelta,
            margin: timedelta, now: datetime | None) -> datetime | None:
    with storage_errors():
        rows = client.query(
            f"SELECT kafka_partition, complete_until FROM {qualified(database, PARTITION_PROGRESS)} FINAL"
            " WHERE topic = {topic:String}", parameters={"topic": topic}).result_rows
    complete = {int(p): _utc(t) for p, t in rows}
    return cutoff(now or datetime.now(UTC), [complete.get(p) for p in range(topic_partitions)], late_horizon, margin)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _partitions(client: Client, database: str) -> list[tuple[str, int]]:
    with storage_errors():
        rows = client.query(
            "SELECT partition_id, sum(rows) FROM system.parts WHERE database = {db:String} AND table = {t:String}"
            " AND active GROUP BY partition_id ORDER BY partition_id",
            parameters={"db": database, "t": METER_WINDOWS}).result_rows
    return [(str(p), int(n)) for p, n in rows if _PARTITION.match(str(p))]


def _has_deltas(client: Client, database: str, partition: str, active: Mapping[tuple[str, str], int]) -> bool:
    """Whether compacting would change the partition: a key with delta rows that fits one merged row (keys
    too big for one row stay delta rows and must not make every run compact the partition again)."""
    params: dict[str, object] = {"partition": partition}
    fold = foldable(active, params)
    source = qualified(database, METER_WINDOWS)
    raw = f"NOT startsWith(log_epoch, '{COMPACTED_PREFIX}')"
    where = f"_partition_id = {{partition:String}} AND {fold}"
    with storage_errors():
        if not int(client.query(f"SELECT count() FROM {source} WHERE {where} AND {raw}",
                                parameters=params).result_rows[0][0]):
            return False
        n = client.query(f"SELECT count() FROM (SELECT {KEY} FROM {source} FINAL WHERE {where} GROUP BY {KEY}"
                         f" HAVING {FITS} AND countIf({raw}) > 0)", parameters=params).result_rows[0][0]
    return int(n) > 0


def fingerprint(client: Client, database: str, partition: str) -> int:
    """`meter_windows`' partition fingerprint now (0: no active part)."""
    return partition_fingerprints(client, database, [partition]).get(partition, 0)


def _coarse_current(client: Client, database: str, partition: str) -> bool:
    """Whether the partition's coarse rows were built from exactly its rows (nothing written, swapped or
    deleted since the newest done compaction) and queries may read them (no writer marked the month invalid);
    if not, the partition is compacted again to rebuild them."""
    built_for = coarse_fingerprints(read_claims(client, database, [partition])).get(partition)
    return (built_for is not None and built_for == fingerprint(client, database, partition)
            and published_coarse(client, database).get(partition) == built_for)


def _drop_abandoned_staging(client: Client, database: str, lease_seconds: float) -> None:
    """Staging tables of compactions that died (no fresh record of their id)."""
    live = {c.compaction_id for c in in_progress(read_claims(client, database), lease_seconds)}
    with storage_errors():
        tables = client.query("SELECT name FROM system.tables WHERE database = {db:String} AND startsWith(name, {p:String})",
                              parameters={"db": database, "p": STAGING_PREFIX}).result_rows
        for (name,) in tables:
            if str(name).rsplit("_", 1)[-1] not in live:
                client.command(f"DROP TABLE IF EXISTS {qualified(database, quote_identifier(str(name)))}")


def _compact_partition(client: Client, database: str, partition: str, active: Mapping[tuple[str, str], int], owner: str,
                       lease_seconds: float, step: Callable[[str, str], None]) -> PartitionResult:
    cid = uuid.uuid4().hex
    source = qualified(database, METER_WINDOWS)
    staging = qualified(database, quote_identifier(f"{STAGING_PREFIX}{partition}_{cid}"))
    coarse = qualified(database, COARSE_WINDOWS)
    coarse_staging = qualified(database, quote_identifier(f"{STAGING_PREFIX}{partition}_coarse_{cid}"))
    lease = ClaimLease(client, database, partition, cid, owner=owner, lease_seconds=lease_seconds)
    record = lease.record

    def run(sql: str, params: dict[str, Any] | None = None) -> None:
        """One long statement under the claim: refreshed before, renewed while it runs."""
        record(RUNNING)
        with lease.renewed():
            client.command(sql, parameters=params)

    def blocked() -> str | None:
        """Why another party holds the partition (Dekker: checked after our own record is written)."""
        writers = active_writers(client, database, partition, lease_seconds)
        if writers:
            return f"writer {writers[0]} is active"
        others = [c for c in in_progress(read_claims(client, database, [partition]), lease_seconds)
                  if c.compaction_id != cid]
        return f"compaction {others[0].compaction_id} is in progress" if others else None

    def abort(why: str) -> PartitionResult:
        write_claim(client, database, partition, cid, ABORTED, owner=owner)
        with storage_errors():
            client.command(f"DROP TABLE IF EXISTS {staging}")
            client.command(f"DROP TABLE IF EXISTS {coarse_staging}")
        logger.info("windows compaction aborted", extra={"partition": partition, "reason": why})
        return PartitionResult(partition, f"aborted: {why}")

    record(RUNNING)
    step(partition, "claimed")
    if why := blocked():
        return abort(why)
    try:
        with storage_errors():
            client.command(f"DROP TABLE IF EXISTS {staging}")
            client.command(f"CREATE TABLE {staging} AS {source}")
            before = int(client.query(f"SELECT count() FROM {source} FINAL WHERE _partition_id = {{p:String}}",
                                      parameters={"p": partition}).result_rows[0][0])
            for sql, params in merge_statements(source, staging, WINDOW_COLUMNS, partition, active):
                run(sql, params)
            # One part, so the swap brings no overlapping parts that every FINAL read would merge (above).
            run(f"OPTIMIZE TABLE {staging} PARTITION ID '{partition}' FINAL")
            client.command(f"DROP TABLE IF EXISTS {coarse_staging}")
            client.command(f"CREATE TABLE {coarse_staging} AS {coarse}")
            for sql, params in coarse_statements(staging, coarse_staging, WINDOW_COLUMNS):
                run(sql, params)
            run(f"OPTIMIZE TABLE {coarse_staging} PARTITION ID '{partition}' FINAL")
            sql, params = watermark_query(source, partition)
            marks: Watermarks = merged_watermarks(read_claims(client, database, [partition]))
            for epoch, kp, offset in client.query(sql, parameters=params).result_rows:
                key = (str(epoch), int(kp))
                marks[key] = max(marks.get(key, -1), int(offset))
            after = int(client.query(f"SELECT count() FROM {staging}").result_rows[0][0])
        step(partition, "staged")
        record(SWAPPING, watermarks=marks, rows_before=before, rows_after=after)
    except _Expired as exc:
        return abort(f"a step took longer than half the lease before {exc}")
    step(partition, "swapping")
    if why := blocked():
        return abort(why)
    with storage_errors():
        client.command(f"ALTER TABLE {source} REPLACE PARTITION ID '{partition}' FROM {staging}")
    # Read at once: writers still wait for this compaction, so this is the fingerprint of exactly the
    # staging rows the coarse rows are built from.
    swapped = fingerprint(client, database, partition)
    step(partition, "swapped")
    with storage_errors():
        client.command(f"ALTER TABLE {coarse} REPLACE PARTITION ID '{partition}' FROM {coarse_staging}")
    step(partition, "coarse-swapped")
    # Before the done record: a query learns the fingerprint from that record only, so whenever it asks
    # for a month's coarse rows the mark is already there (or a writer has since replaced it with 0).
    publish_coarse(client, database, partition, swapped)
    step(partition, "published")
    write_claim(client, database, partition, cid, DONE, watermarks=marks, rows_before=before, rows_after=after,
                owner=owner, fingerprint=swapped)
    with storage_errors():
        client.command(f"DROP TABLE IF EXISTS {staging}")
        client.command(f"DROP TABLE IF EXISTS {coarse_staging}")
    step(partition, "done")
    return PartitionResult(partition, "compacted", before, after)


class PeriodicCompaction(BackgroundLoop):
    """`compaction_interval_seconds`: compaction as a background thread of the API process (beside the
    meter controller, whose catalog it reads), on its own ClickHouse client. A failed run is logged and
    tried again at the next interval; each run is as safe to interrupt as `meterline compact`."""

    thread_name = "windows-compaction"
    what = "windows compaction"

    def __init__(self, settings: Settings, catalog: MeterCatalog, connect: Callable[[], Client]) -> None:
        if settings.compaction_interval_seconds is None:
            raise ValueError("compaction_interval_seconds is not set")
        if settings.clickhouse_topology.cluster is not None or settings.late_horizon_days is None:
            raise ConfigError("compaction_interval_seconds needs late_horizon_days and a single ClickHouse server"
                              " (windows compaction is refused on a cluster)")
        super().__init__(settings.compaction_interval_seconds, run_at_start=False, join_seconds=60)
        self.settings, self.catalog, self.connect = settings, catalog, connect

    def run_pass(self) -> None:
        client = self.connect()
        try:
            compact_with_settings(client, self.settings, self.catalog, owner="api")
        finally:
            client.close()
