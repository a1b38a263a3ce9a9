"""The query API against a real ClickHouse, checked window by window against a pure-Python oracle.

Delta rows are written straight into `meter_windows` (one per event, each with its own offset, and
every row inserted twice with identical identity, so FINAL must collapse them). The oracle buckets the
raw events itself with zoneinfo and Decimal, so time-zone and rollup bugs in SQL cannot hide.
"""

from __future__ import annotations

import csv
import io
import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from fastapi.testclient import TestClient

from meterline.adapters.clickhouse import connect, create_schema
from meterline.core.schema import DEAD_LETTER_COLUMNS, EVENT_COLUMNS, WINDOW_COLUMNS
from meterline.localinfra.ports import wait_for
from meterline.server import build_app
from meterline.settings import Settings

#: A meter's first definition is version 1, so its rows are generation 1 (docs/design.md, "Live meters").
GENERATION = 1
AGGS = ("COUNT", "SUM", "AVG", "MIN", "MAX", "UNIQUE_COUNT", "LATEST")
SIZES = (None, "MINUTE", "HOUR", "DAY", "MONTH")
ZONES = ("UTC", "Asia/Kolkata", "Asia/Kathmandu", "America/New_York")
FROM = datetime(2024, 3, 9, 5, 7, tzinfo=UTC)
TO = datetime(2024, 11, 4, 3, 0, tzinfo=UTC)
DAYS = [datetime(2024, m, d, tzinfo=UTC) for m, d in (
    (3, 8), (3, 9), (3, 10), (3, 11), (3, 30), (3, 31), (4, 1), (10, 26), (10, 27), (11, 2), (11, 3), (11, 4), (11, 5)
)]


@pytest.fixture(scope="module")
def ch_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared `clickhouse_url` fixture when conftest provides it, else our own local server."""
    try:
        yield request.getfixturevalue("clickhouse_url")
        return
    except pytest.FixtureLookupError:
        pass
    from meterline.localinfra.clickhouse_server import LocalClickHouse

    server = LocalClickHouse(tmp_path_factory.mktemp("query-ch") / "data")
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


def _meters() -> list[dict[str, Any]]:
    out = []
    for agg in AGGS:
        m: dict[str, Any] = {"slug": f"m_{agg.lower()}", "eventType": "ev", "aggregation": agg,
                             "groupBy": {"model": "$.model", "region": "$.region"}}
        if agg == "UNIQUE_COUNT":
            m["valueProperty"] = "$.u"
        elif agg != "COUNT":
            m["valueProperty"] = "$.v"
        out.append(m)
    return out


def _events(rng: random.Random, n: int = 500) -> list[dict[str, Any]]:
    events = []
    for i in range(n):
        t = rng.choice(DAYS) + timedelta(seconds=rng.randrange(86400), microseconds=rng.randrange(1_000_000))
        group = {}
        if (model := rng.choice(["a", "b", None])) is not None:
            group["model"] = model
        group["region"] = rng.choice(["eu", "us"])
        events.append({
            "offset": i, "subject": rng.choice(["s1", "s2", "s3"]), "time": t, "group": group,
            "v": Decimal(rng.randrange(-5000, 100000)) / Decimal(1000), "u": f"u{rng.randrange(40)}",
        })
    return events


def _rows(events: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for e in events:
        wstart = e["time"].replace(second=0, microsecond=0)
        gkey = str(sorted(e["group"].items()))
        for agg in AGGS:
            value = None if agg in ("COUNT", "UNIQUE_COUNT") else e["v"]
            rows.append([
                f"m_{agg.lower()}", e["subject"], wstart, gkey, e["group"], "epoch", 0, e["offset"],
                1, value or Decimal(0), value, value, [e["u"]] if agg == "UNIQUE_COUNT" else [],
                e["time"], value, e["offset"] * 100000, GENERATION, "default",
            ])
    return rows


@pytest.fixture(scope="module")
def app_client(ch_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, list[dict[str, Any]], Any, str]]:
    # A name that only works quoted: every query must quote the configured database.
    database = f"q-{uuid.uuid4().hex[:12]}"
    client = connect(ch_url)
    create_schema(client, database)
    events = _events(random.Random(20240310))
    rows = _rows(events)
    for _ in range(2):  # the second insert repeats every identity: FINAL must collapse it
        client.insert("meter_windows", rows, column_names=list(WINDOW_COLUMNS), database=database)
    config = tmp_path_factory.mktemp("query-config") / "config.yaml"
    config.write_text(yaml.safe_dump({"meters": _meters()}))
    settings = Settings(clickhouse_url=f"{ch_url}/{database}", config_file=str(config))
    try:
        with TestClient(build_app("query", settings)) as http:
            # The meter controller activates the file's meters once their (empty) rebuild is done.
            wait_for(lambda: all(m["annotations"]["meterline.state"] == "ready"
                                 for m in http.get("/api/v1/meters").json()), 30, "meters ready")
            yield http, events, client, database
    finally:
        client.command(f"DROP DATABASE IF EXISTS `{database}`")
        client.close()


# ------------------------------------------------------------------ oracle


def _bucket(t: datetime, size: str, tz: ZoneInfo) -> datetime:
    minute = t.replace(second=0, microsecond=0)
    if size == "MINUTE":
        return minute
    if size == "HOUR":
        while minute.astimezone(tz).minute != 0:
            minute -= timedelta(minutes=1)
        return minute
    local = t.astimezone(tz)
    day = 1 if size == "MONTH" else local.day
    return datetime(local.year, local.month, day, tzinfo=tz).astimezone(UTC)


def _bucket_end(start: datetime, size: str, tz: ZoneInfo) -> datetime:
    if size == "MINUTE":
        return start + timedelta(minutes=1)
    if size == "HOUR":
        t = start + timedelta(minutes=1)
        while t.astimezone(tz).minute != 0:
            t += timedelta(minutes=1)
        return t
    local = start.astimezone(tz)
    if size == "DAY":
        d = local.date() + timedelta(days=1)
        return datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC)
    y, m = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return datetime(y, m, 1, tzinfo=tz).astimezone(UTC)


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _fmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _oracle(events: list[dict[str, Any]], agg: str, size: str | None, zone: str, *, by_subject: bool,
            keys: list[str], subjects: list[str], filters: dict[str, str]) -> dict[tuple[Any, ...], Decimal]:
    tz = ZoneInfo(zone)
    buckets: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for e in events:
        if not (FROM <= e["time"].replace(second=0, microsecond=0) < TO):
            continue
        if subjects and e["subject"] not in subjects:
            continue
        if any(e["group"].get(k) != v for k, v in filters.items()):
            continue
        if size is None:
            start, end = FROM, TO
        else:
            # Windows keep their bucket's own bounds even where from/to cut into them (OpenMeter's shape).
            start = _bucket(e["time"], size, tz)
            end = _bucket_end(start, size, tz)
        # `subject=` filters and groups by subject (OpenMeter's rule).
        key = (_fmt(start), _fmt(end), e["subject"] if by_subject or subjects else None,
               tuple((k, e["group"].get(k)) for k in keys))
        buckets.setdefault(key, []).append(e)
    return {key: _value(agg, es) for key, es in buckets.items()}


def _value(agg: str, es: list[dict[str, Any]]) -> Decimal:
    vs = [e["v"] for e in es]
    if agg == "COUNT":
        return Decimal(len(es))
    if agg == "SUM":
        return sum(vs, Decimal(0))
    if agg == "AVG":
        return (sum(vs, Decimal(0)) / len(vs)).quantize(Decimal("1e-9"), ROUND_HALF_EVEN)
    if agg == "MIN":
        return min(vs)
    if agg == "MAX":
        return max(vs)
    if agg == "UNIQUE_COUNT":
        return Decimal(len({e["u"] for e in es}))
    latest: Decimal = max(es, key=lambda e: (e["time"], e["offset"]))["v"]
    return latest


VARIANTS = [
    {"by_subject": False, "keys": [], "subjects": [], "filters": {}},
    {"by_subject": True, "keys": ["model"], "subjects": [], "filters": {}},
    {"by_subject": False, "keys": ["model", "region"], "subjects": ["s1", "s3"], "filters": {"region": "eu"}},
]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("zone", ZONES)
def test_every_window_matches_oracle(app_client: Any, agg: str, zone: str) -> None:
    http, events, _, _ = app_client
    for size in SIZES:
        for variant in VARIANTS:
            params: list[tuple[str, str]] = [("from", _fmt(FROM)), ("to", _fmt(TO)), ("windowTimeZone", zone)]
            if size:
                params.append(("windowSize", size))
            if variant["by_subject"]:
                params.append(("groupBy", "subject"))
            params += [("groupBy", k) for k in variant["keys"]]
            params += [("subject", s) for s in variant["subjects"]]
            params += [(f"filterGroupBy[{k}]", v) for k, v in variant["filters"].items()]
            expected = _oracle(events, agg, size, zone, **variant)
            assert expected, (size, variant)
            res = http.get(f"/api/v1/meters/m_{agg.lower()}/query", params=params)
            assert res.status_code == 200, res.text
            body = res.json()
            got = {
                (r["windowStart"], r["windowEnd"], r["subject"], tuple((k, r["groupBy"][k]) for k in variant["keys"])):
                r["value"] for r in body["data"]
            }
            assert len(got) == len(body["data"]), "duplicate windows"
            assert set(got) == set(expected), (size, variant)
            if size == "HOUR" and zone == "Asia/Kathmandu":  # local hours start at UTC :15
                assert all(k[0].endswith("15:00Z") for k in got)
            for key, value in expected.items():
                assert got[key] == (int(value) if value == value.to_integral_value() else float(value)), key
            # CSV carries the same windows with exact decimal values.
            res = http.get(f"/api/v1/meters/m_{agg.lower()}/query", params=params, headers={"Accept": "text/csv"})
            assert res.status_code == 200 and res.headers["content-type"].startswith("text/csv")
            rows = list(csv.DictReader(io.StringIO(res.text)))
            assert len(rows) == len(expected)
            header = ["window_start", "window_end", *(["subject"] if variant["by_subject"] or variant["subjects"] else []),
                      *variant["keys"], "value"]
            assert res.text.split("\r\n")[0] == ",".join(header)
            for r in rows:
                key = (r["window_start"], r["window_end"], r.get("subject") or None,
                       tuple((k, r[k] or None) for k in variant["keys"]))
                assert Decimal(r["value"]) == expected[key], key


@pytest.mark.parametrize("size", SIZES)
def test_no_matching_windows_is_an_empty_answer(app_client: Any, size: str | None) -> None:
    """A subject or group value with no usage gives `data: []` (the driver returns no columns then)."""
    http, events, _, _ = app_client
    assert not any(e["subject"] == "nobody" for e in events)
    for extra in ([("subject", "nobody")], [("groupBy", "subject"), ("filterGroupBy[region]", "nowhere")]):
        params = [("from", _fmt(FROM)), ("to", _fmt(TO)), *extra] + ([("windowSize", size)] if size else [])
        res = http.get("/api/v1/meters/m_sum/query", params=params)
        assert res.status_code == 200, res.text
        assert res.json()["data"] == []


def test_meters_list_get_and_subjects(app_client: Any) -> None:
    http, events, _, _ = app_client
    meters = http.get("/api/v1/meters").json()
    assert [m["slug"] for m in meters] == sorted(f"m_{a.lower()}" for a in AGGS)  # listMeters orders by key
    got = http.get("/api/v1/meters/m_sum").json()
    assert got["aggregation"] == "SUM" and got["valueProperty"] == "$.v" and "windowSize" not in got
    assert got["groupBy"] == {"model": "$.model", "region": "$.region"} and got["eventType"] == "ev"
    assert http.get("/api/v1/meters/m_sum/subjects").json() == sorted({e["subject"] for e in events})
    # A range keeps the subjects with usage in [from, to) (minute windows): here one minute of usage.
    start = min(e["time"] for e in events).replace(second=0, microsecond=0)
    end = start + timedelta(minutes=1)
    in_range = sorted({e["subject"] for e in events if start <= e["time"].replace(second=0, microsecond=0) < end})
    got = http.get("/api/v1/meters/m_sum/subjects", params={"from": _fmt(start), "to": _fmt(end)}).json()
    assert got == in_range and len(in_range) < len({e["subject"] for e in events})
    assert http.get("/api/v1/meters/m_sum/subjects", params={"from": "2030-01-01T00:00:00Z"}).json() == []


@pytest.mark.parametrize(
    ("url", "status", "field"),
    [
        ("/api/v1/meters/nope", 404, None),
        ("/api/v1/meters/nope/query", 404, None),
        ("/api/v1/meters/m_sum/query?windowTimeZone=Mars/Base", 400, "windowTimeZone"),
        ("/api/v1/meters/m_sum/query?from=2024-01-01T00:00:30Z&to=2024-01-01T00:00:30.9Z", 400, "from"),
        ("/api/v1/meters/m_sum/query?windowTimeZone=right/UTC&windowSize=DAY", 400, "windowTimeZone"),
        ("/api/v1/meters/m_sum/query?windowTimeZone=localtime&windowSize=DAY", 400, "windowTimeZone"),
        ("/api/v1/meters/m_sum/query?filterCustomerId=c1", 400, "filterCustomerId"),
        ("/api/v1/meters/m_sum/query?nope=1", 400, "nope"),
        ("/api/v1/meters/m_sum/query?filterGroupBy={'model': 'a'}", 400, "filterGroupBy"),
        ("/api/v1/meters/m_sum/query?advancedMeterGroupByFilters[model]=%5Bobject%20Object%5D", 400,
         "advancedMeterGroupByFilters[model]"),
        ("/api/v1/meters/m_sum/query?advancedMeterGroupByFilters={\"model\":{\"$eq\":\"a\",\"$ne\":\"b\"}}", 400,
         "advancedMeterGroupByFilters.model"),
        ("/api/v1/meters/m_sum/query?advancedMeterGroupByFilters={\"colour\":{\"$eq\":\"a\"}}", 400,
         "advancedMeterGroupByFilters[colour]"),
        ("/api/v1/meters/m_sum/query?advancedMeterGroupByFilters={\"model\":{\"$in\":\"a\"}}", 400,
         "advancedMeterGroupByFilters.model.$in"),
        ("/api/v1/meters/m_sum/query?from=2024-01-02T00:00:00Z&to=2024-01-01T00:00:00Z", 400, "from"),
        ("/api/v1/meters/m_sum/query?from=yesterday", 400, "from"),
        ("/api/v1/meters/m_sum/query?windowSize=WEEK", 400, "windowSize"),
        ("/api/v1/meters/m_sum/query?groupBy=colour", 400, "groupBy"),
        ("/api/v1/meters/m_sum/query?filterGroupBy[colour]=x", 400, "filterGroupBy[colour]"),
        ("/api/v1/events?limit=0", 400, "limit"),
        ("/api/v1/events?limit=101", 400, "limit"),
        ("/api/v1/events?limit=ten", 400, "limit"),
        ("/api/v1/dead-letters?from=nope", 400, "from"),
    ],
)
def test_errors_are_problem_json(app_client: Any, url: str, status: int, field: str | None) -> None:
    http = app_client[0]
    res = http.get(url)
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/problem+json")
    body = res.json()
    assert body["status"] == status and body["title"]
    if field:
        assert any(e["field"] == field for e in body["errors"]), body
        assert any(e["field"] == field for e in body["extensions"]["validationErrors"]), body
        assert field in body["detail"]  # what both OpenMeter SDKs show as the message


def test_events_listing(app_client: Any) -> None:
    http, _, client, database = app_client
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    since = {"from": "2024-05-01T00:00:00Z"}
    rows = []
    events = []
    for i in range(30):
        row = {
            "dedupe_key": uuid.uuid4().bytes, "id": f"e{i}", "source": "src", "type": "ev",
            "subject": "cust-1" if i % 2 else "cust-22", "time": base + timedelta(minutes=i // 2, microseconds=i % 2),
            "data": f"{{\"v\": {i}}}", "ingested_at": base + timedelta(hours=1, seconds=i), "log_epoch": "epoch",
            "kafka_partition": 0, "kafka_offset": i, "batch_index": 0,
            "validation_errors": ["m_sum: value missing"] if i == 5 else [],
            "attributes": '{"datacontenttype":"application/json","region":"eu"}' if i == 0 else "",
            "rejections": [("m_sum", "value_missing")] if i == 5 else [],
            "namespace": "default",
        }
        events.append(row)
        rows.append([row[c] for c in EVENT_COLUMNS])
    for _ in range(2):
        client.insert("events", rows, column_names=list(EVENT_COLUMNS), database=database)
    newest_first = sorted(events, key=lambda r: (r["time"], r["ingested_at"], r["id"]), reverse=True)
    got = http.get("/api/v1/events", params=since).json()
    assert [g["event"]["id"] for g in got] == [r["id"] for r in newest_first]
    first = got[-1]
    assert first["event"] == {"specversion": "1.0", "id": "e0", "source": "src", "type": "ev", "subject": "cust-22",
                              "time": "2024-05-01T12:00:00.000000Z", "data": {"v": 0},
                              "datacontenttype": "application/json", "region": "eu"}
    assert first["ingestedAt"] == "2024-05-01T13:00:00.000000Z" and "validationError" not in first
    assert parse_iso(first["storedAt"]) > datetime(2025, 1, 1, tzinfo=UTC)  # when ClickHouse stored it
    assert next(g for g in got if g["event"]["id"] == "e5")["validationError"] == "m_sum: value missing"
    assert http.get("/api/v1/events").json() == []  # from defaults to 72 hours ago (the spec's default)

    def ids(**params: Any) -> list[str]:
        res = http.get("/api/v1/events", params={**since, **params})
        assert res.status_code == 200, res.text
        return [g["event"]["id"] for g in res.json()]

    assert ids(subject="cust-1", limit=3) == [r["id"] for r in newest_first if r["subject"] == "cust-1"][:3]
    assert ids(subject="ust-2") == [r["id"] for r in newest_first if "ust-2" in r["subject"]]  # partial
    assert ids(id="e2") == [r["id"] for r in newest_first if "e2" in r["id"]]  # partial
    lo, hi = base + timedelta(hours=1, seconds=10), base + timedelta(hours=1, seconds=12)
    assert ids(ingestedAtFrom=lo.isoformat(), ingestedAtTo=hi.isoformat()) == [
        r["id"] for r in newest_first if lo <= r["ingested_at"] <= hi]
    assert ids(**{"from": "2024-05-01T12:05:00.000001Z", "to": "2024-05-01T12:06:00.000001Z"}) == [
        r["id"] for r in newest_first if base + timedelta(minutes=5, microseconds=1) <= r["time"]
        <= base + timedelta(minutes=6, microseconds=1)]
    assert ids(clientId="c-1", limit=100) == [r["id"] for r in newest_first]
    for bad, field in (({"customerId": "01G65Z755AFWAKHE12NY0CQ9FH"}, "customerId"), ({"limit": 101}, "limit"),
                       ({"sort": "x"}, "sort"), ({"subject": ""}, "subject")):
        res = http.get("/api/v1/events", params=bad)
        assert res.status_code == 400 and res.json()["errors"][0]["field"] == field, res.text

    # v2: filters and cursor pages that neither repeat nor skip, even across equal times.
    flt = {"$or": [{"$eq": "cust-22"}]}
    query = {"filter": json.dumps({"subject": flt, "time": {"$gte": "2024-05-01T00:00:00Z"}}), "limit": 4}
    seen: list[str] = []
    pages = 0
    while True:
        res = http.get("/api/v2/events", params=query)
        assert res.status_code == 200, res.text
        body = res.json()
        seen += [g["event"]["id"] for g in body["items"]]
        pages += 1
        if not body["items"]:
            break
        query["cursor"] = body["nextCursor"]
    assert sorted(seen) == sorted(r["id"] for r in events if r["subject"] == "cust-22") and len(seen) == len(set(seen))
    assert pages == 5  # 15 events, 4 a page, then an empty page
    res = http.get("/api/v2/events", params={"filter": json.dumps({"$or": []})})
    assert res.status_code == 400
    for bad, field in (({"filter": "[object Object]"}, "filter"), ({"filter[subject]": "x"}, "filter[subject]"),
                       ({"filter": '{"customerId":{"$in":["x"]}}'}, "filter.customerId"),
                       ({"cursor": "nope"}, "cursor"), ({"limit": 0}, "limit")):
        res = http.get("/api/v2/events", params=bad)
        assert res.status_code == 400 and res.json()["errors"][0]["field"] == field, res.text


def test_dead_letters_listing(app_client: Any) -> None:
    http, _, client, database = app_client
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    rows = []
    for i in range(6):
        row = {
            "log_epoch": "epoch", "kafka_partition": 1, "kafka_offset": i, "batch_index": 0,
            "meter": "m_sum" if i % 2 else "", "id": f"d{i}", "source": "src", "type": "ev", "subject": "s",
            "time": base, "data": "{}", "reason_code": "value_missing" if i % 2 else "unknown_type",
            "reason": "why", "received_at": base + timedelta(seconds=i), "generation": GENERATION,
            "namespace": "default",
        }
        rows.append([row[c] for c in DEAD_LETTER_COLUMNS])
    for _ in range(2):
        client.insert("dead_letters", rows, column_names=list(DEAD_LETTER_COLUMNS), database=database)
    got = http.get("/api/v1/dead-letters").json()
    assert [g["event"]["id"] for g in got] == [f"d{i}" for i in range(5, -1, -1)]
    assert got[0]["meter"] == "m_sum" and got[0]["reasonCode"] == "value_missing"
    assert got[0]["position"] == {"logEpoch": "epoch", "partition": 1, "offset": 5, "index": 0}
    got = http.get("/api/v1/dead-letters", params={"reasonCode": "unknown_type", "limit": 2}).json()
    assert [g["event"]["id"] for g in got] == ["d4", "d2"] and got[0]["meter"] is None
    assert [g["event"]["id"] for g in http.get("/api/v1/dead-letters", params={"meter": "m_sum"}).json()] == ["d5", "d3", "d1"]


def test_health_and_metrics(app_client: Any) -> None:
    http = app_client[0]
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    metric = 'meterline_query_request_seconds_count{method="GET",route="/api/v1/meters",status="200"}'

    def served() -> float:
        line = next((x for x in http.get("/metrics").text.splitlines() if x.startswith(metric)), None)
        return float(line.split()[-1]) if line else 0.0

    before = served()
    for _ in range(3):
        assert http.get("/api/v1/meters").status_code == 200
    http.get("/healthz")  # not an API route: no series
    assert served() == before + 3
    assert 'route="/healthz"' not in http.get("/metrics").text


def test_subjects_api_and_csv_display_names(app_client: Any) -> None:
    http, events, _, _ = app_client
    res = http.post("/api/v1/subjects", json=[
        {"key": "s1", "displayName": "=Acme, Inc.", "metadata": {"tier": "gold"}},
        {"key": "s3", "displayName": ""},
    ])
    assert res.status_code == 200, res.text
    created = {s["key"]: s for s in res.json()}
    assert created["s1"]["displayName"] == "=Acme, Inc." and created["s1"]["metadata"] == {"tier": "gold"}
    assert len(created["s1"]["id"]) == 26 and created["s1"]["createdAt"] == created["s1"]["updatedAt"]
    # A partial update keeps what the body leaves out and keeps id and createdAt.
    res = http.post("/api/v1/subjects", json=[{"key": "s1", "metadata": None}])
    updated = res.json()[0]
    assert updated["displayName"] == "=Acme, Inc." and updated["metadata"] is None
    assert updated["id"] == created["s1"]["id"] and updated["createdAt"] == created["s1"]["createdAt"]
    assert http.get(f"/api/v1/subjects/{updated['id']}").json()["key"] == "s1"
    assert [s["key"] for s in http.get("/api/v1/subjects").json()] == ["s1", "s3"]

    # CSV: subject_display_name appears, formula-like names are defused, "" stays "" and a subject without
    # an entity (s2) has an empty cell.
    params = [("from", _fmt(FROM)), ("to", _fmt(TO)), ("groupBy", "subject")]
    res = http.get("/api/v1/meters/m_count/query", params=params, headers={"Accept": "text/csv"})
    lines = res.text.split("\r\n")
    assert lines[0] == "window_start,window_end,subject,subject_display_name,value"
    cells = {line.split(",")[2]: line for line in lines[1:-1]}
    assert cells["s1"].split(",", 3)[3].startswith("\"'=Acme, Inc.\",")
    assert cells["s3"].split(",")[3] == '""' and cells["s2"].split(",")[3] == ""
    counts = {s: sum(1 for e in events if e["subject"] == s and FROM <= e["time"].replace(second=0, microsecond=0) < TO)
              for s in ("s1", "s2", "s3")}
    assert {s: int(line.rsplit(",", 1)[1]) for s, line in cells.items()} == counts

    assert http.delete("/api/v1/subjects/s3").status_code == 204
    assert http.get("/api/v1/subjects/s3").status_code == 404
    assert http.delete("/api/v1/subjects/s3").status_code == 404
    assert [s["key"] for s in http.get("/api/v1/subjects").json()] == ["s1"]
    for body, field in (([{"displayName": "x"}], "[0].key"), ([{"key": "k", "colour": 1}], "[0].colour"), ({}, "body")):
        res = http.post("/api/v1/subjects", json=body)
        assert res.status_code == 400 and res.json()["errors"][0]["field"] == field, res.text


def test_group_by_values(app_client: Any) -> None:
    http, events, _, _ = app_client
    lo, hi = datetime(2024, 3, 8, tzinfo=UTC), datetime(2024, 3, 31, 23, 59, tzinfo=UTC)
    params = {"from": _fmt(lo), "to": _fmt(hi)}
    inside = [e for e in events if lo <= e["time"] <= hi]
    got = http.get("/api/v1/meters/m_sum/group-by/model/values", params=params)
    assert got.status_code == 200, got.text
    assert got.json() == sorted({e["group"]["model"] for e in inside if "model" in e["group"]})
    assert http.get("/api/v1/meters/m_sum/group-by/subject/values", params=params).json() == sorted(
        {e["subject"] for e in inside})
    assert http.get("/api/v1/meters/m_sum/group-by/model/values").json() == []  # default: the last 24 hours
    assert http.get("/api/v1/meters/m_sum/group-by/colour/values").status_code == 400
    assert http.get("/api/v1/meters/nope/group-by/model/values").status_code == 404


def test_debug_metrics_count_todays_ingested_events(app_client: Any) -> None:
    http, _, client, database = app_client
    now = datetime.now(UTC)
    rows = []
    for i, (subject, ingested) in enumerate([("a", now), ("a", now), ("b\"x", now), ("c", now - timedelta(days=2))]):
        row = {"dedupe_key": uuid.uuid4().bytes, "id": f"dm{i}", "source": "src", "type": "ev", "subject": subject,
               "time": now, "data": "", "ingested_at": ingested, "log_epoch": "epoch", "kafka_partition": 0,
               "kafka_offset": 1000 + i, "batch_index": 0, "validation_errors": [], "attributes": "",
               "rejections": [], "namespace": "default"}
        rows.append([row[c] for c in EVENT_COLUMNS])
    client.insert("events", rows, column_names=list(EVENT_COLUMNS), database=database)
    res = http.get("/api/v1/debug/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    lines = res.text.splitlines()
    assert 'openmeter_events_total{subject="a"} 2.0' in lines
    assert 'openmeter_events_total{subject="b\\"x"} 1.0' in lines
    assert not any('subject="c"' in line for line in lines) and lines[-1] == "# EOF"


FILTER_CASES = [
    {"$eq": "a"}, {"$ne": "a"}, {"$in": ["a", "zzz"]}, {"$nin": ["a"]}, {"$like": "%"}, {"$like": "_"},
    {"$nlike": "a%"}, {"$ilike": "A"}, {"$nilike": "B"}, {"$contains": "A"}, {"$ncontains": "b"},
    {"$gt": "a"}, {"$gte": "a"}, {"$lt": "b"}, {"$lte": "a"}, {"$exists": True}, {"$exists": False},
    {"$and": [{"$ne": "a"}, {"$exists": True}]}, {"$or": [{"$eq": "a"}, {"$exists": False}]},
]


@pytest.mark.parametrize("f", FILTER_CASES, ids=[json.dumps(f) for f in FILTER_CASES])
def test_every_filter_operator_matches_the_oracle(app_client: Any, f: dict[str, Any]) -> None:
    """advancedMeterGroupByFilters on a key some rows lack (`model`): each operator, GET and POST."""
    from tests.oracle import filter_matches

    http, events, _, _ = app_client
    want: dict[str | None, Decimal] = {}
    for e in events:
        if FROM <= e["time"].replace(second=0, microsecond=0) < TO and filter_matches(e["group"].get("model"), f):
            want[e["group"].get("model")] = want.get(e["group"].get("model"), Decimal(0)) + 1
    body = {"from": _fmt(FROM), "to": _fmt(TO), "groupBy": ["model"], "advancedMeterGroupByFilters": {"model": f}}
    for res in (http.post("/api/v1/meters/m_count/query", json=body),
                http.get("/api/v1/meters/m_count/query", params={**body, "advancedMeterGroupByFilters": json.dumps(
                    body["advancedMeterGroupByFilters"])})):
        assert res.status_code == 200, res.text
        assert {r["groupBy"]["model"]: Decimal(r["value"]) for r in res.json()["data"]} == want
