"""The partial minutes at a query's edges, metered from the stored raw events.

Windows are stored per minute, so `from=12:00:15` cannot be answered from them alone. The events of
the edge seconds are read from `events` (every accepted first sighting, with its log position) and fed
through the processor's own row builder (`meterline.core.rows.message_rows`, as `meterline recompute`
does), so the edge deltas are exactly the deltas the worker wrote for those events, restricted to the
edge seconds; the SQL then aggregates them together with the whole-minute windows (`query.sql`).

Events the worker did not meter stay unmetered: events whose stored `rejections` name the whole
event (too late, unknown type) are skipped, per-meter rejections are rejected again by the same rules. Edges use
the meter definitions the query service runs with, like `recompute`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import orjson

from meterline.core.decimals import add
from meterline.core.meters import Meter, MeterSet
from meterline.core.reasons import unmetered
from meterline.core.rows import RowOptions, Rows, always_accept, message_rows, stored_messages
from meterline.core.times import as_utc, format_sql_time


def edge_deltas(meter: Meter, rows: Iterable[Sequence[Any]]) -> list[list[Any]]:
    """`meter_windows` delta rows (WINDOW_COLUMNS order) of the given raw event rows."""
    only = MeterSet([meter])
    out = Rows()
    options = RowOptions()
    for pos, events, indexes in stored_messages(rows, skip=unmetered):
        message_rows(events, pos, only, options, always_accept, rows=out, indexes=indexes)
    return out.windows


def merge_deltas(deltas: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """One delta per (subject, minute, group) instead of one per Kafka message: what travels to ClickHouse
    stays small on a busy edge minute. Each column merges exactly as its rollup does (design.md): counts
    and sums add, min/max compare, uniques unite, LATEST keeps the greatest (time, rank) that has a value."""
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for d in deltas:
        key = (d[1], d[2], d[3])
        row = merged.get(key)
        if row is None:
            merged[key] = [*d[:12], set(d[12]), *d[13:]]
            continue
        row[8] += d[8]
        row[9] = add(row[9], d[9])  # exact: the default context would round past 28 digits
        row[10] = d[10] if row[10] is None else row[10] if d[10] is None else min(row[10], d[10])
        row[11] = d[11] if row[11] is None else row[11] if d[11] is None else max(row[11], d[11])
        row[12].update(d[12])
        if d[14] is not None and (row[14] is None or (d[13], d[15]) > (row[13], row[15])):
            row[13], row[14], row[15] = d[13], d[14], d[15]
    return [[*r[:12], sorted(r[12]), *r[13:]] for r in merged.values()]


def _text(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def edge_json(deltas: Sequence[Sequence[Any]]) -> str:
    """JSONEachRow text in `query.sql.EDGE_STRUCTURE` order; decimals as exact text, never floats."""
    lines = []
    for d in deltas:
        (_meter, subject, window_start, _key, group, _e, _p, _o,
         count, total, low, high, uniques, latest_time, latest_value, latest_rank) = d[:16]  # then generation
        lines.append(orjson.dumps({
            "subject": subject, "window_start": int(as_utc(window_start).timestamp()), "group": group,
            "count": count, "sum": _text(total), "min": _text(low), "max": _text(high), "uniques": list(uniques),
            "latest_time": format_sql_time(latest_time, micro=True), "latest_value": _text(latest_value),
            "latest_rank": latest_rank,
        }))
    return b"\n".join(lines).decode()


__all__ = ["edge_deltas", "edge_json", "merge_deltas"]
