"""SQL text and bound parameters of every read of the query API: one function per query, no I/O.

Each function builds SQL from the names in `meterline.core.schema` and server-side bound parameters
(`{name:Type}`), so it is unit-tested without a server (as OpenMeter tests `meter_query.go`). Values
that come from requests are *always* bound parameters, never interpolated; only config-defined
identifiers (the database name) and constants of this module are text.

Reads use FINAL: the tables are ReplacingMergeTree, and a replayed Kafka message writes rows identical
to rows already stored; FINAL collapses them so each delta counts once (docs/design.md).

Instants are bound as UTC text ("YYYY-MM-DD HH:MM:SS[.ffffff]") with a `DateTime('UTC')`-typed
parameter, so the result never depends on the server's or the driver's time zone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from meterline.core.compaction import STALE_COARSE
from meterline.core.schema import (
    COARSE_VALID,
    COARSE_WINDOWS,
    DEAD_LETTER_COLUMNS,
    DEAD_LETTERS,
    EVENTS,
    METER_WINDOWS,
    PARTITION_PROGRESS,
    STORED_EVENT_COLUMNS,
    SUBJECT_COLUMNS,
    SUBJECTS,
    bind_if,
    join_table_name,
    qualified,
)
from meterline.core.times import format_sql_time
from query.filters import FilterString, FilterTime, filter_sql, time_filter_sql
from query.time_ranges import CoarsePlan, RangeSplit

EVENT_LIST_COLUMNS: tuple[str, ...] = (
    "id", "source", "type", "subject", "time", "data", "ingested_at", "validation_errors", "attributes",
    "stored_at", "dedupe_key",
)
DT = "DateTime('UTC')"
DT64 = "DateTime64(6, 'UTC')"
DELTA_COLUMNS = "subject, window_start, group, count, sum, min, max, uniques, latest_time, latest_value, latest_rank"
EDGE_TABLE = "meterline_edges"
#: `sum` is Decimal256(9): merged edge deltas of several messages may pass Decimal128's 10^29.
EDGE_STRUCTURE: tuple[str, ...] = (
    "subject String", "window_start UInt32", "group Map(String, String)", "count UInt64", "sum Decimal256(9)",
    "min Nullable(Decimal128(9))", "max Nullable(Decimal128(9))", "uniques Array(String)",
    "latest_time DateTime64(6, 'UTC')", "latest_value Nullable(Decimal128(9))", "latest_rank UInt64",
)
"""Columns of the edge delta rows, sent as a temporary table (JSONEachRow) with the query: as a bound
parameter they would hit the HTTP form field limit (~128 KiB) on a busy edge minute."""


@dataclass(frozen=True, slots=True)
class Query:
    """SQL text with `{name:Type}` placeholders and the values bound to them; `tables` are temporary
    tables sent with the query (name -> JSONEachRow text in EDGE_STRUCTURE), read like any table."""

    sql: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)


class Params:
    """Collects bound parameters under generated names: `bind(value, "String")` -> `{p0:String}`."""

    def __init__(self, initial: Mapping[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = dict(initial or {})
        self._n = 0

    def bind(self, value: Any, type_: str) -> str:
        name = f"p{self._n}"
        self._n += 1
        self.values[name] = value
        return f"{{{name}:{type_}}}"


def agg_name(aggregation: str | Enum) -> str:
    return str(aggregation.value if isinstance(aggregation, Enum) else aggregation)


def ts(t: datetime) -> str:
    """Whole-second UTC text for a DateTime('UTC') parameter."""
    return format_sql_time(t)


def ts6(t: datetime) -> str:
    """Microsecond UTC text for a DateTime64(6, 'UTC') parameter."""
    return format_sql_time(t, micro=True)


# -------------------------------------------------------------------------------------------------
# Meter query
# -------------------------------------------------------------------------------------------------

BUCKETS: dict[str | None, str] = {
    # Every bucket is returned as a UTC unix timestamp: unambiguous, whatever the zone.
    # toStartOfHour/Day in a zone give *local* starts (verified for :30/:45 zones and DST folds).
    None: "toUInt32(0)",
    "MINUTE": "toUnixTimestamp(window_start)",
    "HOUR": "toUnixTimestamp(toStartOfHour(window_start, {tz:String}))",
    "DAY": "toUnixTimestamp(toStartOfDay(window_start, {tz:String}))",
    # toStartOfMonth returns a Date; toDateTime(date, tz) is that date's local midnight.
    "MONTH": "toUnixTimestamp(toDateTime(toStartOfMonth(window_start, {tz:String}), {tz:String}))",
}

VALUES: dict[str, tuple[str, ...]] = {
    # Each stored column rolls up exactly (design.md "Rollups are exact").
    "COUNT": ("sum(count) AS total_count",),
    # Sums add Decimal128(9) rows as Decimal256(9): ClickHouse's sum keeps the argument's type and
    # wraps around silently once a total passes 10^29.
    "SUM": ("sum(toDecimal256(sum, 9)) AS total_sum",),
    "AVG": ("sum(toDecimal256(sum, 9)) AS total_sum", "sum(count) AS total_count"),
    "MIN": ("min(min) AS total_min",),
    "MAX": ("max(max) AS total_max",),
    "UNIQUE_COUNT": ("uniqExactArray(uniques) AS total_unique",),
    "LATEST": ("argMax(latest_value, (latest_time, latest_rank)) AS total_latest",),
}

NOT_NULL: dict[str, str] = {
    # Rows that cannot contribute are dropped before aggregation, so a bucket of such rows vanishes
    # instead of reporting a NULL value (OpenMeter skips rows whose value is NULL too).
    "MIN": "min IS NOT NULL",
    "MAX": "max IS NOT NULL",
    "LATEST": "latest_value IS NOT NULL",
}


def group_column(key: str, params: Params) -> str:
    """A group value: the map entry, or NULL when the event had no value for the key (its own bucket)."""
    if key == "subject":
        return "subject"
    k = params.bind(key, "String")
    return f"if(mapContains(group, {k}), group[{k}], NULL)"


def meter_query(
    database: str,
    meter: str,
    aggregation: str | Enum,
    *,
    split: RangeSplit,
    window_size: str | Enum | None = None,
    tz: str = "UTC",
    subjects: Sequence[str] = (),
    group_by: Sequence[str] = (),
    group_by_subject: bool = False,
    filters: Mapping[str, FilterString] | None = None,
    edges: str | None = None,
    generation: int | None = None,
    coarse: CoarsePlan | None = None,
) -> Query:
    """Aggregate one meter's minute deltas, plus the edge minutes' deltas built from raw events
    (`edges`: JSONEachRow text in EDGE_STRUCTURE, sent as the temporary table EDGE_TABLE), into buckets
    of `window_size` local to `tz`.

    `group_by` holds meter groupBy keys (not `subject`); a key missing from a row's map is NULL, its
    own bucket. `filters` maps groupBy keys (or `subject`) to FilterStrings. `coarse`: spans of closed
    months read from their 15-minute rows (`query.time_ranges.coarse_plan`); the query fails with
    `STALE_COARSE` if one of those months is no longer marked valid for the plan's fingerprint (`_valid`).
    """
    agg = agg_name(aggregation)
    size = window_size.value if isinstance(window_size, Enum) else window_size
    if agg not in VALUES:
        raise ValueError(f"unknown aggregation {agg!r}")
    if size not in BUCKETS:
        raise ValueError(f"unknown window size {size!r}")
    params = Params({"meter": meter})
    if size in ("HOUR", "DAY", "MONTH"):
        params.values["tz"] = tz

    select = [f"{BUCKETS[size]} AS bucket"]
    if size is None:  # the answer's windowStart/windowEnd when the request gave no from/to
        select.append("toUnixTimestamp(min(window_start)) AS first_window")
        select.append("toUnixTimestamp(max(window_start)) AS last_window")
    keys = ["bucket"]
    if group_by_subject:
        select.append("subject AS subject_key")
        keys.append("subject_key")
    for i, key in enumerate(group_by):
        select.append(f"{group_column(key, params)} AS group_{i}")
        keys.append(f"group_{i}")
    select.extend(VALUES[agg])

    # A zero row (count 0) replaced the window row of a retracted duplicate (meterline/core/retraction.py):
    # it must not make an empty bucket or group. Every other row counts at least one event. After FINAL.
    windows_where = ["meter = {meter:String}", "count > 0"]
    _generation(params, windows_where, generation)
    if subjects:
        params.values["subjects"] = list(subjects)
        windows_where.append("subject IN {subjects:Array(String)}")
    if coarse is None:
        if split.whole_start is not None:
            params.values["from"] = ts(split.whole_start)
            windows_where.append("window_start >= {from:DateTime('UTC')}")
        if split.whole_end is not None:
            params.values["to"] = ts(split.whole_end)
            windows_where.append("window_start < {to:DateTime('UTC')}")

    outer_where: list[str] = []
    for key, f in sorted((filters or {}).items()):
        outer_where.append(filter_sql(group_column(key, params), f, params.bind))
    if agg in NOT_NULL:
        outer_where.append(NOT_NULL[agg])

    windows = f"{qualified(database, METER_WINDOWS)} FINAL"
    if edges is None and coarse is None:
        source = windows
        where = windows_where + outer_where
    else:
        if split.whole_empty:
            parts = []
        elif coarse is None:
            parts = [f"SELECT {DELTA_COLUMNS} FROM {windows} WHERE {' AND '.join(windows_where)}"]
        else:
            parts = _coarse_parts(database, windows, windows_where, coarse, params)
        if edges is not None:
            parts.append(
                f"SELECT subject, toDateTime(window_start, 'UTC') AS window_start, group, count, sum, min, max, uniques,"
                f" latest_time, latest_value, latest_rank FROM {EDGE_TABLE}"
            )
        source = "(\n  " + "\n  UNION ALL\n  ".join(parts) + "\n)"
        where = outer_where
    sql = f"SELECT {', '.join(select)}\nFROM {source}\n"
    if where:
        sql += f"WHERE {' AND '.join(where)}\n"
    sql += f"GROUP BY {', '.join(keys)}\nORDER BY {', '.join(keys)}"
    return Query(sql, params.values, {} if edges is None else {EDGE_TABLE: edges})


def _spans(spans: Sequence[tuple[datetime | None, datetime | None]], params: Params) -> str:
    """`window_start` inside any of `spans` ([start, end), None = unbounded), as primary-key ranges."""
    out = []
    for a, b in spans:
        bounds = ([] if a is None else [f"window_start >= {params.bind(ts(a), DT)}"]) + (
            [] if b is None else [f"window_start < {params.bind(ts(b), DT)}"])
        out.append("(" + " AND ".join(bounds or ["1"]) + ")")
    return "(" + " OR ".join(out) + ")"


def _coarse_parts(database: str, windows: str, where: list[str], plan: CoarsePlan, params: Params) -> list[str]:
    """The whole minutes of a range: coarse rows for the plan's spans, minute rows for every other span."""
    spans = _spans([(a, b) for _, _, a, b in plan.coarse], params)
    base = " AND ".join(where)
    valid = " AND ".join(_valid(database, partition, fp, params) for partition, fp, _, _ in plan.coarse)
    coarse = f"SELECT {DELTA_COLUMNS} FROM {qualified(database, COARSE_WINDOWS)} FINAL WHERE {valid} AND {base} AND {spans}"
    parts = [coarse]
    if plan.minutes:
        parts.append(f"SELECT {DELTA_COLUMNS} FROM {windows} WHERE {base} AND {_spans(plan.minutes, params)}")
    return parts


def coarse_check_query(database: str, plan: CoarsePlan) -> Query:
    """Only the validity checks of `plan`'s months (`_valid`), no table read: what a kept answer
    (query/coarse_answers.py) costs instead of the query that read it. Fails with STALE_COARSE exactly when
    that query would."""
    params = Params()
    checks = " AND ".join(_valid(database, partition, fp, params) for partition, fp, _, _ in plan.coarse)
    return Query(f"SELECT {checks} AS valid", params.values)


def _valid(database: str, partition: str, fingerprint: int, params: Params) -> str:
    """True, or the query fails with STALE_COARSE: `partition` is still marked valid for `fingerprint` in
    `meter_windows_coarse_valid` (docs/design.md, "Coarse rows").

    Why this shape: every argument is a constant, so ClickHouse folds the whole expression once, while
    analysing the query, before it reads a row -- `joinGet` reads the in-memory map without a pipeline of
    its own (free, where a scalar subquery or a separate request measured 0.5-3 ms), and a stale mark turns
    `toUInt8` of the message into a parse error at once. A filter that merely came out false would not do:
    no minute row would answer instead, and an empty match never evaluates a per-row check (`throwIf` is not
    folded). One evaluation per month, so a mark that changes during the query cannot answer a month twice
    or not at all; a mark only ever leaves a fingerprint for good (0, then a later compaction's).
    """
    table = params.bind(join_table_name(database, COARSE_VALID), "String")
    expected = params.bind(fingerprint, "UInt64")
    stale = params.bind(f"{STALE_COARSE}: {partition}", "String")
    return f"toUInt8(if(joinGet({table}, 'fingerprint', {params.bind(partition, 'String')}) = {expected}, '1', {stale})) = 1"


def edge_events_query(
    database: str, event_type: str, ranges: Sequence[tuple[datetime, datetime]], subjects: Sequence[str] = (),
    *, meter: str | None = None,
) -> Query:
    """Stored raw events of one type inside the partial edge minutes, in log order, so each message's
    events arrive together for `meterline.core.rows.message_rows` (as `meterline recompute` reads them).

    `events` is sorted by (subject, time): a time range alone scans a month's partition. Without a
    subject filter, the subjects are taken from the meter's windows of the edge minutes (`meter`), which
    hold every subject that has metered events there, so the read stays a primary-key range per subject
    (measured ~5x faster on 3M events a month).
    """
    params = Params({"type": event_type})
    spans = [f"(time >= {params.bind(ts6(a), DT64)} AND time < {params.bind(ts6(b), DT64)})" for a, b in ranges]
    where = ["type = {type:String}", "(" + " OR ".join(spans) + ")"]
    if subjects:
        where.append(f"subject IN {params.bind(list(subjects), 'Array(String)')}")
    elif meter is not None:
        minutes = sorted({ts(a.replace(second=0, microsecond=0)) for a, _ in ranges})
        where.append(
            # GLOBAL: on a cluster both tables are Distributed, which ClickHouse refuses to nest in a
            # plain IN; the subject set is read once and sent to every shard.
            f"subject GLOBAL IN (SELECT subject FROM {qualified(database, METER_WINDOWS)}"
            f" WHERE meter = {params.bind(meter, 'String')}"
            f" AND window_start IN {params.bind(minutes, 'Array(DateTime(' + repr('UTC') + '))')})"
        )
    sql = (
        f"SELECT {', '.join(STORED_EVENT_COLUMNS)}\nFROM {qualified(database, EVENTS)} FINAL\n"
        f"WHERE {' AND '.join(where)}\nORDER BY log_epoch, kafka_partition, kafka_offset, batch_index"
    )
    return Query(sql, params.values)


# -------------------------------------------------------------------------------------------------
# Subjects and group-by values of a meter
# -------------------------------------------------------------------------------------------------


def _window_range(params: Params, where: list[str], start: datetime | None, end: datetime | None) -> None:
    """`from`/`to` over minute windows: every minute that overlaps [from, to]."""
    if start is not None:
        where.append(f"window_start >= {params.bind(ts(start.replace(second=0, microsecond=0)), DT)}")
    if end is not None:
        where.append(f"window_start <= {params.bind(ts(end), DT)}")


def _generation(params: Params, where: list[str], generation: int | None) -> None:
    """Only the meter's active generation answers (docs/design.md, "Live meters")."""
    if generation is not None:
        where.append(f"generation = {params.bind(generation, 'UInt64')}")


def subjects_query(database: str, meter: str, *, start: datetime | None = None, end: datetime | None = None,
                   generation: int | None = None) -> Query:
    """Distinct subjects with data for a meter. No FINAL: duplicates cannot change a DISTINCT set."""
    return _distinct(database, "subject", "subject", Params({"meter": meter}), ["meter = {meter:String}"],
                     start, end, generation)


def group_values_query(
    database: str, meter: str, key: str, *, start: datetime | None = None, end: datetime | None = None,
    generation: int | None = None,
) -> Query:
    """Distinct values of one groupBy key (rows without the key have no value to list)."""
    return _distinct(database, "group[{key:String}] AS value", "value", Params({"meter": meter, "key": key}),
                     ["meter = {meter:String}", "mapContains(group, {key:String})"], start, end, generation)


def _distinct(
    database: str, select: str, order_by: str, params: Params, where: list[str],
    start: datetime | None, end: datetime | None, generation: int | None,
) -> Query:
    """`SELECT DISTINCT` over one meter's windows in the active generation and [start, end]."""
    _generation(params, where, generation)
    _window_range(params, where, start, end)
    sql = (
        f"SELECT DISTINCT {select}\nFROM {qualified(database, METER_WINDOWS)}\n"
        f"WHERE {' AND '.join(where)}\nORDER BY {order_by}"
    )
    return Query(sql, params.values)


# -------------------------------------------------------------------------------------------------
# Events and dead letters
# -------------------------------------------------------------------------------------------------


def _inclusive_range(
    params: dict[str, Any], where: list[str], column: str, start: datetime | None, end: datetime | None,
    names: tuple[str, str] = ("from", "to"),
) -> None:
    """Bind `start <= column <= end` on a DateTime64(6, 'UTC') column, each side only when given, as the
    parameters `names`."""
    low, high = names
    bind_if(params, where, low, None if start is None else ts6(start), f"{column} >= {{{low}:DateTime64(6, 'UTC')}}")
    bind_if(params, where, high, None if end is None else ts6(end), f"{column} <= {{{high}:DateTime64(6, 'UTC')}}")


def _listing(
    database: str, table: str, columns: Sequence[str], where: list[str], order_by: str, params: dict[str, Any]
) -> Query:
    """A newest-first list read: `SELECT columns FROM table FINAL [WHERE ...] ORDER BY ... LIMIT {limit}`."""
    sql = f"SELECT {', '.join(columns)}\nFROM {qualified(database, table)} FINAL\n"
    if where:
        sql += f"WHERE {' AND '.join(where)}\n"
    sql += f"ORDER BY {order_by}\nLIMIT {{limit:UInt32}}"
    return Query(sql, params)


def events_query(
    database: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    subject: str | None = None,
    limit: int = 100,
    ingested_from: datetime | None = None,
    ingested_to: datetime | None = None,
    id_contains: str | None = None,
    subject_contains: str | None = None,
) -> Query:
    """Newest accepted events first (OpenMeter's listEvents): `from`/`to` and `ingestedAtFrom`/`To` are
    inclusive; `id` and `subject` match partially (the spec: "Accepts partial ID/subject"); `subject`
    here is an exact match for callers that need one."""
    params: dict[str, Any] = {"limit": int(limit)}
    where: list[str] = []
    _inclusive_range(params, where, "time", start, end)
    _inclusive_range(params, where, "ingested_at", ingested_from, ingested_to, ("ingested_from", "ingested_to"))
    bind_if(params, where, "subject", subject, "subject = {subject:String}")
    bind_if(params, where, "subject_part", subject_contains, "position(subject, {subject_part:String}) > 0")
    bind_if(params, where, "id_part", id_contains, "position(id, {id_part:String}) > 0")
    return _listing(database, EVENTS, EVENT_LIST_COLUMNS, where, "time DESC, ingested_at DESC, id DESC", params)


EVENT_FILTER_COLUMNS = {"id": "id", "source": "source", "subject": "subject", "type": "type",
                        "time": "time", "ingestedAt": "ingested_at"}


def events_v2_query(
    database: str,
    *,
    filters: Mapping[str, FilterString | FilterTime],
    cursor: tuple[datetime, bytes] | None = None,
    limit: int = 100,
) -> Query:
    """`GET /api/v2/events`: filters on id/source/subject/type (FilterString) and time/ingestedAt
    (FilterTime), newest first, keyset-paginated on (time, dedupe_key) so a page never repeats or
    skips an event, however many share one time."""
    params = Params({"limit": int(limit)})
    where: list[str] = []
    for name, f in sorted(filters.items()):
        column = EVENT_FILTER_COLUMNS[name]
        if isinstance(f, FilterTime):
            where.append(time_filter_sql(column, f, params.bind))
        else:
            where.append(filter_sql(column, f, params.bind))
    if cursor is not None:
        t = params.bind(ts6(cursor[0]), DT64)
        k = params.bind(cursor[1].hex(), "String")
        where.append(f"(time < {t} OR (time = {t} AND dedupe_key < unhex({k})))")
    return _listing(database, EVENTS, EVENT_LIST_COLUMNS, where, "time DESC, dedupe_key DESC", params.values)


def dead_letters_query(
    database: str,
    *,
    meter: str | None = None,
    reason_code: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = 100,
) -> Query:
    """Newest dead letters first; `from`/`to` bound `received_at` (when metering failed), inclusive."""
    params: dict[str, Any] = {"limit": int(limit)}
    where: list[str] = []
    bind_if(params, where, "meter", meter, "meter = {meter:String}")
    bind_if(params, where, "reason_code", reason_code, "reason_code = {reason_code:String}")
    _inclusive_range(params, where, "received_at", start, end)
    order_by = "received_at DESC, log_epoch, kafka_partition, kafka_offset, batch_index, meter"
    return _listing(database, DEAD_LETTERS, DEAD_LETTER_COLUMNS, where, order_by, params)


# -------------------------------------------------------------------------------------------------
# Subjects (OpenMeter's subject entities) and debug counts
# -------------------------------------------------------------------------------------------------


def subject_entities_query(
    database: str, namespace: str, *, keys: Sequence[str] | None = None, id_or_key: str | None = None
) -> Query:
    """Live (not deleted) subjects of a namespace, newest version of each key, ordered by key."""
    params = Params({"namespace": namespace})
    where = ["namespace = {namespace:String}", "deleted_at IS NULL"]
    if keys is not None:
        where.append(f"key IN {params.bind(list(keys), 'Array(String)')}")
    if id_or_key is not None:
        value = params.bind(id_or_key, "String")
        where.append(f"(key = {value} OR id = {value})")
    sql = (
        f"SELECT {', '.join(SUBJECT_COLUMNS)}\nFROM {qualified(database, SUBJECTS)} FINAL\n"
        f"WHERE {' AND '.join(where)}\nORDER BY key"
    )
    return Query(sql, params.values)


def ingested_counts_query(database: str, since: datetime) -> Query:
    """Events ingested since `since`, per subject (`GET /api/v1/debug/metrics`)."""
    sql = (
        f"SELECT subject, count() AS events\nFROM {qualified(database, EVENTS)} FINAL\n"
        "WHERE ingested_at >= {since:DateTime64(6, 'UTC')}\nGROUP BY subject\nORDER BY subject"
    )
    return Query(sql, {"since": ts6(since)})


def complete_until_query(database: str, topic: str, partitions: int) -> Query:
    """How many of the topic's partitions report progress, and the earliest instant before which each
    has written everything the broker acknowledged (processor/progress.py)."""
    sql = (
        "SELECT count(), min(complete_until) "
        f"FROM {qualified(database, PARTITION_PROGRESS)} FINAL "
        "WHERE topic = {topic:String} AND kafka_partition < {partitions:UInt32}"
    )
    return Query(sql, {"topic": topic, "partitions": partitions})
