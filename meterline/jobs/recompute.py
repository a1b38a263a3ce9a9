"""Rebuild one meter's windows from the stored raw events, after its definition changed.

Why this is exact: `events` holds every accepted first sighting (duplicates never reach it) with its
original position (log_epoch, partition, offset, index). Recompute feeds each stored message's events of
the meter's type through the processor's own row builder (`meterline.core.rows.message_rows`, with
`always_accept`), so the rows carry the same identities and ranks the live worker would have produced
under the new definition. The meter's old rows and dead letters are deleted first, because a changed
groupBy produces different row keys that would otherwise stay beside the new ones.

Who runs it: the meter controller (`meterline.jobs.meter_controller`) rebuilds every new generation of
a meter in the background into that generation (`generation=`, without clearing: other generations keep
answering until the switch, docs/design.md "Live meters"); `meterline recompute` runs the same in the
foreground. Messages the live workers process meanwhile are written with the same identities under the
same generation, so overlapping work converges instead of adding up.

A meter belongs to one namespace: it is rebuilt from that namespace's events only, and only that
namespace's rows of the slug are replaced (another tenant may have a meter with the same slug).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from meterline.adapters.clickhouse import mutate, storage_errors
from meterline.adapters.compactions import WriterFence, fenced_writes
from meterline.core.access import DEFAULT_NAMESPACE
from meterline.core.meters import Meter, MeterSet
from meterline.core.reasons import was_too_late
from meterline.core.rows import RowOptions, Rows, always_accept, message_rows, stored_messages
from meterline.core.schema import (
    DEAD_LETTER_COLUMNS,
    DEAD_LETTERS,
    EVENTS,
    METER_WINDOWS,
    SINGLE_NODE,
    STORED_EVENT_COLUMNS,
    WINDOW_COLUMNS,
    Topology,
    mutation_target,
    qualified,
)
from meterline.core.times import format_sql_time

logger = logging.getLogger(__name__)

INSERT_CHUNK = 50_000


@dataclass
class RecomputeResult:
    meter: str
    events: int = 0
    windows: int = 0
    dead_letters: int = 0



class Abandoned(Exception):
    """The rebuild was told to stop (its generation is no longer wanted)."""


def _where(meter: Meter, namespace: str) -> tuple[str, dict[str, Any]]:
    """Events of the meter's namespace and type, from eventFrom on (earlier ones never count)."""
    where = "namespace = {namespace:String} AND type = {type:String}"
    params: dict[str, Any] = {"namespace": namespace, "type": meter.event_type}
    if meter.event_from is not None:
        where += " AND time >= {event_from:DateTime64(6, 'UTC')}"
        params["event_from"] = format_sql_time(meter.event_from, micro=True)
    return where, params


def count_query(database: str, meter: Meter, namespace: str = DEFAULT_NAMESPACE) -> tuple[str, dict[str, Any]]:
    """How many stored events feed the meter: the progress bar's total."""
    where, params = _where(meter, namespace)
    return f"SELECT count() FROM {qualified(database, EVENTS)} FINAL WHERE {where}", params


def events_query(database: str, meter: Meter, namespace: str = DEFAULT_NAMESPACE) -> tuple[str, dict[str, Any]]:
    """Stored events of the meter's type in log order, so each message's events arrive together."""
    where, params = _where(meter, namespace)
    sql = (
        f"SELECT {', '.join(STORED_EVENT_COLUMNS)}"
        f" FROM {qualified(database, EVENTS)} FINAL WHERE {where}"
        " ORDER BY log_epoch, kafka_partition, kafka_offset, batch_index"
    )
    return sql, params


def recompute(
    client: Client,
    database: str,
    meter: Meter,
    *,
    window_seconds: int = 60,
    on_progress: Callable[[int], None] = lambda n: None,
    topology: Topology = SINGLE_NODE,
    generation: int = 0,
    clear: bool = True,
    namespace: str = DEFAULT_NAMESPACE,
) -> RecomputeResult:
    """Rebuild the meter's windows and dead letters of `generation` from `events`.

    With `clear`, that generation's rows are deleted first (a repair in place). `on_progress` may raise
    `Abandoned` to stop early; rows written so far are valid rows of the generation.
    """
    only = MeterSet([meter], [generation], [namespace])
    options = RowOptions(window_seconds=window_seconds)
    result = RecomputeResult(meter.slug)
    now = datetime.now(UTC)
    # Old months may be compacted meanwhile: announce the writes and wait out a running compaction
    # (meterline/adapters/compactions.py), so a swap never drops these rows or resurrects deleted ones.
    with storage_errors(), fenced_writes(client, database, "recompute", enabled=topology.cluster is None) as fence:
        for table in (METER_WINDOWS, DEAD_LETTERS) if clear else ():
            mutate(
                client,
                f"DELETE FROM {mutation_target(database, table, topology)} WHERE namespace = {{namespace:String}}"
                " AND meter = {meter:String} AND generation = {generation:UInt64}",
                topology=topology, parameters={"namespace": namespace, "meter": meter.slug, "generation": generation},
                settings={"mutations_sync": 2},
            )
        sql, params = events_query(database, meter, namespace)
        pending = Rows()
        with client.query_rows_stream(sql, parameters=params) as stream:
            # Events the worker refused as too late were never metered; recompute keeps that decision.
            for pos, events, indexes in stored_messages(stream, skip=was_too_late):
                message_rows(events, pos, only, options, always_accept, now=now, rows=pending, indexes=indexes)
                result.events += len(events)
                on_progress(len(events))
                if len(pending.windows) + len(pending.dead_letters) >= INSERT_CHUNK:
                    _flush(client, database, pending, result, fence)
                    pending = Rows()
        _flush(client, database, pending, result, fence)
    logger.info("recomputed meter", extra={"meter": meter.slug, "events": result.events, "windows": result.windows})
    return result


def _flush(client: Client, database: str, rows: Rows, result: RecomputeResult, fence: WriterFence | None) -> None:
    if fence is not None:
        fence.refresh()
    if rows.windows:
        client.insert(METER_WINDOWS, rows.windows, column_names=list(WINDOW_COLUMNS), database=database)
        result.windows += len(rows.windows)
    if rows.dead_letters:
        client.insert(DEAD_LETTERS, rows.dead_letters, column_names=list(DEAD_LETTER_COLUMNS), database=database)
        result.dead_letters += len(rows.dead_letters)
