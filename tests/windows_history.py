"""History written the way workers write it, for the windows compaction tests (integration and faults).

Events are grouped into per-subject messages (the wire format's rule), each message goes through the
processor's own row builder (`meterline.core.rows.message_rows`) at its Kafka position, and
`partition_progress` says every partition is complete until now -- so the months of the history are
closed for compaction, as they would be for a deployment that ran through them.
"""

from __future__ import annotations

import contextlib
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from meterline.adapters.clickhouse import connect, create_schema
from meterline.adapters.compactions import active_writers
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
from meterline.localinfra.ports import wait_for
from meterline.server import build_app
from meterline.settings import Settings
from tests.oracle import OracleMeter, config_yaml, first_sighting_decider

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


@contextlib.contextmanager
def query_api(clickhouse_url: str, config_dir: Path, meters: Sequence[OracleMeter], *, prefix: str,
              month: str) -> Iterator[tuple[TestClient, Client, str]]:
    """A fresh database with `meters` from a config.yaml, behind the query API, once every meter is built
    and clean and no writer is announced on `month` (YYYYMM) -- what a compaction test starts from. The
    controller drops other generations after the switch (an announced writer): wait for it to finish."""
    database = f"{prefix}_{uuid.uuid4().hex[:10]}"
    client = connect(clickhouse_url)
    create_schema(client, database)
    config = config_dir / "config.yaml"
    config.write_text(config_yaml(meters))
    settings = Settings(clickhouse_url=f"{clickhouse_url}/{database}", config_file=str(config))
    try:
        with TestClient(build_app("query", settings)) as http:
            wait_for(lambda: all(m["annotations"]["meterline.state"] == "ready"
                                 for m in http.get("/api/v1/meters").json()), 30, "meters ready")
            wait_for(lambda: {s for (s,) in client.query(
                f"SELECT state FROM `{database}`.meter_rebuilds FINAL").result_rows} == {"clean"}, 30, "meters clean")
            wait_for(lambda: not active_writers(client, database, month), 30, "no active writer")
            yield http, client, database
    finally:
        client.command(f"DROP DATABASE IF EXISTS `{database}`")
        client.close()
