"""The namespace filter sits below the SQL builders: ClickHouse applies it to every read of a namespaced
table, so even a query that names no namespace (a forgotten WHERE) reads only the caller's rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from meterline.adapters.clickhouse import connect, create_schema
from meterline.core.schema import EVENT_COLUMNS
from query.sql import Query
from query.store import WindowStore


def test_every_read_is_confined_to_the_namespace(clickhouse_url: str) -> None:
    from tests.infra import unique

    database = unique("nsstore")
    client = connect(clickhouse_url)
    create_schema(client, database)
    sent = {"acme": 3, "beta": 5, "default": 2}
    rows = []
    for ns, n in sent.items():
        for i in range(n):
            row = {"dedupe_key": uuid.uuid4().bytes, "id": f"{ns}-{i}", "source": "s", "type": "t", "subject": ns,
                   "time": datetime(2024, 1, 1, tzinfo=UTC), "data": "", "ingested_at": datetime.now(UTC),
                   "log_epoch": "e", "kafka_partition": 0, "kafka_offset": i, "batch_index": 0,
                   "validation_errors": [], "attributes": "", "rejections": [], "namespace": ns}
            rows.append([row[c] for c in EVENT_COLUMNS])
    client.insert("events", rows, column_names=list(EVENT_COLUMNS), database=database)
    try:
        store = WindowStore(client, database, namespace=None)
        naked = Query(f"SELECT subject, count() AS n FROM `{database}`.events FINAL GROUP BY subject "
                      f"UNION ALL SELECT subject, count() FROM (SELECT * FROM `{database}`.events) GROUP BY subject")
        for ns, n in sent.items():
            assert store.scoped(ns).rows(naked) == [{"subject": ns, "n": n}] * 2
        with pytest.raises(RuntimeError, match="unscoped"):
            store.rows(naked)
    finally:
        client.command(f"DROP DATABASE IF EXISTS `{database}`")
        client.close()
