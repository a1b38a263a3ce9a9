"""History written the way workers write it, for the windows compaction tests (integration and faults).

Events are grouped into per-subject messages (the wire format's rule), each message goes through the
processor's own row builder (`meterline.core.rows.message_rows`) at its Kafka position, and
`partition_progress` says every partition is complete until now -- so the months of the history are
closed for compaction, as they would be for a deployment that ran through them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from meterline.core.meters import Meter, MeterSet
from meterline.core.rows import MessagePosition, RowOptions, Rows, message_rows
from meterline.core.schema import (
    EVENT_COLUMNS,
    EVENTS,
    METER_WINDOWS,
    PARTITION_PROGRESS,
    PARTITION_PROGRESS_COLUMNS,
    WINDOW_COLUMNS,
)
from tests.oracle import OracleMeter, first_sighting_decider

EPOCH = "cluster-1/topic-1"
TOPIC = "meterline-events"
PARTITIONS = 2
#: A meter's first definition is version 1, so its rows are generation 1 (docs/design.md, "Live meters").
GENERATION = 1


def meter_of(m: OracleMeter) -> Meter:
    spec: dict[str, Any] = {"slug": m.slug, "eventType": m.event_type, "aggregation": m.aggregation}
    if m.value_field:
        spec["valueProperty"] = f"$.{m.value_field}"
    if m.group_fields:
        spec["groupBy"] = {g: f"$.{g}" for g in m.group_fields}
    return Meter(**spec)


def kafka_partition(subject: str) -> int:
    return zlib.crc32(subject.encode()) % PARTITIONS


def messages(events: Sequence[dict[str, Any]], size: int = 25) -> list[tuple[MessagePosition, list[dict[str, Any]]]]:
    """Per-subject messages of up to `size` events in arrival order, with their Kafka positions."""
    pending: dict[str, list[dict[str, Any]]] = {}
    next_offset = [0] * PARTITIONS
    out: list[tuple[MessagePosition, list[dict[str, Any]]]] = []

    def flush(subject: str) -> None:
        p = kafka_partition(subject)
        out.append((MessagePosition(EPOCH, p, next_offset[p]), pending.pop(subject)))
        next_offset[p] += 1

    for e in events:
        pending.setdefault(e["subject"], []).append(e)
        if len(pending[e["subject"]]) >= size:
            flush(e["subject"])
    for subject in sorted(pending):
        flush(subject)
    return out


def rows_of(batch: Iterable[tuple[MessagePosition, list[dict[str, Any]]]], meters: Sequence[OracleMeter],
            generation: int = GENERATION) -> Rows:
    """The rows a worker writes for these messages (first sightings in this call only)."""
    decide = first_sighting_decider()
    meter_set = MeterSet([meter_of(m) for m in meters], [generation] * len(meters))
    rows = Rows()
    for pos, events in batch:
        broker_time = max(datetime.fromisoformat(e["time"]) for e in events)
        message_rows(events, pos, meter_set, RowOptions(), decide, now=broker_time + timedelta(seconds=1), rows=rows)
    return rows


def write(client: Client, database: str, rows: Rows) -> None:
    if rows.events:
        client.insert(EVENTS, rows.events, column_names=list(EVENT_COLUMNS), database=database)
    if rows.windows:
        client.insert(METER_WINDOWS, rows.windows, column_names=list(WINDOW_COLUMNS), database=database)


def mark_complete(client: Client, database: str, until: datetime | None = None, topic: str = TOPIC) -> None:
    """Every partition of the topic is written up to `until` (now)."""
    until = until or datetime.now(UTC)
    client.insert(PARTITION_PROGRESS, [[topic, p, EPOCH, 1_000_000, until, until] for p in range(PARTITIONS)],
                  column_names=list(PARTITION_PROGRESS_COLUMNS), database=database)


def window_rows(client: Client, database: str) -> int:
    return int(client.query(f"SELECT count() FROM `{database}`.{METER_WINDOWS} FINAL").result_rows[0][0])
