"""Windows compaction, the pure part: which partitions may be compacted, what the merged rows are, and
which rows a writer must drop afterwards (docs/design.md, "Windows compaction").

`meter_windows` holds one delta row per source message x meter x subject x minute x group; a query reads
them all with FINAL, so a heavy subject's month costs one row per message. Compaction rewrites one
ClickHouse partition (a month, `toYYYYMM(window_start)`) so that every (meter, generation, namespace,
subject, minute, group) has one row, and swaps it in with `REPLACE PARTITION` (atomic per partition).

Why every aggregation stays exact: each column already rolls up exactly across rows (design.md, "Rollups
are exact"), and the merged row is that roll-up: count and sum add (the sum in Decimal256; a key whose
total does not fit Decimal128(9) keeps its delta rows), min/max take min/max, uniques keep the distinct
union, and LATEST keeps the (time, rank) maximum among the rows with a value together with its value --
exactly what the query's `argMax(latest_value, (latest_time, latest_rank))` over non-NULL rows picks.

Why rows keep their identity: a merged row's position is `compacted:<namespace>`, offset 0 -- one per key
and namespace (namespace is not in the sorting key, so it must be in the identity), never a Kafka epoch.
What is NOT folded (copied unchanged): rows of generations other than the meter's active one (a building
generation's rebuild may still write rows that overlap the live path's, and only raw rows collapse by
identity) and dead-letter replay rows (`replay:` epochs: a later replay rewrites them by identity).

Coarse rows: the same compaction also writes the month as 15-minute rows into `meter_windows_coarse`
(`coarse_statements`), one per (meter, generation, namespace, subject, quarter, group), built from the
very rows it swaps into `meter_windows`, and swapped in after them. A query may read a month's coarse rows
instead of its minute rows only while that month of `meter_windows` is exactly what they were built from:
the newest done compaction of the month records the partition's **fingerprint** (`FINGERPRINT`: the
largest block number or data version of its active parts) right after its swap, and marks the month valid
for it in `meter_windows_coarse_valid`; every writer that passes the fence into the month replaces that
mark with 0 before its first write (meterline/adapters/compactions.py). A query checks the mark inside its
own SQL (`STALE_COARSE`), and the compaction also compares the fingerprint itself (every insert, swap or
mutation raises it, merges never do) before it calls a month's coarse rows current.

Why a replay after compaction cannot double count: the compaction records per (log epoch, Kafka
partition) the highest offset among the rows it read (`watermarks`). Every writer of a partition writes
its messages in offset order, so every message at or below the watermark was already in the partition:
a row of it written again is a replay and is dropped (`replayed`); a new message (above it) is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

#: Position prefix of merged rows; the namespace follows (`compacted:default`).
COMPACTED_PREFIX = "compacted:"
#: Position prefix of coarse rows (`meter_windows_coarse`); the namespace follows (`coarse:default`).
COARSE_PREFIX = "coarse:"
#: Position prefix of dead-letter replay rows (meterline/jobs/deadletters.py): never folded.
REPLAY_PREFIX = "replay:"
#: The error a query raises, before reading anything, when a month it reads from coarse rows is no longer
#: marked valid for the fingerprint it expected (query/sql.py: a constant folded at analysis whose failure
#: is this text failing to parse as a number); the query API then reads that month's minute rows.
STALE_COARSE = "meterline: coarse rows no longer valid"
#: Largest |sum| a Decimal128(9) row holds (29 integer digits).
SUM_LIMIT = "100000000000000000000000000000"

# States of a compaction record, in order. `swapping` carries the watermarks and is written before the
# swap: a crash after it leaves it unknown whether the swap happened, and the watermarks are safe either way.
RUNNING, SWAPPING, DONE, ABORTED = "running", "swapping", "done", "aborted"
ACTIVE, FINISHED = "active", "finished"

Watermarks = dict[tuple[str, int], int]
"""(log_epoch, kafka_partition) -> highest offset in a compacted partition when it was compacted."""


def partition_id(window_start: datetime) -> str:
    """The `meter_windows` partition of a window (`toYYYYMM(window_start)`)."""
    return f"{window_start.year:04d}{window_start.month:02d}"


def partition_end(partition: str) -> datetime:
    """The first instant after a partition's month (UTC)."""
    year, month = int(partition[:4]), int(partition[4:6])
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def cutoff(now: datetime, complete_until: Iterable[datetime | None], late_horizon: timedelta,
           margin: timedelta) -> datetime | None:
    """Partitions ending at or before this instant are closed for good (None: none is).

    A message the processor has not written yet has a broker timestamp at or after the oldest partition's
    `complete_until`, and its windows are at most `late_horizon` older than that timestamp (older events
    are dead-lettered as too late), so no unwritten message can add a window before
    `complete_until - late_horizon`. `margin` absorbs clock skew between hosts. A partition of the topic
    without progress yet (None) means nothing is known to be complete.
    """
    known = list(complete_until)
    if not known or any(c is None for c in known):
        return None
    oldest = min([now, *(c for c in known if c is not None)])
    return oldest - late_horizon - margin


def may_be_claimed(partition: str, now: datetime, late_horizon: timedelta, margin: timedelta) -> bool:
    """Whether a writer must look for compactions of `partition` before writing into it.

    The compaction only claims partitions ending before `now - late_horizon - margin` on its clock; a
    writer checks from half the margin on, so clocks may differ by up to half the margin.
    """
    return partition_end(partition) <= now - late_horizon - margin / 2


@dataclass(frozen=True, slots=True)
class Claim:
    """One compaction of one partition as recorded in `window_compactions` (newest state)."""

    partition: str
    compaction_id: str
    state: str
    age_seconds: float
    watermarks: Watermarks = field(default_factory=dict)
    fingerprint: int = 0

    def fresh(self, lease_seconds: float) -> bool:
        """Its compactor is alive (it refreshes the record more often than the lease)."""
        return self.age_seconds < lease_seconds


def in_progress(claims: Iterable[Claim], lease_seconds: float) -> list[Claim]:
    """Compactions that may still read or swap their partition: running or swapping, and not stale."""
    return [c for c in claims if c.state in (RUNNING, SWAPPING) and c.fresh(lease_seconds)]


def merged_watermarks(claims: Iterable[Claim]) -> Watermarks:
    """Per partition position, the highest watermark of every compaction that recorded one."""
    out: Watermarks = {}
    for c in claims:
        if c.state in (SWAPPING, DONE):
            for key, offset in c.watermarks.items():
                out[key] = max(out.get(key, -1), offset)
    return out


def coarse_fingerprints(claims: Iterable[Claim]) -> dict[str, int]:
    """Per partition, the fingerprint its coarse rows were built for: the newest done compaction's, when
    it built them (0: a compaction from before coarse rows, or none). Only while `meter_windows` still
    has that fingerprint (`fingerprint_query`) do the coarse rows equal its minute rows."""
    newest: dict[str, Claim] = {}
    for c in claims:
        if c.state == DONE and (c.partition not in newest or c.age_seconds < newest[c.partition].age_seconds):
            newest[c.partition] = c
    return {p: c.fingerprint for p, c in newest.items() if c.fingerprint}


def replayed(epoch: str, kafka_partition: int, kafka_offset: int, watermarks: Mapping[tuple[str, int], int]) -> bool:
    """A row at this position was already in its partition when it was compacted: writing it again
    would add it a second time. (Merged and dead-letter replay rows never carry a Kafka epoch.)"""
    return kafka_offset <= watermarks.get((epoch, kafka_partition), -1)


# -- SQL (no I/O: meterline.jobs.compaction runs it) --------------------------------------------------

KEY = "meter, subject, window_start, group_key, generation, namespace"

#: The merged row in WINDOW_COLUMNS order (`group` is a function of `group_key`: any one is the one).
MERGED_COLUMNS = (
    "meter", "subject", "window_start", "group_key", "any(group)",
    f"concat('{COMPACTED_PREFIX}', namespace)", "toUInt32(0)", "toUInt64(0)",
    "sum(count)", "CAST(sum(toDecimal256(sum, 9)) AS Decimal128(9))", "min(min)", "max(max)",
    "arraySort(groupUniqArrayArray(uniques))",
    "tupleElement(maxIf((latest_time, latest_rank), latest_value IS NOT NULL), 1)",
    "argMaxIf(latest_value, (latest_time, latest_rank), latest_value IS NOT NULL)",
    "tupleElement(maxIf((latest_time, latest_rank), latest_value IS NOT NULL), 2)",
    "generation", "namespace",
)
FITS = f"abs(sum(toDecimal256(sum, 9))) < toDecimal256('{SUM_LIMIT}', 9)"


def foldable(active: Mapping[tuple[str, str], int], params: dict[str, Any]) -> str:
    """Condition of the rows a compaction merges: the meter's active generation in the row's namespace
    (`active`: (namespace, slug) -> generation), not a dead-letter replay row."""
    params["active"] = sorted((ns, slug, generation) for (ns, slug), generation in active.items())
    return (f"NOT startsWith(log_epoch, '{REPLAY_PREFIX}') "
            "AND (namespace, meter, generation) IN {active:Array(Tuple(String, String, UInt64))}")


def merge_statements(source: str, staging: str, columns: Sequence[str], partition: str,
                     active: Mapping[tuple[str, str], int]) -> list[tuple[str, dict[str, Any]]]:
    """INSERTs that fill `staging` with the compacted partition: merged rows of every foldable key whose
    sum fits, and every other row unchanged (read with FINAL, so duplicates collapse on the way)."""
    params: dict[str, Any] = {"partition": partition}
    fold = foldable(active, params)
    names = ", ".join(columns)
    where = "_partition_id = {partition:String}"
    merged = (
        f"INSERT INTO {staging} ({names})\nSELECT {', '.join(MERGED_COLUMNS)}\nFROM {source} FINAL\n"
        f"WHERE {where} AND {fold}\nGROUP BY {KEY}\nHAVING {FITS}"
    )
    too_big = f"SELECT {KEY} FROM {source} FINAL WHERE {where} AND {fold} GROUP BY {KEY} HAVING NOT ({FITS})"
    kept = (
        f"INSERT INTO {staging} ({names})\nSELECT {names}\nFROM {source} FINAL\n"
        f"WHERE {where} AND (NOT ({fold}) OR ({KEY}) IN ({too_big}))"
    )
    return [(merged, params), (kept, params)]


def watermark_query(source: str, partition: str) -> tuple[str, dict[str, Any]]:
    """Highest offset per (log epoch, Kafka partition) among the partition's rows from the live path."""
    sql = (
        f"SELECT log_epoch, kafka_partition, max(kafka_offset) FROM {source}\n"
        "WHERE _partition_id = {partition:String}"
        f" AND NOT startsWith(log_epoch, '{COMPACTED_PREFIX}') AND NOT startsWith(log_epoch, '{REPLAY_PREFIX}')\n"
        "GROUP BY log_epoch, kafka_partition"
    )
    return sql, {"partition": partition}


# -- Coarse rows ---------------------------------------------------------------------------------------

#: The quarter hour of a minute row: every UTC offset in use is a multiple of 15 minutes, so a 15-minute row
#: lies inside one local hour, day and month of every zone whose offset is such a multiple.
QUARTER = "toStartOfFifteenMinutes(window_start)"
COARSE_KEY = f"meter, subject, {QUARTER}, group_key, generation, namespace"
#: The coarse row in WINDOW_COLUMNS order: the merged row of a quarter instead of a minute.
COARSE_COLUMNS = tuple(
    QUARTER if c == "window_start" else f"concat('{COARSE_PREFIX}', namespace)" if c.startswith("concat(") else c
    for c in MERGED_COLUMNS
)
#: `meter_windows`' partition fingerprint: the largest block number or data version among its active parts.
#: An insert or a swap adds parts with new block numbers and a mutation (DELETE) new data versions; a merge
#: keeps the largest of both, so the value changes exactly when the partition's rows may have.
FINGERPRINT = "max(greatest(max_block_number, data_version))"


def coarse_statements(staging: str, coarse_staging: str, columns: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """INSERTs that fill `coarse_staging` from a compaction's finished `staging` (the partition as it will be
    swapped in): one merged row per quarter of every key whose quarter total fits, and the rows of every
    other (key, quarter) unchanged -- a minute row lies inside its quarter, so a query over whole quarters
    reads it the same way. Every row of the partition is included, whatever its generation or epoch."""
    names = ", ".join(columns)
    merged = (
        f"INSERT INTO {coarse_staging} ({names})\nSELECT {', '.join(COARSE_COLUMNS)}\nFROM {staging} FINAL\n"
        f"GROUP BY {COARSE_KEY}\nHAVING {FITS}"
    )
    too_big = f"SELECT {COARSE_KEY} FROM {staging} FINAL GROUP BY {COARSE_KEY} HAVING NOT ({FITS})"
    kept = (
        f"INSERT INTO {coarse_staging} ({names})\nSELECT {names}\nFROM {staging} FINAL\n"
        f"WHERE ({COARSE_KEY}) IN ({too_big})"
    )
    return [(merged, {}), (kept, {})]


def fingerprint_query(database: str, table: str, partitions: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The current fingerprint of each of `table`'s `partitions` (those with active parts)."""
    sql = (
        f"SELECT partition_id, {FINGERPRINT} FROM system.parts WHERE database = {{db:String}}"
        " AND table = {table:String} AND active AND partition_id IN {partitions:Array(String)} GROUP BY partition_id"
    )
    return sql, {"db": database, "table": table, "partitions": sorted(partitions)}
