"""Limits on the query app against a real ClickHouse: a burst from one key is refused while another key
still succeeds; the cost ceiling answers 400 naming the parameter, before (windows) or inside ClickHouse
(series); the query client is read-only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from meterline.adapters.clickhouse import connect, create_schema
from meterline.adapters.keystore import KeyStore
from meterline.core.access import Scope
from meterline.core.errors import StorageError
from meterline.core.keys import ApiKey, generate_key, key_hash
from meterline.core.schema import WINDOW_COLUMNS
from meterline.settings import Settings

#: A meter's first definition is version 1, so its rows are generation 1 (docs/design.md, "Live meters").
GENERATION = 1
SECRET = "limits-test-server-secret-0123456789abcdef"
METERS = [{"slug": "calls", "eventType": "call", "aggregation": "COUNT"}]
START = datetime(2024, 5, 1, tzinfo=UTC)
SUBJECTS = 1200  # more series than the ceiling below allows


@pytest.fixture(scope="module")
def limited(clickhouse_url: str) -> Iterator[tuple[TestClient, KeyStore]]:
    from meterline.server import build_app
    from tests.infra import unique

    database = unique("limits")
    client = connect(clickhouse_url)
    create_schema(client, database)
    rows = [["calls", f"s{i}", START + timedelta(minutes=i % 7), "[]", {}, "e", 0, i, 1, Decimal(0), None, None,
             [], START, None, i, GENERATION, "default"] for i in range(SUBJECTS)]  # config meters: default's
    client.insert(f"{database}.meter_windows", rows, column_names=list(WINDOW_COLUMNS))
    settings = Settings(clickhouse_url=f"{clickhouse_url}/{database}", auth_secret=SECRET, auth_local_mode=False,
                        rate_limit_requests="20/minute", query_max_rows=1000, meters=METERS)  # type: ignore[arg-type]
    try:
        with TestClient(build_app("query", settings)) as http:
            store = KeyStore(client, database)
            # The meter controller activates the meter once its (empty) rebuild is done: 503 until then.
            deadline = time.monotonic() + 60
            while True:  # a fresh key per look: this app allows a key only 20 requests a minute
                meters = http.get("/api/v1/meters", headers=_key(store)).json()
                if all(m["annotations"]["meterline.state"] == "ready" for m in meters):
                    break
                assert time.monotonic() < deadline, f"meter calls never became ready: {meters}"
                time.sleep(0.05)
            yield http, store
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()


def _key(store: KeyStore) -> dict[str, str]:
    key_id, key = generate_key()
    store.add(ApiKey(key_id, "default", frozenset({Scope.READ}), key_hash(SECRET.encode(), key), "",
                     datetime.now(UTC) - timedelta(minutes=1)))
    return {"Authorization": f"Bearer {key}"}


def test_burst_from_one_key_is_limited_while_another_succeeds(limited: tuple[TestClient, KeyStore]) -> None:
    http, store = limited
    noisy, quiet = _key(store), _key(store)
    statuses = [http.get("/api/v1/meters", headers=noisy).status_code for _ in range(30)]
    assert statuses[:20] == [200] * 20 and set(statuses[20:]) == {429}
    refused = http.get("/api/v1/meters", headers=noisy)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert [http.get("/api/v1/meters", headers=quiet).status_code for _ in range(10)] == [200] * 10


def test_cost_ceiling(limited: tuple[TestClient, KeyStore]) -> None:
    http, store = limited
    reader = _key(store)
    decades = http.get("/api/v1/meters/calls/query?from=2000-01-01T00:00:00Z&to=2030-01-01T00:00:00Z"
                       "&windowSize=MINUTE&groupBy=subject", headers=reader)
    assert decades.status_code == 400 and decades.json()["errors"][0]["field"] == "windowSize", decades.text
    # Windows are few, but series are only known to ClickHouse: its guard stops the aggregation.
    series = http.get("/api/v1/meters/calls/query?from=2024-05-01T00:00:00Z&to=2024-05-02T00:00:00Z"
                      "&groupBy=subject", headers=reader)
    assert series.status_code == 400 and series.json()["errors"][0]["field"] == "groupBy", series.text
    # The same data without grouping by subject is a small answer: the total count.
    total = http.get("/api/v1/meters/calls/query?from=2024-05-01T00:00:00Z&to=2024-05-02T00:00:00Z",
                     headers=reader)
    assert total.status_code == 200 and [d["value"] for d in total.json()["data"]] == [SUBJECTS]


def test_query_client_is_read_only(limited: tuple[TestClient, KeyStore]) -> None:
    http, _ = limited
    store: Any = http.app.state.query_store  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="readonly"):
        store.client.command(f"CREATE TABLE {store.database}.evil (x UInt8) ENGINE = Memory")
    with pytest.raises(StorageError):
        from meterline.adapters.clickhouse import storage_errors

        with storage_errors():
            store.client.command(f"INSERT INTO {store.database}.meter_windows (meter) VALUES ('x')")
