"""Live meters on a real ClickHouse: the meters API (OpenMeter shapes and errors), the versioned store,
and the meter controller's rebuild -> switch -> clean, every answer compared with tests/oracle.py.

History is stored the way the processor stores it (`meterline.core.rows.message_rows` into `events`).
Processor workers are represented by their heartbeat rows in `meter_workers` (what a worker writes,
`processor/live_meters.py`): a worker that has not applied a version holds the rebuild back, which is
what lets this test look at a meter *while* it is building. Faust workers run in tests/e2e.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from meterline.adapters.clickhouse import connect, create_schema
from meterline.adapters.meter_store import MeterCatalog, MeterStore
from meterline.core.errors import MeterVersionConflictError
from meterline.core.meters import MeterSet
from meterline.core.rows import MessagePosition, RowOptions, message_rows
from meterline.core.schema import EVENT_COLUMNS, EVENTS
from meterline.localinfra.ports import wait_for
from meterline.server import build_app
from meterline.settings import Settings
from tests.oracle import (
    EventFactory,
    OracleMeter,
    config_yaml,
    expected,
    first_sighting_decider,
    parse_time,
    response_windows,
)

ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
FILE_METER = OracleMeter("prompt_count", "prompt", "COUNT", None, ("model",))
START = datetime(2024, 1, 1, tzinfo=UTC)
END = START + timedelta(days=1)


@pytest.fixture()
def env(clickhouse_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Client, str, Path]]:
    database = f"meters_{uuid.uuid4().hex[:10]}"
    client = connect(clickhouse_url)
    create_schema(client, database)
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml([FILE_METER]))
    settings = Settings(clickhouse_url=f"{clickhouse_url}/{database}", config_file=str(config),
                        meter_poll_seconds=0.2, meter_worker_ttl_seconds=30)
    try:
        with TestClient(build_app("query", settings)) as http:
            yield http, client, database, config
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()


def store_history(client: Client, database: str, events: list[dict[str, Any]], epoch: str = "epoch") -> None:
    """Store events in 100-event messages as the processor does (no meter: only `events` rows). Events
    carrying `meterline_namespace` are that tenant's (give each tenant its own `epoch`: positions are
    unique per message, and a message is one tenant's)."""
    decide = first_sighting_decider()
    for offset, i in enumerate(range(0, len(events), 100)):
        rows = message_rows(events[i : i + 100], MessagePosition(epoch, 0, offset), MeterSet([]), RowOptions(),
                            decide)
        client.insert(f"{database}.{EVENTS}", rows.events, column_names=list(EVENT_COLUMNS))


def worker(client: Client, database: str, name: str, applied: dict[str, int]) -> None:
    """A processor worker's heartbeat (the row `processor/live_meters.py` writes every poll)."""
    client.insert(f"{database}.meter_workers", [[name, applied, datetime.now(UTC)]],
                  column_names=["worker", "applied", "seen_at"])


def meter(http: TestClient, slug: str) -> dict[str, Any]:
    resp = http.get(f"/api/v1/meters/{slug}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_state(http: TestClient, slug: str, state: str) -> dict[str, Any]:
    wait_for(lambda: meter(http, slug)["annotations"]["meterline.state"] == state, 60, f"{slug} {state}")
    return meter(http, slug)


def answer(http: TestClient, slug: str, group_by: tuple[str, ...], headers: dict[str, str] | None = None,
           ) -> dict[Any, Decimal]:
    resp = http.get(f"/api/v1/meters/{slug}/query", params={"from": START.isoformat(), "to": END.isoformat(),
                                                            "windowSize": "HOUR", "groupBy": list(group_by)},
                    headers=headers)
    assert resp.status_code == 200, resp.text
    return response_windows(resp.json(), group_by)


def oracle(events: list[dict[str, Any]], m: OracleMeter) -> dict[Any, Decimal]:
    return expected(events, m, start=START, end=END, window="HOUR", group_by=m.group_fields, by_subject=False)


def problem(resp: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
    return body


def test_meter_shape_crud_and_errors(env: tuple[TestClient, Client, str, Path]) -> None:
    http, _, _, config = env
    created = http.post("/api/v1/meters", json={
        "slug": "tokens_total", "name": "Tokens", "description": "AI tokens", "metadata": {"team": "ml"},
        "eventType": "prompt", "aggregation": "SUM", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"},
    })
    assert created.status_code == 201, created.text
    body = created.json()
    assert ULID.match(body["id"]) and body["slug"] == "tokens_total" and body["name"] == "Tokens"
    assert body["metadata"] == {"team": "ml"} and body["createdAt"] == body["updatedAt"]
    assert {"eventType", "aggregation", "valueProperty", "groupBy", "annotations"} <= body.keys()
    assert "windowSize" not in body and "deletedAt" not in body
    assert body["annotations"]["meterline.managedBy"] == "api"
    assert meter(http, body["id"])["slug"] == "tokens_total"  # by id as well as slug

    problem(http.post("/api/v1/meters", json={"slug": "tokens_total", "eventType": "x", "aggregation": "COUNT"}),
            409, "slug")
    problem(http.post("/api/v1/meters", json={"slug": "Bad Slug", "eventType": "x", "aggregation": "COUNT"}),
            400, "slug")
    problem(http.post("/api/v1/meters", json={"slug": "a", "eventType": "x", "aggregation": "MEDIAN"}),
            400, "aggregation")
    problem(http.post("/api/v1/meters", json={"slug": "a", "eventType": "x", "aggregation": "SUM",
                                              "valueProperty": "$[[["}), 400, "valueProperty")
    problem(http.post("/api/v1/meters", json={"slug": "a", "eventType": "x", "aggregation": "COUNT",
                                              "groupBy": {"m": "$..[?"}}), 400, "groupBy")
    problem(http.post("/api/v1/meters", json={"slug": "a", "eventType": "x", "aggregation": "COUNT",
                                              "windowSize": "HOUR"}), 400, "windowSize")
    problem(http.post("/api/v1/meters", content=b"[1]", headers={"content-type": "application/json"}), 400, "body")
    problem(http.get("/api/v1/meters/nope"), 404)
    problem(http.put("/api/v1/meters/nope", json={"name": "x"}), 404)
    problem(http.delete("/api/v1/meters/nope"), 404)
    problem(http.get("/api/v1/meters/nope/query"), 404)

    # config.yaml meters are in the same list, marked, and refuse API changes naming the file.
    listed = {m["slug"]: m for m in http.get("/api/v1/meters").json()}
    assert listed["prompt_count"]["annotations"]["meterline.managedBy"] == f"file:{config.resolve()}"
    refused = problem(http.put("/api/v1/meters/prompt_count", json={"name": "x"}), 409)
    assert str(config.resolve()) in refused["detail"]
    problem(http.delete("/api/v1/meters/prompt_count"), 409)

    updated = http.put("/api/v1/meters/tokens_total", json={"name": "Tokens v2", "description": "d"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["name"] == "Tokens v2" and updated.json()["description"] == "d"
    assert updated.json()["annotations"]["meterline.version"] > body["annotations"]["meterline.version"]
    assert updated.json()["updatedAt"] > updated.json()["createdAt"] == body["createdAt"]
    # name/description do not change what is counted: no new generation.
    assert updated.json()["annotations"]["meterline.generation"] == body["annotations"]["meterline.generation"]

    assert http.delete("/api/v1/meters/tokens_total").status_code == 204
    problem(http.get("/api/v1/meters/tokens_total"), 404)
    problem(http.get("/api/v1/meters/tokens_total/query"), 404)
    assert "tokens_total" not in [m["slug"] for m in http.get("/api/v1/meters").json()]
    deleted = [m for m in http.get("/api/v1/meters", params={"includeDeleted": "true"}).json()
               if m["slug"] == "tokens_total"]
    assert len(deleted) == 1 and deleted[0]["deletedAt"]
    again = http.post("/api/v1/meters", json={"slug": "tokens_total", "eventType": "prompt", "aggregation": "COUNT"})
    assert again.status_code == 201 and again.json()["id"] != body["id"]


def test_list_paging_and_order(env: tuple[TestClient, Client, str, Path]) -> None:
    http = env[0]
    for i, agg in enumerate(["SUM", "COUNT", "MAX", "AVG"]):
        m: dict[str, Any] = {"slug": f"m{i}", "name": f"z{3 - i}", "eventType": "e", "aggregation": agg}
        if agg != "COUNT":
            m["valueProperty"] = "$.v"
        assert http.post("/api/v1/meters", json=m).status_code == 201
    slugs = sorted(["m0", "m1", "m2", "m3", "prompt_count"])

    def listed(**params: Any) -> list[str]:
        resp = http.get("/api/v1/meters", params=params)
        assert resp.status_code == 200, resp.text
        return [m["slug"] for m in resp.json()]

    assert listed() == slugs
    assert listed(order="DESC") == slugs[::-1]
    assert listed(page=2, pageSize=2) == slugs[2:4]
    assert listed(page=9, pageSize=2) == []
    names = {m["slug"]: m["name"] for m in http.get("/api/v1/meters").json()}
    assert listed(orderBy="name") == sorted(slugs, key=lambda s: (names[s], s))
    assert listed(orderBy="createdAt") == ["prompt_count", "m0", "m1", "m2", "m3"]
    for bad, field in (({"page": 0}, "page"), ({"pageSize": 1001}, "pageSize"), ({"order": "UP"}, "order"),
                       ({"orderBy": "slug"}, "orderBy"), ({"includeDeleted": "yes"}, "includeDeleted"),
                       ({"limit": 5}, "limit")):
        problem(http.get("/api/v1/meters", params=bad), 400, field)


def test_new_meter_builds_history_then_answers_exactly(env: tuple[TestClient, Client, str, Path]) -> None:
    """A meter created after its events were stored: 503 while building, then every window = oracle."""
    http, client, database, _ = env
    factory = EventFactory(seed=21, start=START, span=timedelta(hours=8))
    events = [factory.event(invalid_rate=0.05) for _ in range(2000)]
    store_history(client, database, events)
    worker(client, database, "w1", {})  # a live worker that has not applied the new meter yet

    event_from = START + timedelta(hours=2)
    created = http.post("/api/v1/meters", json={
        "slug": "tokens", "eventType": "prompt", "aggregation": "SUM", "valueProperty": "$.tokens",
        "groupBy": {"model": "$.model"}, "eventFrom": event_from.isoformat()})
    assert created.status_code == 201, created.text
    version = created.json()["annotations"]["meterline.version"]
    building = problem(http.get("/api/v1/meters/tokens/query"), 503)
    assert "still being built" in building["detail"]
    assert meter(http, "tokens")["annotations"]["meterline.state"] == "building"

    worker(client, database, "w1", {"default/tokens": version})  # the worker applied it: the rebuild starts
    ready = wait_state(http, "tokens", "ready")
    assert ready["eventFrom"].startswith("2024-01-01T02:00:00")
    tokens = OracleMeter("tokens", "prompt", "SUM", "tokens", ("model",))
    counted = [e for e in events if parse_time(e["time"]) >= event_from]
    assert answer(http, "tokens", ("model",)) == oracle(counted, tokens)


def test_redefinition_answers_old_until_switch(env: tuple[TestClient, Client, str, Path]) -> None:
    """groupBy + aggregation change: the old definition answers during the rebuild, the new one after, and
    no row of another generation is left."""
    http, client, database, _ = env
    factory = EventFactory(seed=22, start=START, span=timedelta(hours=8))
    events = [factory.event(invalid_rate=0.05) for _ in range(2000)]
    store_history(client, database, events)
    assert http.post("/api/v1/meters", json={"slug": "tokens", "eventType": "prompt", "aggregation": "SUM",
                                             "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}}
                     ).status_code == 201
    old = OracleMeter("tokens", "prompt", "SUM", "tokens", ("model",))
    new = OracleMeter("tokens", "prompt", "MAX", "tokens", ("type",))
    wait_state(http, "tokens", "ready")
    assert answer(http, "tokens", ("model",)) == oracle(events, old)

    worker(client, database, "w1", {"default/tokens": 1})  # live, still on version 1
    changed = http.put("/api/v1/meters/tokens", json={"groupBy": {"type": "$.type"}, "aggregation": "MAX"})
    assert changed.status_code == 200, changed.text
    a = changed.json()
    assert a["aggregation"] == "MAX" and a["groupBy"] == {"type": "$.type"}
    assert a["annotations"]["meterline.state"] == "building"
    new_generation = a["annotations"]["meterline.generation"]
    assert new_generation > a["annotations"]["meterline.activeGeneration"]
    for _ in range(3):  # while building, every answer is the old definition's, exactly
        assert answer(http, "tokens", ("model",)) == oracle(events, old)
    problem(http.get("/api/v1/meters/tokens/query", params={"groupBy": "type"}), 400, "groupBy")

    worker(client, database, "w1", {"default/tokens": a["annotations"]["meterline.version"]})
    done = wait_state(http, "tokens", "ready")
    assert done["annotations"]["meterline.activeGeneration"] == new_generation
    assert answer(http, "tokens", ("type",)) == oracle(events, new)
    worker(client, database, "w1", {"default/tokens": done["annotations"]["meterline.version"]})

    def only_active() -> bool:
        rows = client.query(f"SELECT DISTINCT generation FROM {database}.meter_windows WHERE meter = 'tokens'")
        return [r[0] for r in rows.result_rows] == [new_generation]

    wait_for(only_active, 60, "the old generation's rows dropped")


def test_tenants_rebuild_and_drop_only_their_own_meter(clickhouse_url: str, tmp_path: Path) -> None:
    """Two namespaces with a meter of the same slug, defined differently, over a shared history: each is
    built from its own namespace's events only, and redefining or deleting one drops only its rows."""
    from meterline.adapters.keystore import KeyStore
    from meterline.core.access import Scope
    from meterline.core.events.wire import NAMESPACE_ATTRIBUTE
    from meterline.core.keys import ApiKey, generate_key, key_hash

    secret = "tenant-meters-secret-0123456789abcdef"
    database = f"meters_{uuid.uuid4().hex[:10]}"
    client = connect(clickhouse_url)
    create_schema(client, database)
    factory = EventFactory(seed=23, start=START, span=timedelta(hours=8))
    ours = [factory.event(invalid_rate=0.05) for _ in range(1500)]
    theirs = [{**e, NAMESPACE_ATTRIBUTE: "acme"} for e in (factory.event() for _ in range(1000))]
    theirs += [{**e, NAMESPACE_ATTRIBUTE: "acme"} for e in ours[:300]]  # the same (source, id): acme's own event
    store_history(client, database, ours)
    store_history(client, database, theirs, epoch="acme-epoch")
    key_id, key = generate_key()
    KeyStore(client, database).add(ApiKey(key_id, "acme", frozenset({Scope.READ, Scope.ADMIN}),
                                          key_hash(secret.encode(), key), "", datetime.now(UTC) - timedelta(minutes=1)))
    acme = {"Authorization": f"Bearer {key}"}
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml([FILE_METER]))
    settings = Settings(clickhouse_url=f"{clickhouse_url}/{database}", config_file=str(config), auth_secret=secret,
                        auth_local_mode=True, meter_poll_seconds=0.2, meter_worker_ttl_seconds=30)
    count = OracleMeter("m", "prompt", "COUNT", None, ("model",))
    total = OracleMeter("m", "prompt", "SUM", "tokens", ("model",))
    peak = OracleMeter("m", "prompt", "MAX", "tokens", ("type",))

    def ready(headers: dict[str, str] | None) -> dict[str, Any]:
        def state() -> Any:
            return http.get("/api/v1/meters/m", headers=headers).json()["annotations"]["meterline.state"]
        wait_for(lambda: state() == "ready", 60, "m ready")
        return dict(http.get("/api/v1/meters/m", headers=headers).json())

    try:
        with TestClient(build_app("query", settings)) as http:
            # Keyless requests act in the default namespace (local mode); the key in acme.
            assert http.post("/api/v1/meters", json={"slug": "m", "eventType": "prompt", "aggregation": "COUNT",
                                                     "groupBy": {"model": "$.model"}}).status_code == 201
            assert http.post("/api/v1/meters", headers=acme, json={
                "slug": "m", "eventType": "prompt", "aggregation": "SUM", "valueProperty": "$.tokens",
                "groupBy": {"model": "$.model"}}).status_code == 201
            ready(None), ready(acme)
            assert answer(http, "m", ("model",)) == oracle(ours, count)
            assert answer(http, "m", ("model",), acme) == oracle(theirs, total)
            # acme sees its meter only; config.yaml's is the default namespace's.
            assert [m["slug"] for m in http.get("/api/v1/meters", headers=acme).json()] == ["m"]
            problem(http.get("/api/v1/meters/prompt_count", headers=acme), 404)

            # acme redefines its `m`: rebuilt from acme's events, and the clean-up of its old generation
            # leaves the default namespace's `m` (the same slug and generation number) whole.
            assert http.put("/api/v1/meters/m", headers=acme,
                            json={"aggregation": "MAX", "groupBy": {"type": "$.type"}}).status_code == 200
            switched = ready(acme)
            assert answer(http, "m", ("type",), acme) == oracle(theirs, peak)

            def generations() -> set[tuple[str, int]]:
                rows = client.query(f"SELECT DISTINCT namespace, generation FROM {database}.meter_windows"
                                    " WHERE meter = 'm'").result_rows
                return {(str(ns), int(g)) for ns, g in rows}

            wait_for(lambda: generations() == {("default", 1), ("acme", switched["annotations"]["meterline.generation"])},
                     60, "acme's old generation dropped")
            assert answer(http, "m", ("model",)) == oracle(ours, count)

            # Deleting acme's `m` purges acme's rows only; the default namespace's `m` still answers.
            assert http.delete("/api/v1/meters/m", headers=acme).status_code == 204
            problem(http.get("/api/v1/meters/m", headers=acme), 404)
            wait_for(lambda: generations() == {("default", 1)}, 60, "acme's rows purged")
            assert answer(http, "m", ("model",)) == oracle(ours, count)
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()


def test_config_reload_and_broken_file(env: tuple[TestClient, Client, str, Path]) -> None:
    http, _, _, config = env
    added = OracleMeter("storage", "storage", "LATEST", "bytes", ("tier",))
    config.write_text(config_yaml([FILE_METER, added]))
    wait_state(http, "storage", "ready")
    config.write_text("meters:\n  - slug: storage\n    eventType: storage\n    aggregation: MEDIAN\n")

    def reported() -> bool:
        return http.get("/readyz").json().get("config", {}).get("status") == "invalid"

    wait_for(reported, 30, "/readyz reports the invalid config")
    detail = http.get("/readyz").json()["config"]["detail"]
    assert "aggregation" in detail and "MEDIAN" in detail
    assert {m["slug"] for m in http.get("/api/v1/meters").json()} == {"prompt_count", "storage"}
    metrics = http.get("/metrics").text
    assert "meterline_config_valid 0.0" in metrics
    # Removing a meter from the file deletes it.
    config.write_text(config_yaml([added]))
    wait_for(lambda: http.get("/api/v1/meters/prompt_count").status_code == 404, 30, "prompt_count deleted")
    assert http.get("/readyz").json()["config"]["status"] == "valid"


def test_cli_meters_status_lists_state(env: tuple[TestClient, Client, str, Path], clickhouse_url: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from meterline.cli import app

    http, _, database, config = env
    wait_state(http, "prompt_count", "ready")
    monkeypatch.setenv("CLICKHOUSE_URL", f"{clickhouse_url}/{database}")
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    monkeypatch.setenv("COLUMNS", "250")  # rich would wrap the table's cells at 80
    result = CliRunner().invoke(app, ["meters", "status", "--watch"])
    assert result.exit_code == 0, result.output
    assert "prompt_count" in result.output and "ready" in result.output and "file:" in result.output


def test_restart_with_a_broken_file_serves_the_stored_meters_then_applies_the_fix(
        clickhouse_url: str, tmp_path: Path) -> None:
    """An API restarted while config.yaml is not even YAML in its meters block starts with the meters of
    the store (it used to refuse to start), reports the file (/readyz, /metrics), and applies it once
    fixed, as hot reload does."""
    database = f"meters_{uuid.uuid4().hex[:10]}"
    client = connect(clickhouse_url)
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml([FILE_METER]))

    def settings() -> Settings:
        return Settings(clickhouse_url=f"{clickhouse_url}/{database}", config_file=str(config),
                        meter_poll_seconds=0.2, meter_worker_ttl_seconds=30)

    try:
        with TestClient(build_app("query", settings())) as http:
            wait_state(http, "prompt_count", "ready")
        config.write_text(config_yaml([FILE_METER]) + "  - slug: storage\n    groupBy: {tier: $.tier\n")
        with TestClient(build_app("query", settings())) as http:
            assert [m["slug"] for m in http.get("/api/v1/meters").json()] == ["prompt_count"]
            ready = http.get("/readyz").json()["config"]
            assert ready["status"] == "invalid" and "meters: invalid YAML" in ready["detail"], ready
            assert "meterline_config_valid 0.0" in http.get("/metrics").text
            added = OracleMeter("storage", "storage", "LATEST", "bytes", ("tier",))
            config.write_text(config_yaml([FILE_METER, added]))
            wait_state(http, "storage", "ready")
            assert http.get("/readyz").json()["config"]["status"] == "valid"
            assert "meterline_config_valid 1.0" in http.get("/metrics").text
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()


def other_process(clickhouse_url: str, database: str) -> MeterCatalog:
    """A catalog on its own client: what another API process holds (no lock shared with this one)."""
    catalog = MeterCatalog(MeterStore(connect(f"{clickhouse_url}/{database}"), database))
    catalog.refresh(force=True)
    return catalog


def history(client: Client, database: str, slug: str) -> list[tuple[int, str, dict[str, Any]]]:
    """Every stored record of `slug` WITHOUT FINAL (two records sharing a version would both show): its
    versions must be 1..n, each once; then the changes, without the controller's activate records."""
    rows = client.query(f"SELECT version, action, actor, definition FROM {database}.meter_versions"
                        " WHERE slug = {s:String} ORDER BY version, actor", parameters={"s": slug}).result_rows
    assert [int(v) for v, *_ in rows] == list(range(1, len(rows) + 1)), rows
    return [(int(v), a, json.loads(d)) for v, action, a, d in rows if action != "activate"]


API_METER = {"slug": "tokens", "eventType": "prompt", "aggregation": "SUM", "valueProperty": "$.tokens"}


@pytest.mark.parametrize("if_match", [False, True])
def test_a_change_that_loses_its_version_to_another_writer_is_never_silently_dropped(
        env: tuple[TestClient, Client, str, Path], clickhouse_url: str, if_match: bool) -> None:
    """Two API processes change one meter; A's change lands between B's read (version v) and B's append.
    Without If-Match, B's change applies on top of A's (v + 2); with If-Match v, B is refused naming v + 1.
    Either way each version is stored once and A's change is kept."""
    http, client, database, _ = env
    assert http.post("/api/v1/meters", json=API_METER).status_code == 201
    v = wait_state(http, "tokens", "ready")["annotations"]["meterline.version"]  # no activate record races in
    a, b = other_process(clickhouse_url, database), other_process(clickhouse_url, database)
    append = b.store.append
    fired: list[int] = []

    def append_after_a(record: Any) -> bool:
        if not fired:
            fired.append(record.version)
            a.update("tokens", {"description": "from A"}, namespace="default", actor="a")
        return append(record)

    b.store.append = append_after_a  # type: ignore[method-assign]
    try:
        if if_match:
            with pytest.raises(MeterVersionConflictError) as refused:
                b.update("tokens", {"name": "from B"}, namespace="default", actor="b", expected_version=[v])
            assert refused.value.current == v + 1
        else:
            b.update("tokens", {"name": "from B"}, namespace="default", actor="b")
    finally:
        for catalog in (a, b):
            catalog.store.client.close()
    assert fired == [v + 1]  # B computed the next version from what it read
    stored = history(client, database, "tokens")
    wanted = [("create", None), ("a", "from A")] + ([] if if_match else [("b", "from A")])
    assert [(actor if i else "create", d.get("description") if i else None)
            for i, (_, actor, d) in enumerate(stored)] == wanted
    assert stored[-1][2]["name"] == ("tokens" if if_match else "from B")


def test_if_match_and_etag_over_http(env: tuple[TestClient, Client, str, Path]) -> None:
    http, _, _, _ = env
    created = http.post("/api/v1/meters", json=API_METER)
    assert created.status_code == 201 and created.headers["etag"] == '"1"'
    v = wait_state(http, "tokens", "ready")["annotations"]["meterline.version"]  # the controller activated it
    assert http.get("/api/v1/meters/tokens").headers["etag"] == f'"{v}"'
    ok = http.put("/api/v1/meters/tokens", json={"name": "T"}, headers={"If-Match": f'"{v}"'})
    assert ok.status_code == 200 and ok.headers["etag"] == f'"{v + 1}"'
    assert ok.json()["annotations"]["meterline.version"] == v + 1
    for stale in (f'"{v}"', f'W/"{v + 1}"', '"two"'):  # an old version; a weak tag never matches; not a version
        body = problem(http.put("/api/v1/meters/tokens", json={"name": "X"}, headers={"If-Match": stale}), 412,
                       "If-Match")
        assert body["currentVersion"] == v + 1 and f"version {v + 1}" in body["detail"], body
    assert http.put("/api/v1/meters/tokens", json={"name": "U"},
                    headers={"If-Match": f'"{v}", "{v + 1}"'}).status_code == 200
    assert http.put("/api/v1/meters/tokens", json={"name": "V"}, headers={"If-Match": "*"}).status_code == 200
    assert http.put("/api/v1/meters/tokens", json={"name": "W"}).status_code == 200  # no If-Match: newest
    problem(http.delete("/api/v1/meters/tokens", headers={"If-Match": f'"{v + 3}"'}), 412)
    assert http.get("/api/v1/meters/tokens").json()["name"] == "W"
    assert http.delete("/api/v1/meters/tokens", headers={"If-Match": f'"{v + 4}"'}).status_code == 204


def test_concurrent_writers_in_two_processes_store_every_change_once(
        env: tuple[TestClient, Client, str, Path], clickhouse_url: str) -> None:
    """Real threads, two catalogs (processes), no If-Match: every change succeeds and the history holds
    each of them exactly once, at versions 1..n+1 with no version written twice."""
    http, client, database, _ = env
    assert http.post("/api/v1/meters", json=API_METER).status_code == 201
    catalogs = [other_process(clickhouse_url, database) for _ in range(2)]
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            for k in range(8):
                catalogs[w % 2].update("tokens", {"description": f"w{w}-{k}"}, namespace="default", actor=f"w{w}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for catalog in catalogs:
        catalog.store.client.close()
    assert not errors, errors
    stored = history(client, database, "tokens")
    written = {f"w{w}-{k}" for w in range(4) for k in range(8)}
    assert len(stored) == len(written) + 1
    assert sorted(d.get("description", "") for _, _, d in stored[1:]) == sorted(written)
