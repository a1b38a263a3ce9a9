"""bench/generate.py writes what the pipeline would have written: checked on real ClickHouse at a tiny size.

Oracles: every stored key is `dedupe_key(source, id)` and every `dedupe_keys` row the sink's
`dedupe_key_rows` of its event; the generated `meter_windows` rows are exactly the rows the processor's
own row builder (`message_rows`, the live worker's) makes from the generated events, message by
message; and per (subject, model) the windows' sums equal the tokens summed here from each event's
JSON `data` (the raw scan). P3's 100M-event curve and P5's 100M-id reload stand on these rows.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.client import Client

from bench import generate
from bench.workload import write_config
from meterline.adapters.clickhouse import connect, create_schema
from meterline.core.meters import MeterSet, load_meters
from meterline.core.positions import dedupe_key
from meterline.core.rows import MessagePosition, RowOptions, always_accept, message_rows, stored_messages
from meterline.core.schema import DEDUPE_KEY_COLUMNS, EVENT_COLUMNS, STORED_EVENT_COLUMNS, WINDOW_COLUMNS
from processor.sink import dedupe_key_rows

GENERATION = 1


@pytest.fixture()
def database(clickhouse_url: str) -> Iterator[tuple[Client, str]]:
    name = f"generate_{uuid.uuid4().hex[:8]}"
    client = connect(clickhouse_url)
    create_schema(client, name)
    try:
        yield connect(clickhouse_url, database=name), name
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")
        client.close()


def _plain(value: Any) -> Any:
    """A comparable, hashable form of a ClickHouse or row-builder value."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Decimal):
        return value.normalize()
    if isinstance(value, bytes):
        return value
    return value


@pytest.mark.parametrize(("events", "message_events", "partitions", "days"), [
    (2_350, 100, 3, 1),  # a last message cut short; several events per minute and model
    (700, 1, 2, 1),  # single-event messages: one delta row per event and meter
])
def test_generated_rows_are_what_the_pipeline_writes(
    database: tuple[Client, str], clickhouse_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    events: int, message_events: int, partitions: int, days: int,
) -> None:
    client, name = database
    monkeypatch.setattr(generate, "KEY_CHUNK", 500)  # several hashing chunks, through the process pool
    monkeypatch.setattr(generate, "CHUNK", 1_000)  # several INSERT chunks
    layout = generate.Layout(events=events, start=datetime(2024, 1, 1, tzinfo=UTC), days=days, subjects=7,
                             message_events=message_events, partitions=partitions, log_epoch="generated")
    info = generate.fill(client, clickhouse_url, name, layout, generation=GENERATION, workers=2)
    assert info["events_rows"] == info["dedupe_keys_rows"] == events

    stored = client.query(f"SELECT {', '.join(EVENT_COLUMNS)} FROM events FINAL").result_rows
    assert len(stored) == events
    # Keys: the processor's dedupe key of (source, id); a dedupe_keys row per event, as the sink writes it.
    for row in stored:
        assert row[0] == dedupe_key(row[2], row[1], row[-1]), row
    keys = client.query(f"SELECT {', '.join(DEDUPE_KEY_COLUMNS)} FROM dedupe_keys FINAL").result_rows
    assert Counter(_plain(r) for r in keys) == Counter(_plain(r) for r in dedupe_key_rows(stored))
    # Positions: unique, offsets dense per partition, at most message_events events per message.
    positions = Counter((r[9], r[10], r[11]) for r in stored)
    assert max(positions.values()) == 1
    per_message = Counter((p, o) for p, o, _ in positions)
    assert max(per_message.values()) <= message_events
    for p in range(partitions):
        offsets = sorted({o for q, o in per_message if q == p})
        assert offsets == list(range(len(offsets)))

    # Windows: the live worker's row builder on the generated events gives exactly the generated rows.
    meters = load_meters(write_config(tmp_path))
    meter_set = MeterSet(meters, [GENERATION] * len(meters))
    ingested = {(r[9], r[10]): r[7] for r in stored}
    stream = client.query(
        f"SELECT {', '.join(STORED_EVENT_COLUMNS)} FROM events FINAL "
        "ORDER BY log_epoch, kafka_partition, kafka_offset, batch_index").result_rows
    built_windows: list[list[Any]] = []
    built_events: list[list[Any]] = []
    for pos, evs, indexes in stored_messages(stream, skip=lambda _: False):
        rows = message_rows(evs, MessagePosition(*pos), meter_set, RowOptions(), always_accept,
                            now=ingested[(pos.partition, pos.offset)], indexes=indexes)
        built_windows += rows.windows
        built_events += rows.events
    generated = client.query(f"SELECT {', '.join(WINDOW_COLUMNS)} FROM meter_windows FINAL").result_rows
    assert len(generated) == len(built_windows)
    assert Counter(_plain(r) for r in generated) == Counter(_plain(r) for r in built_windows)
    # ...and the events rows it builds (key, id, ..., broker time, position, no errors) are the stored ones.
    assert Counter(_plain(r) for r in stored) == Counter(_plain(r) for r in built_events)

    # Raw scan: tokens per (subject, model) summed here from each event's JSON equal the windows' sums.
    raw: defaultdict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for row in stored:
        data = orjson.loads(row[6])
        raw[(row[4], data["model"])] += Decimal(data["tokens"])
    windows = client.query(
        "SELECT subject, group['model'], sum(sum), sum(count) FROM meter_windows FINAL "
        "WHERE meter = 'tokens_total' GROUP BY subject, group['model']").result_rows
    assert {(s, m): Decimal(v) for s, m, v, _ in windows} == dict(raw)
    assert sum(c for *_, c in windows) == events
    assert len({s for s, _ in raw}) > 1  # several subjects, heavy-tailed
