"""Portal tokens on the query app against a real ClickHouse: minted by an admin key, bound to one subject
and listed meters, tamper-proof, invalidated within seconds, and private to their namespace.

Usage rows are written straight into `meter_windows`; the expected answers are summed here from the
rows the test wrote, per subject. Each tenant creates its meters through the API (config.yaml's, here
`settings.meters`, are the default namespace's and give no tenant a meter).
"""

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
from meterline.core.keys import ApiKey, generate_key, key_hash
from meterline.core.schema import WINDOW_COLUMNS
from meterline.settings import Settings
from tests.tenants import create_meters

SECRET = "portal-test-server-secret-0123456789abcdef"
METERS = [
    {"slug": "calls", "eventType": "call", "aggregation": "SUM", "valueProperty": "$.n"},
    {"slug": "other", "eventType": "call", "aggregation": "COUNT"},
]
START = datetime(2024, 5, 1, tzinfo=UTC)
QUERY = "?from=2024-05-01T00:00:00Z&to=2024-05-02T00:00:00Z"


def _rows() -> list[list[Any]]:
    rows = []
    for i in range(30):
        subject, value = f"s{i % 3}", Decimal(i + 1)
        for meter in ("calls", "other"):
            rows.append([meter, subject, START + timedelta(minutes=i), "[]", {}, "e", 0, i, 1, value, value, value,
                         [], START + timedelta(minutes=i), value, i, 1, "acme"])  # acme's first definition: generation 1
    return rows


@pytest.fixture(scope="module")
def portal(clickhouse_url: str) -> Iterator[tuple[TestClient, KeyStore, list[list[Any]]]]:
    from meterline.server import build_app
    from tests.infra import unique

    database = unique("portal")
    client = connect(clickhouse_url)
    create_schema(client, database)
    rows = _rows()
    client.insert(f"{database}.meter_windows", rows, column_names=list(WINDOW_COLUMNS))
    settings = Settings(clickhouse_url=f"{clickhouse_url}/{database}", auth_secret=SECRET, auth_local_mode=False,
                        auth_refresh_seconds=0.2, meters=METERS)  # type: ignore[arg-type]
    try:
        with TestClient(build_app("query", settings)) as http:
            admin = KeyStore(client, database)
            for tenant in ("acme", "tenant-a"):  # the meter controller activates them after an (empty) rebuild
                create_meters(http, _key(admin, tenant, Scope.ADMIN, Scope.READ), METERS)
            yield http, admin, rows
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()


def _key(store: KeyStore, namespace: str, *scopes: Scope) -> dict[str, str]:
    key_id, key = generate_key()
    store.add(ApiKey(key_id, namespace, frozenset(scopes), key_hash(SECRET.encode(), key), "",
                     datetime.now(UTC) - timedelta(minutes=1)))
    return {"Authorization": f"Bearer {key}"}


def _until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_portal_token_reads_one_subject_of_its_meters(portal: tuple[TestClient, KeyStore, list[list[Any]]]) -> None:
    http, store, rows = portal
    admin, reader = _key(store, "acme", Scope.ADMIN), _key(store, "acme", Scope.READ)
    assert http.post("/api/v1/portal/tokens", json={"subject": "s1"}, headers=reader).status_code == 403
    r = http.post("/api/v1/portal/tokens", json={"subject": "s1", "allowedMeterSlugs": ["calls"]}, headers=admin)
    assert r.status_code == 200, r.text
    created = r.json()
    assert set(created) == {"id", "subject", "expiresAt", "expired", "createdAt", "allowedMeterSlugs", "token"}
    assert created["subject"] == "s1" and created["expired"] is False and created["allowedMeterSlugs"] == ["calls"]
    bearer = {"Authorization": f"Bearer {created['token']}"}

    expected = sum(r[9] for r in rows if r[0] == "calls" and r[1] == "s1")
    answer = http.get(f"/api/v1/portal/meters/calls/query{QUERY}", headers=bearer)
    assert answer.status_code == 200, answer.text
    assert [d["value"] for d in answer.json()["data"]] == [int(expected)]
    grouped = http.get(f"/api/v1/portal/meters/calls/query{QUERY}&groupBy=subject", headers=bearer).json()["data"]
    assert [(d["subject"], d["value"]) for d in grouped] == [("s1", int(expected))]
    same = http.get(f"/api/v1/portal/meters/calls/query{QUERY}&subject=s1", headers=bearer)
    assert same.json()["data"] == answer.json()["data"]
    # A read key on the portal route is the ordinary query: every subject.
    total = sum(r[9] for r in rows if r[0] == "calls")
    everyone = http.get(f"/api/v1/portal/meters/calls/query{QUERY}", headers=reader).json()["data"]
    assert [d["value"] for d in everyone] == [int(total)]

    for path in (f"/api/v1/portal/meters/calls/query{QUERY}&subject=s2",
                 f"/api/v1/portal/meters/calls/query{QUERY}&subject=s1&subject=s2",
                 f"/api/v1/portal/meters/calls/query{QUERY}&filterGroupBy%5Bsubject%5D=s2",
                 f"/api/v1/portal/meters/other/query{QUERY}",
                 f"/api/v1/portal/meters/no_such_meter/query{QUERY}",
                 f"/api/v1/meters/calls/query{QUERY}", "/api/v1/meters", "/api/v1/events", "/api/v1/portal/tokens"):
        refused = http.get(path, headers=bearer)
        assert refused.status_code == 403, path
        assert "data" not in refused.json()

    token = created["token"]
    head, payload, signature = token.split(".")
    for tampered in (f"{head}.{payload}.{signature[::-1]}", f"{head}.{payload[:-4]}AAAA.{signature}", token + "x"):
        assert http.get(f"/api/v1/portal/meters/calls/query{QUERY}",
                        headers={"Authorization": f"Bearer {tampered}"}).status_code == 401


def test_list_and_invalidate_stay_in_the_namespace(portal: tuple[TestClient, KeyStore, list[list[Any]]]) -> None:
    http, store, _ = portal
    admin_a, admin_b = _key(store, "tenant-a", Scope.ADMIN), _key(store, "tenant-b", Scope.ADMIN)
    made = [http.post("/api/v1/portal/tokens", json={"subject": s}, headers=admin_a).json() for s in ("s0", "s2")]
    listed = http.get("/api/v1/portal/tokens", headers=admin_a).json()
    assert [t["id"] for t in listed] == sorted((t["id"] for t in made), reverse=True)
    assert all("token" not in t for t in listed)
    assert http.get("/api/v1/portal/tokens", headers=admin_b).json() == []
    assert http.get("/api/v1/portal/tokens?limit=0", headers=admin_a).status_code == 400
    assert http.post("/api/v1/portal/tokens/invalidate", json={}, headers=admin_a).status_code == 400

    def works(t: dict[str, Any]) -> bool:
        r = http.get(f"/api/v1/portal/meters/calls/query{QUERY}", headers={"Authorization": f"Bearer {t['token']}"})
        return r.status_code == 200

    assert all(works(t) for t in made)
    # Tenant B cannot invalidate A's token, and the answer does not say whether the id exists.
    assert http.post("/api/v1/portal/tokens/invalidate", json={"id": made[0]["id"]}, headers=admin_b).status_code == 204
    assert http.post("/api/v1/portal/tokens/invalidate", json={"id": "nope"}, headers=admin_b).status_code == 204
    assert http.post("/api/v1/portal/tokens/invalidate", json={"subject": "s0"}, headers=admin_a).status_code == 204
    _until(lambda: not works(made[0]))
    assert works(made[1])
    states = {t["id"]: t["expired"] for t in http.get("/api/v1/portal/tokens", headers=admin_a).json()}
    assert states == {made[0]["id"]: True, made[1]["id"]: False}


def test_create_validates_fields(portal: tuple[TestClient, KeyStore, list[list[Any]]]) -> None:
    http, store, _ = portal
    admin = _key(store, "acme", Scope.ADMIN)
    for body, field in (({}, "subject"), ({"subject": ""}, "subject"), ({"subject": "s", "allowedMeterSlugs": ["x"]},
                        "allowedMeterSlugs[0]"), ({"subject": "s", "token": "t"}, "token"),
                        ({"subject": "s", "extra": 1}, "extra")):
        r = http.post("/api/v1/portal/tokens", json=body, headers=admin)
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == field, (body, r.text)
