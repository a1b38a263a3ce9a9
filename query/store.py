"""Runs the query API's reads (`query.sql`) on one clickhouse-connect client.

SQL text lives in `query.sql`, JSON shapes in `query.shapes`; this module only executes, reads results
column-wise and turns driver errors into `StorageError` (or a 400 when ClickHouse rejects a request
value, such as a time zone its own database lacks).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, NamedTuple

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.external import ExternalData

from meterline.adapters.clickhouse import storage_errors
from meterline.adapters.compactions import published_coarse
from meterline.core.access import DEFAULT_NAMESPACE
from meterline.core.compaction import STALE_COARSE
from meterline.core.decimals import average
from meterline.core.errors import InvalidQueryError, StorageError
from meterline.core.meters import Meter
from meterline.core.schema import NAMESPACED_TABLES, SUBJECTS, Topology, storage_name
from query.coarse import CoarseMonths
from query.coarse_answers import CoarseAnswers
from query.complete_until import CompleteUntil
from query.cost import check_cost
from query.edges import edge_deltas, edge_json, merge_deltas
from query.filters import FilterString
from query.shapes import dead_letter
from query.sql import (
    EDGE_STRUCTURE,
    Query,
    agg_name,
    coarse_check_query,
    complete_until_query,
    dead_letters_query,
    edge_events_query,
    group_values_query,
    meter_query,
    subjects_query,
)
from query.time_ranges import CoarsePlan, RangeSplit, coarse_plan, size_name, split_range

log = logging.getLogger(__name__)

_VALUE_COLUMN: dict[str, str] = {
    "COUNT": "total_count", "SUM": "total_sum", "MIN": "total_min", "MAX": "total_max",
    "UNIQUE_COUNT": "total_unique", "LATEST": "total_latest",
}


class MeterRow(NamedTuple):
    """One aggregated bucket: `bucket` is the UTC bucket start (None when no window size was asked);
    `first_window`/`last_window` are the earliest/latest minutes aggregated, only when no window size
    was asked.

    A NamedTuple rather than a frozen dataclass: built ~6x faster, which shows on 720-row answers.
    """

    bucket: datetime | None
    first_window: datetime | None
    subject: str | None
    group: dict[str, str | None]
    value: Decimal
    last_window: datetime | None = None


def meter_values(aggregation: str | Enum, columns: Mapping[str, Sequence[Any]]) -> list[Decimal]:
    """The exact value of each result row, column-wise (AVG divided here, exactly, not in ClickHouse floats).

    Column-wise because a 30-day hourly answer is 720+ rows: per-row dicts cost more than the query.
    """
    agg = agg_name(aggregation)
    if agg == "AVG":
        return [
            average(Decimal(total), int(count)) if count else Decimal(0)
            for total, count in zip(columns["total_sum"], columns["total_count"], strict=True)
        ]
    if agg not in _VALUE_COLUMN:
        raise ValueError(f"unknown aggregation {agg!r}")
    return [Decimal(v) for v in columns[_VALUE_COLUMN[agg]]]


def _stamps(values: Sequence[int]) -> list[datetime | None]:
    return [datetime.fromtimestamp(t, UTC) for t in values]


CLUSTER = Topology(cluster="any")  # only its table naming is used


def namespace_filters(database: str, namespace: str) -> dict[str, str]:
    """ClickHouse `additional_table_filters` confining every read of a namespaced table to `namespace`.

    Why a server-side setting rather than a WHERE in each query: ClickHouse applies it to every read of
    those tables in the statement (subqueries, joins, FINAL), so a query that forgets the filter still
    cannot read another tenant's rows; the SQL builders need not be trusted to remember it.
    """
    value = "namespace = '" + namespace.replace("\\", "\\\\").replace("'", "\\'") + "'"
    tables = (*NAMESPACED_TABLES, SUBJECTS)
    # In cluster mode the shards read `<table>_local` for a Distributed `<table>`: filter both names.
    names = [*tables, *(storage_name(t, CLUSTER) for t in tables)]
    return {f"{database}.{name}": value for name in names}


class WindowStore:
    """Runs the queries of `query.sql` on one clickhouse-connect client; driver errors become StorageError."""

    def __init__(
        self, client: Client, database: str, *, max_windows: int = 1_000_000, writer: Client | None = None,
        namespace: str | None = DEFAULT_NAMESPACE, coarse: CoarseMonths | None = None,
        progress: CompleteUntil | None = None, answers: CoarseAnswers | None = None,
    ) -> None:
        self.client = client
        #: Admin writes (subjects): `client` may be read-only (`meterline.adapters.clickhouse.read_guards`).
        self.writer = writer if writer is not None else client
        self.database = database
        self.max_windows = max_windows  # the query cost ceiling checked before ClickHouse (query/cost.py)
        self.namespace = namespace
        #: Closed months with 15-minute rows (query/coarse.py), shared by every store scoped from this one.
        self.coarse = coarse if coarse is not None else CoarseMonths()
        #: `complete_until`'s last read (query/complete_until.py), shared the same way.
        self.progress = progress if progress is not None else CompleteUntil()
        #: Answers read wholly from coarse rows (query/coarse_answers.py), shared the same way.
        self.answers = answers if answers is not None else CoarseAnswers()
        self._settings = None if namespace is None else {
            "additional_table_filters": namespace_filters(database, namespace)}

    def scoped(self, namespace: str) -> WindowStore:
        """This store reading only `namespace`'s rows (what every API route uses: `state.principal`)."""
        return WindowStore(self.client, self.database, max_windows=self.max_windows, writer=self.writer,
                           namespace=namespace, coarse=self.coarse, progress=self.progress, answers=self.answers)

    def _run(self, query: Query) -> Any:
        if self._settings is None:
            raise RuntimeError("an unscoped WindowStore reads nothing: use store.scoped(principal.namespace)")
        try:
            with storage_errors():
                if not query.tables:
                    return self.client.query(query.sql, parameters=query.parameters, settings=self._settings)
                # Temporary tables travel as multipart files: no size limit like a bound parameter's.
                external: ExternalData | None = None
                for name, text in query.tables.items():
                    if external is None:
                        external = ExternalData(data=text.encode(), file_name=name, fmt="JSONEachRow",
                                                structure=list(EDGE_STRUCTURE))
                    else:
                        external.add_file(data=text.encode(), file_name=name, fmt="JSONEachRow",
                                          structure=list(EDGE_STRUCTURE))
                return self.client.query(query.sql, parameters=query.parameters, external_data=external,
                                         settings=self._settings)
        except Exception as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            if isinstance(cause, DatabaseError) and "Cannot load time zone" in str(cause):
                # A zone name both Python and meterline's list accept but this ClickHouse lacks.
                raise InvalidQueryError("windowTimeZone", "time zone unknown to the ClickHouse server") from None
            raise

    def rows(self, query: Query) -> list[dict[str, Any]]:
        """Run any `query.sql` query; rows as dicts keyed by column name."""
        result = self._run(query)
        names = result.column_names
        return [dict(zip(names, r, strict=True)) for r in result.result_rows]

    def meter(
        self,
        meter: Meter | str,
        aggregation: str | Enum,
        *,
        start: datetime | None,
        end: datetime | None,
        window_size: str | Enum | None = None,
        tz: str = "UTC",
        subjects: Sequence[str] = (),
        group_by: Sequence[str] = (),
        group_by_subject: bool = False,
        filters: Mapping[str, FilterString] | None = None,
        filter_group_by: Mapping[str, str] | None = None,
        generation: int | None = None,
    ) -> list[MeterRow]:
        """Aggregate a meter over [start, end) cut to the second; the partial minutes at the edges are
        metered from raw events (`query.edges`), which needs the `Meter` itself, not only its slug."""
        check_cost(start, end if end is not None else datetime.now(UTC), window_size, subjects, group_by_subject,
                   self.max_windows)
        split: RangeSplit = split_range(start, end)
        all_filters = dict(filters or {})
        for key, value in (filter_group_by or {}).items():
            all_filters[key] = FilterString("$eq", value)
        edges: str | None = None
        if split.edges:
            if not isinstance(meter, Meter):
                raise ValueError("a range with partial minutes needs the Meter, not only its slug")
            raw = self._run(edge_events_query(self.database, meter.event_type, split.edges, subjects, meter=meter.slug))
            edges = edge_json(merge_deltas(edge_deltas(meter, raw.result_rows)))
        slug = meter.slug if isinstance(meter, Meter) else meter
        plan = None
        if not split.whole_empty and size_name(window_size) != "MINUTE":  # minutes never come from coarse rows
            plan = coarse_plan(split, window_size, tz, self.coarse.fingerprints(self.client, self.database))
        shape = (self.database, self.namespace, slug, generation, agg_name(aggregation), size_name(window_size), tz,
                 tuple(subjects), tuple(group_by), group_by_subject, repr(sorted(all_filters.items())))
        for attempt in range(4):
            if attempt == 3:
                plan = None  # marks that keep moving (compactions finishing meanwhile): minute rows only
            # Wholly from coarse rows: kept by the plan's (month, fingerprint) pairs, which fix those rows.
            kept_as = (shape, plan.coarse) if plan is not None and not plan.minutes and edges is None else None
            kept = self.answers.get(kept_as) if kept_as is not None else None
            query = coarse_check_query(self.database, plan) if kept is not None and plan is not None else meter_query(
                self.database, slug, aggregation, split=split, window_size=window_size, tz=tz,
                subjects=subjects, group_by=group_by, group_by_subject=group_by_subject, filters=all_filters,
                edges=edges, generation=generation, coarse=plan,
            )
            try:
                if kept is not None:
                    with storage_errors():  # the check alone: no table, so no namespace filter; nothing to parse
                        self.client.raw_query(query.sql, parameters=query.parameters)
                else:
                    result = self._run(query)
                break
            except StorageError as exc:
                # The check's own failure (its message, not merely the query text quoted after the error).
                if plan is None or f"string '{STALE_COARSE}" not in str(exc):
                    raise
                # A month was written since its compaction: the same query again, that month from minute rows.
                plan = self._without_stale(plan, split, window_size, tz)
        if kept is not None:
            return list(kept)  # the months were still valid for their fingerprints: the same rows
        rows = self._meter_rows(result, aggregation, window_size, group_by_subject, group_by)
        if kept_as is not None:
            self.answers.put(kept_as, rows)
        return rows

    @staticmethod
    def _meter_rows(result: Any, aggregation: str | Enum, window_size: str | Enum | None, group_by_subject: bool,
                    group_by: Sequence[str]) -> list[MeterRow]:
        n = result.row_count
        if not n:
            return []  # the driver gives no columns at all for an empty answer
        columns = dict(zip(result.column_names, result.result_columns, strict=True))
        values = meter_values(aggregation, columns)
        none: list[datetime | None] = [None] * n
        if window_size is None:
            buckets, firsts, lasts = none, _stamps(columns["first_window"]), _stamps(columns["last_window"])
        else:
            buckets, firsts, lasts = _stamps(columns["bucket"]), none, none
        subjects_out = columns["subject_key"] if group_by_subject else [None] * n
        keys = tuple(group_by)
        group_columns = [columns[f"group_{i}"] for i in range(len(keys))]
        groups = [dict(zip(keys, g, strict=True)) for g in zip(*group_columns)] if keys else [{} for _ in range(n)]
        return [
            MeterRow(b, f, s, g, v, last)
            for b, f, s, g, v, last in zip(buckets, firsts, subjects_out, groups, values, lasts, strict=True)
        ]

    def _without_stale(self, plan: CoarsePlan, split: RangeSplit, window_size: str | Enum | None,
                       tz: str) -> CoarsePlan | None:
        """After a query failed with STALE_COARSE: which of the plan's months lost their mark (one small read,
        once per month and compaction in this process: `CoarseMonths.stale` keeps them out of later plans),
        and the plan without them.

        Sound because the check ran inside the failed query before it read anything, and a month's mark never
        returns to a fingerprint it left. The error names one month; reading the marks tells them all. Each
        call drops at least one month (none found: no coarse rows at all), so the caller's retries end.
        """
        published = published_coarse(self.client, self.database)
        stale = [(p, fp) for p, fp, _, _ in plan.coarse if published.get(p) != fp]
        if not stale:
            return None
        for partition, fingerprint in stale:
            self.coarse.stale(partition, fingerprint)
        return coarse_plan(split, window_size, tz, self.coarse.fingerprints(self.client, self.database))

    def subjects(self, meter: str, *, start: datetime | None = None, end: datetime | None = None,
                 generation: int | None = None) -> list[str]:
        query = subjects_query(self.database, meter, start=start, end=end, generation=generation)
        return [r["subject"] for r in self.rows(query)]

    def group_values(
        self, meter: str, key: str, *, start: datetime | None = None, end: datetime | None = None,
        generation: int | None = None,
    ) -> list[str]:
        query = group_values_query(self.database, meter, key, start=start, end=end, generation=generation)
        return [r["value"] for r in self.rows(query)]

    def dead_letters(
        self,
        *,
        meter: str | None = None,
        reason_code: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        query = dead_letters_query(
            self.database, meter=meter, reason_code=reason_code, start=start, end=end, limit=limit
        )
        return [dead_letter(r) for r in self.rows(query)]

    def complete_until(self, topic: str, partitions: int) -> datetime | None:
        """The instant before which every acknowledged event is written (None until every partition
        reported: a partition no worker has written yet could still hold anything). Read at most once a
        second (query/complete_until.py): ask before the data query whose answer it describes."""
        def read() -> datetime | None:
            result = self._run(complete_until_query(self.database, topic, partitions))
            reporting, earliest = result.result_rows[0]
            if int(reporting) < partitions or earliest is None:
                return None
            return earliest if earliest.tzinfo else earliest.replace(tzinfo=UTC)

        return self.progress.get(read)

    def ping(self) -> bool:
        """Readiness: can we run a trivial query right now?"""
        try:
            with storage_errors():
                return bool(self.client.ping())
        except Exception:  # noqa: BLE001 - readiness must answer, never raise
            return False
