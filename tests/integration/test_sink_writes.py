"""The worker's batch inserts (processor/sink.py) on a real ClickHouse: what is stored, and what they leave behind.

A batch of messages is built by the real `BatchProcessor` (RocksDB dedupe cache in a temp dir) and written
by `ClickHouseSink.write_sync`. The oracle is computed here from the generated events: which of them are
first sightings, and every value of their `events` and `dedupe_keys` rows.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from meterline.adapters.clickhouse import connect
from meterline.core.meters import Aggregation, Meter, MeterSet
from meterline.settings import Settings
from processor.batch import BatchProcessor, Message
from processor.dedupe import DedupeState
from processor.sink import ClickHouseSink

EPOCH = "cluster-1/topic-1"
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
METERS = MeterSet([Meter(slug="tokens", event_type="prompt", aggregation=Aggregation.SUM,
                         value_property="$.tokens", group_by={"model": "$.model"})])


def oracle_key(source: str, event_id: str) -> bytes:
    """`dedupe_key` of the default namespace, written out: length-prefixed UTF-8 of source then id."""
    s, i = source.encode(), event_id.encode()
    return hashlib.blake2b(len(s).to_bytes(4, "big") + s + len(i).to_bytes(4, "big") + i, digest_size=16).digest()


def log(n: int, per_message: int = 100) -> tuple[list[Message], list[dict[str, Any]]]:
    """n events in messages of `per_message` on partitions 0-1, every 7th a copy of an earlier one;
    the messages and, in log order, the first sightings with their positions."""
    messages: list[Message] = []
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for m in range(0, n, per_message):
        partition, offset = (m // per_message) % 2, m // per_message // 2
        broker_time = (T0 + timedelta(seconds=m)).timestamp()
        events = []
        for index, i in enumerate(range(m, min(n, m + per_message))):
            j = i - 3 if i % 7 == 6 else i  # a copy of an event of this or the previous message
            event = {"specversion": "1.0", "id": f"evt-{j}", "source": f"src-{j % 3}", "type": "prompt",
                     "subject": f"cust-{m // per_message % 5}",
                     "time": (T0 + timedelta(microseconds=7 * i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                     "data": {"tokens": i % 50, "model": f"m{i % 3}"}}
            events.append(event)
            first.setdefault((event["source"], event["id"]), {
                **event, "partition": partition, "offset": offset, "index": index, "broker_time": broker_time})
        messages.append((partition, offset, orjson.dumps(events), broker_time))
    return messages, list(first.values())


@pytest.fixture
def sink(clickhouse_url: str, unique_name: Callable[[str], str]) -> Iterator[ClickHouseSink]:
    db = unique_name("sinkwrites")
    sink = ClickHouseSink(f"{clickhouse_url.rstrip('/')}/{db}", db)
    sink.ensure_schema(keys_keep_days=47)
    yield sink
    client = connect(clickhouse_url)
    client.command(f"DROP DATABASE IF EXISTS `{db}`")
    client.close()


def build(tmp_path: Path, messages: list[Message]) -> Any:
    settings = Settings(config_file=str(tmp_path / "absent.yaml"), dedupe_horizon_days=32, late_horizon_days=None,
                        window_size_seconds=60, strict_event_types=False)
    state = DedupeState(str(tmp_path / "dedupe"), 32)
    try:
        rows = BatchProcessor(settings, METERS, state, sink=None, log_epoch=EPOCH).build(messages)  # type: ignore[arg-type]
        state.flush()
    finally:
        state.close()
    return rows


def test_a_batch_is_stored_exactly_and_leaves_no_garbage_cycles(sink: ClickHouseSink, tmp_path: Path) -> None:
    messages, first = log(5_000)
    rows = build(tmp_path, messages)
    gc.collect()
    was = gc.isenabled()
    gc.disable()  # what the write leaves for the cyclic GC is found by the collection below, not before
    try:
        sink.write_sync(rows)
        del rows
        left = gc.collect()
    finally:
        if was:
            gc.enable()
    # An insert context refers to itself: one per insert was garbage for the GC, holding the batch's columns
    # (~2 lists an event, 10k here). The sink reuses one per table and lets go of the columns.
    assert left < 10, f"{left} objects of the write waited for the cyclic GC"

    client = connect(sink.url, database=sink.database)
    try:
        stored = client.query(
            "SELECT dedupe_key, id, source, type, subject, time, data, ingested_at, log_epoch, kafka_partition, "
            "kafka_offset, batch_index, validation_errors, attributes, rejections, namespace FROM events FINAL "
            "ORDER BY kafka_partition, kafka_offset, batch_index").result_rows
        keys = client.query("SELECT dedupe_key, log_epoch, kafka_partition, kafka_offset, batch_index, seen_at "
                            "FROM dedupe_keys FINAL ORDER BY kafka_partition, kafka_offset, batch_index").result_rows
    finally:
        client.close()
    expected = sorted(first, key=lambda e: (e["partition"], e["offset"], e["index"]))
    assert len(stored) == len(expected) == len(keys)
    for row, key_row, e in zip(stored, keys, expected, strict=True):
        received = datetime.fromtimestamp(e["broker_time"], UTC).replace(tzinfo=None)  # as ClickHouse returns them
        assert tuple(row) == (
            oracle_key(e["source"], e["id"]), e["id"], e["source"], "prompt", e["subject"],
            datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ"), orjson.dumps(e["data"]).decode(),
            received, EPOCH, e["partition"], e["offset"], e["index"], [], "", [], "default")
        assert tuple(key_row) == (oracle_key(e["source"], e["id"]), EPOCH, e["partition"], e["offset"], e["index"],
                                  received)
