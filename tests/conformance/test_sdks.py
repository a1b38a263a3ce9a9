"""The published OpenMeter SDKs (PyPI `openmeter`, npm `@openmeter/sdk`, pinned in tests/conformance/sdks.py)
drive every metering call they expose against a real meterline stack, and every number they get back is
compared with the oracle (tests/oracle.py).

Both SDKs ingest (single events and batches, with a retried duplicate across SDKs); then each SDK lists
and gets meters, queries with GET and POST, JSON and CSV, with subject, groupBy, filters, time zones and
sub-minute from/to, lists events (v1 and v2 with cursor), group-by values and meter subjects, manages
subjects, reads debug metrics, creates / updates / deletes a meter (whose rebuilt history must be exact),
and surfaces meterline's problem messages.

Where an SDK cannot send a call as its own types suggest, the test sends it the way that works and the
README says why (OpenMeter compatibility): the Python SDK cannot JSON-encode FilterString models on
GET and sends `filter_group_by` as a Python repr; the JS SDK's query serializer refuses nested objects
(send advancedMeterGroupByFilters / filter as JSON strings) and parses debug metrics as JSON unless
told `parseAs: "text"`.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from meterline.localinfra.stack import LocalStack
from tests.conformance.conftest import METERS, SdkCall
from tests.oracle import (
    EventFactory,
    OracleMeter,
    expected,
    filter_matches,
    first_sightings,
    parse_time,
    response_windows,
)

pytestmark = pytest.mark.e2e

START = datetime(2024, 1, 1, tzinfo=UTC)
END = START + timedelta(hours=6)
SDKS = ("python", "js")
FAR = datetime(2100, 1, 1, tzinfo=UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture(scope="module")
def sent(stack: LocalStack, sdk_call: SdkCall) -> list[dict[str, Any]]:
    """~600 events: half ingested by each SDK (one single event, then batches), 15 retried through the
    other SDK, some carrying CloudEvents extension attributes. Returns what was sent, in order."""
    factory = EventFactory(seed=14, start=START, span=timedelta(hours=5, minutes=50))
    events = [factory.event() for _ in range(600)]
    for e in events[::50]:
        e["traceparent"] = f"00-{e['id']}"
        e["datacontenttype"] = "application/json"
    py_half, js_half = events[:300], events[300:]
    resent = random.Random(3).sample(py_half, 15)

    calls = [{"op": "events.ingest_event", "args": [{"model": "Event", "value": py_half[0]}]}]
    calls += [{"op": "events.ingest_events", "args": [[{"model": "Event", "value": e} for e in py_half[i:i + 100]]]}
              for i in range(1, len(py_half), 100)]
    results = sdk_call("python", calls)
    assert all("ok" in r for r in results), results

    js_calls = [{"op": "events.ingest", "args": [js_half[0]]}]
    js_calls += [{"op": "events.ingest", "args": [js_half[i:i + 100]]} for i in range(1, len(js_half), 100)]
    js_calls.append({"op": "events.ingest", "args": [resent]})
    results = sdk_call("js", js_calls)
    assert all("ok" in r for r in results), results

    all_sent = py_half + js_half + resent
    _wait_until_counted(stack, first_sightings(all_sent))
    return all_sent


def _wait_until_counted(stack: LocalStack, events: list[dict[str, Any]], timeout: float = 180.0) -> None:
    """Every meter's total equals the oracle's (a liveness bound; windows are written after events)."""
    want = {slug: sum(expected(events, m, start=START, end=END, window=None, by_subject=False).values(), Decimal(0))
            for slug, m in METERS.items()}
    deadline = time.monotonic() + timeout
    got: dict[str, Decimal] = {}
    while time.monotonic() < deadline:
        stack.assert_running()
        for slug in METERS:
            res = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", params={"from": _iso(START), "to": _iso(END)})
            got[slug] = sum((Decimal(str(r["value"])) for r in res.json()["data"]), Decimal(0)) if res.is_success else None
        if got == want:
            return
        time.sleep(0.5)
    pytest.fail(f"processor did not catch up: {got} != {want}; logs in {stack.data_dir}/logs")


def _floor_s(t: datetime | None, default: datetime) -> datetime:
    return default if t is None else t.replace(microsecond=0)


# (slug, from, to, windowSize, time zone, groupBy, subjects, advanced filters)
QUERIES: list[dict[str, Any]] = [
    {"slug": "tokens_total", "from": START + timedelta(minutes=7, seconds=15, milliseconds=250),
     "to": START + timedelta(hours=4, minutes=3, seconds=41, milliseconds=999), "window": "HOUR", "tz": "Asia/Kathmandu",
     "group_by": ["subject", "model"]},
    {"slug": "tokens_total", "from": START, "to": END, "window": "DAY", "tz": "America/New_York",
     "group_by": ["type"], "subjects": ["customer-1", "customer-4"]},
    {"slug": "tokens_total", "from": START + timedelta(seconds=30, milliseconds=5), "to": END, "window": None,
     "group_by": ["model"], "filters": {"model": {"$in": ["gpt-4", "claude"]}, "type": {"$ne": "input"}}},
    {"slug": "prompt_count", "from": START + timedelta(hours=1, minutes=30, seconds=5),
     "to": START + timedelta(hours=1, minutes=30, seconds=55), "window": "MINUTE", "group_by": ["model"]},
    {"slug": "tokens_avg", "from": START, "to": END, "window": "HOUR", "group_by": ["subject"],
     "filters": {"model": {"$or": [{"$like": "gpt%"}, {"$eq": "claude"}]}}},
    {"slug": "active_users", "from": START + timedelta(minutes=1, seconds=1), "to": END, "window": "HOUR"},
    {"slug": "storage_latest", "from": START, "to": None, "window": "HOUR", "tz": "Asia/Kolkata",
     "group_by": ["subject", "tier"]},
]


def _oracle(sent: list[dict[str, Any]], q: dict[str, Any], *, post_filter_group_by: bool = False) -> dict[Any, Decimal]:
    meter = METERS[q["slug"]]
    group_by = [g for g in q.get("group_by", []) if g != "subject"]
    subjects = q.get("subjects") or []
    filters = q.get("filters") or {}
    by_subject = "subject" in q.get("group_by", []) or bool(subjects)

    def where(ev: dict[str, Any]) -> bool:
        data = ev.get("data") or {}
        values = {k: (data.get(k) if isinstance(data.get(k), str) or data.get(k) is None else str(data.get(k)))
                  for k in filters}
        return (not subjects or ev["subject"] in subjects) and all(filter_matches(values[k], f) for k, f in filters.items())

    start = _floor_s(q["from"], datetime(1970, 1, 1, tzinfo=UTC))
    want = expected(first_sightings(sent), meter, start=start, end=_floor_s(q["to"], FAR), window=q["window"],
                    tz=q.get("tz", "UTC"), group_by=group_by, by_subject=by_subject, where=where)
    if q["window"] is None:  # a total's window is `from` as given
        want = {(q["from"], *k[1:]): v for k, v in want.items()}
    return want


def _query_call(sdk: str, q: dict[str, Any], method: str) -> dict[str, Any]:
    """One meter query in the SDK's own terms: GET (`query_json` / `query`) or POST (`query` / `queryPost`)."""
    wire: dict[str, Any] = {}
    if q["from"] is not None:
        wire["from"] = _iso(q["from"])
    if q["to"] is not None:
        wire["to"] = _iso(q["to"])
    if q["window"]:
        wire["windowSize"] = q["window"]
    if q.get("tz"):
        wire["windowTimeZone"] = q["tz"]
    if q.get("group_by"):
        wire["groupBy"] = q["group_by"]
    if q.get("subjects"):
        wire["subject"] = q["subjects"]
    filters = q.get("filters")
    if method == "post":
        if filters:
            wire["advancedMeterGroupByFilters"] = filters
        if sdk == "python":
            return {"op": "meters.query", "args": [q["slug"], {"model": "MeterQueryRequest", "value": wire}]}
        return {"op": "meters.queryPost", "args": [q["slug"], wire]}
    if sdk == "python":
        names = {"from": "from_parameter", "to": "to", "windowSize": "window_size", "windowTimeZone": "window_time_zone",
                 "groupBy": "group_by", "subject": "subject"}
        kwargs = {names[k]: v for k, v in wire.items()}
        if filters:  # plain dicts: the SDK cannot JSON-encode its FilterString models on GET
            kwargs["advanced_meter_group_by_filters"] = filters
        return {"op": "meters.query_json", "args": [q["slug"]], "kwargs": kwargs}
    if filters:  # a JSON string: the JS SDK's serializer refuses nested objects
        wire["advancedMeterGroupByFilters"] = json.dumps(filters)
    return {"op": "meters.query", "args": [q["slug"], wire], "dates": ["1.from", "1.to"]}


@pytest.mark.parametrize("sdk", SDKS)
def test_meter_queries_get_and_post_match_the_oracle(sent: list[dict[str, Any]], sdk_call: SdkCall, sdk: str) -> None:
    calls = [_query_call(sdk, q, m) for q in QUERIES for m in ("get", "post")]
    results = sdk_call(sdk, calls)
    for i, result in enumerate(results):
        q = QUERIES[i // 2]
        assert "ok" in result, (q, result)
        group_by = [g for g in q.get("group_by", []) if g != "subject"]
        want = _oracle(sent, q)
        assert want, f"query {q} selects nothing, so it could not fail"
        assert response_windows(result["ok"], group_by) == want, (sdk, "get" if i % 2 == 0 else "post", q)


def test_python_sdk_csv_get_and_post(sent: list[dict[str, Any]], sdk_call: SdkCall) -> None:
    """CSV is exposed by the Python SDK only (`query_csv`, and `query_csv_post`, which sends no body)."""
    q = QUERIES[0]
    kwargs = {"from_parameter": _iso(q["from"]), "to": _iso(q["to"]), "window_size": q["window"],
              "window_time_zone": q["tz"], "group_by": q["group_by"]}
    got_csv, got_post = sdk_call("python", [
        {"op": "meters.query_csv", "args": [q["slug"]], "kwargs": kwargs},
        {"op": "meters.query_csv_post", "args": ["prompt_count"]},
    ])
    rows = list(csv.DictReader(io.StringIO(got_csv["ok"])))
    assert list(rows[0]) == ["window_start", "window_end", "subject", "model", "value"]
    got = {(parse_time(r["window_start"]), r["subject"], (r["model"] or None,)): Decimal(r["value"]) for r in rows}
    assert got == _oracle(sent, q)
    total = sum(1 for e in first_sightings(sent) if e["type"] == "prompt")
    [row] = list(csv.DictReader(io.StringIO(got_post["ok"])))
    assert Decimal(row["value"]) == total


@pytest.mark.parametrize("sdk", SDKS)
def test_meters_list_and_get(sent: list[dict[str, Any]], sdk_call: SdkCall, sdk: str) -> None:
    listed, got = sdk_call(sdk, [{"op": "meters.list"}, {"op": "meters.get", "args": ["tokens_avg"]}])
    assert {m["slug"]: m["aggregation"] for m in listed["ok"]} == {s: m.aggregation for s, m in METERS.items()}
    assert got["ok"]["slug"] == "tokens_avg" and got["ok"]["valueProperty"] == "$.tokens"


@pytest.mark.parametrize("sdk", SDKS)
def test_events_v1_and_v2(sent: list[dict[str, Any]], sdk_call: SdkCall, sdk: str) -> None:
    events = first_sightings(sent)
    newest = sorted(events, key=lambda e: parse_time(e["time"]), reverse=True)
    want_v1 = [e["id"] for e in newest if "customer-1" in e["subject"]][:100]
    want_v2 = {e["id"] for e in events if e["subject"] == "customer-2"}
    v2_filter = {"subject": {"$eq": "customer-2"}, "time": {"$gte": _iso(START)}}
    if sdk == "python":
        v1, v2 = sdk_call(sdk, [
            {"op": "events.list", "kwargs": {"from_parameter": _iso(START), "subject": "customer-1", "limit": 100}},
            {"op": "events_v2.list", "kwargs": {"limit": 25, "filter": v2_filter}},  # a pager: follows nextCursor
        ])
        assert {e["event"]["id"] for e in v2["ok"]} == want_v2 and len(v2["ok"]) == len(want_v2)
    else:
        v1, page = sdk_call(sdk, [
            {"op": "events.list", "args": [{"from": _iso(START), "subject": "customer-1", "limit": 100}], "dates": ["0.from"]},
            {"op": "events.listV2", "args": [{"limit": 25, "filter": json.dumps(v2_filter)}]},
        ])
        seen = [e["event"]["id"] for e in page["ok"]["items"]]
        cursor = page["ok"].get("nextCursor")
        while cursor:
            [nxt] = sdk_call(sdk, [{"op": "events.listV2",
                                    "args": [{"limit": 25, "filter": json.dumps(v2_filter), "cursor": cursor}]}])
            seen += [e["event"]["id"] for e in nxt["ok"]["items"]]
            cursor = nxt["ok"].get("nextCursor") if nxt["ok"]["items"] else None
        assert set(seen) == want_v2 and len(seen) == len(want_v2)
    assert [e["event"]["id"] for e in v1["ok"]] == want_v1
    by_id = {e["event"]["id"]: e for e in v1["ok"]}
    for e in events:
        if e["id"] in by_id and "traceparent" in e:  # extensions and datacontenttype come back as sent
            assert by_id[e["id"]]["event"]["traceparent"] == e["traceparent"]
            assert by_id[e["id"]]["event"]["datacontenttype"] == "application/json"
    assert all(e["storedAt"] and e["ingestedAt"] for e in v1["ok"])


@pytest.mark.parametrize("sdk", SDKS)
def test_group_by_values_and_meter_subjects(sent: list[dict[str, Any]], sdk_call: SdkCall, sdk: str) -> None:
    prompts = [e for e in first_sightings(sent) if e["type"] == "prompt"]
    models = sorted({e["data"]["model"] for e in prompts if "model" in e["data"]})
    if sdk == "python":
        values, subjects = sdk_call(sdk, [
            {"op": "meters.list_group_by_values", "args": ["tokens_total", "model"],
             "kwargs": {"from_parameter": _iso(START), "to": _iso(END)}},
            {"op": "meters.list_subjects", "args": ["tokens_total"]},
        ])
        assert subjects["ok"] == sorted({e["subject"] for e in prompts})
    else:
        [values] = sdk_call(sdk, [{"op": "meters.listGroupByValues",
                                   "args": ["tokens_total", "model", {"from": _iso(START), "to": _iso(END)}],
                                   "dates": ["2.from", "2.to"]}])
    assert values["ok"] == models


@pytest.mark.parametrize("sdk", SDKS)
def test_subjects_and_debug_metrics(sent: list[dict[str, Any]], sdk_call: SdkCall, sdk: str) -> None:
    key = "customer-3" if sdk == "python" else f"customer-3-{sdk}"
    if sdk == "python":
        # A subject entity names a metered subject in the CSV export (subject_display_name).
        named, csv_text = sdk_call(sdk, [
            {"op": "subjects.upsert", "args": [[{"model": "SubjectUpsert", "value": {"key": key, "displayName": "=Three"}}]]},
            {"op": "meters.query_csv", "args": ["prompt_count"],
             "kwargs": {"from_parameter": _iso(START), "to": _iso(END), "group_by": ["subject"]}},
        ])
        assert named["ok"][0]["displayName"] == "=Three"
        rows = list(csv.DictReader(io.StringIO(csv_text["ok"])))
        assert list(rows[0]) == ["window_start", "window_end", "subject", "subject_display_name", "value"]
        names = {r["subject"]: r["subject_display_name"] for r in rows}
        assert names.pop(key) == "'=Three" and set(names.values()) == {""}  # formula-like text is defused
        counts = Counter(e["subject"] for e in first_sightings(sent) if e["type"] == "prompt")
        assert {r["subject"]: Decimal(r["value"]) for r in rows} == {s: Decimal(n) for s, n in counts.items()}
        upsert = {"op": "subjects.upsert", "args": [[{"model": "SubjectUpsert", "value": {
            "key": key, "displayName": "Customer Three", "metadata": {"plan": "pro"}}}]]}
        metrics = {"op": "debug.metrics"}
    else:
        upsert = {"op": "subjects.upsert", "args": [{"key": key, "displayName": "Customer Three",
                                                     "metadata": {"plan": "pro"}}]}
        metrics = {"op": "debug.getMetrics", "args": [{"parseAs": "text"}]}  # the SDK would parse text as JSON
    created, got, listed, deleted, gone, text = sdk_call(sdk, [
        upsert, {"op": "subjects.get", "args": [key]}, {"op": "subjects.list"},
        {"op": "subjects.delete", "args": [key]}, {"op": "subjects.get", "args": [key]}, metrics,
    ])
    [subject] = created["ok"]
    assert subject["key"] == key and subject["displayName"] == "Customer Three" and len(subject["id"]) == 26
    assert got["ok"]["metadata"] == {"plan": "pro"} and got["ok"]["id"] == subject["id"]
    assert key in [s["key"] for s in listed["ok"]]
    assert "ok" in deleted and gone["error"]["status"] == 404
    counts = {line.split('"')[1]: Decimal(line.rsplit(" ", 1)[1])
              for line in text["ok"].splitlines() if line.startswith("openmeter_events_total{")}
    want = Counter(e["subject"] for e in first_sightings(sent))
    if datetime.now(UTC).hour != 0 or datetime.now(UTC).minute > 30:  # counters reset at midnight UTC
        assert counts == {s: Decimal(n) for s, n in want.items()}


@pytest.mark.parametrize("sdk", SDKS)
def test_problems_reach_the_user(sent: list[dict[str, Any]], sdk_call: SdkCall, sdk: str) -> None:
    """Both SDKs show meterline's `detail` (naming the field) in the error they raise."""
    event = {"id": "never-stored", "source": "conformance", "specversion": "1.0", "type": "prompt",
             "subject": "nobody", "time": _iso(START), "data": {"tokens": 1}}
    if sdk == "python":
        calls = [{"op": "meters.query_json", "args": ["tokens_total"],
                  "kwargs": {"window_time_zone": "right/UTC", "window_size": "DAY"}},
                 {"op": "meters.get", "args": ["nope"]},
                 {"op": "meters.query", "args": ["tokens_total", {"model": "MeterQueryRequest",
                                                                  "value": {"filterCustomerId": ["c"]}}]},
                 {"op": "events.ingest_event", "args": [{"model": "Event", "value": event}],
                  "kwargs": {"content_type": "text/plain"}}]
    else:
        calls = [{"op": "meters.query", "args": ["tokens_total", {"windowTimeZone": "right/UTC", "windowSize": "DAY"}]},
                 {"op": "meters.get", "args": ["nope"]},
                 {"op": "meters.queryPost", "args": ["tokens_total", {"filterCustomerId": ["c"]}]},
                 {"op": "events.ingest", "args": [event, {"headers": {"Content-Type": "text/plain"}}]}]
    tz, missing, customer, media = sdk_call(sdk, calls)
    # RFC 9110 §15.5.16: an unsupported Content-Type is a 415 (OpenMeter answers 400); the message still shows.
    assert media["error"]["status"] == 415 and "Content-Type" in media["error"]["message"], media
    assert tz["error"]["status"] == 400 and "windowTimeZone" in tz["error"]["message"]
    assert tz["error"]["problem"]["extensions"]["validationErrors"][0]["field"] == "windowTimeZone"
    assert missing["error"]["status"] == 404 and "nope" in missing["error"]["message"]
    assert customer["error"]["status"] == 400 and "customers" in customer["error"]["message"]


def _wait_ready(stack: LocalStack, slug: str, timeout: float = 180.0) -> None:
    """A new meter builds its history from stored events first; poll the way a user would (GET meter)."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        stack.assert_running()
        res = httpx.get(f"{stack.url}/api/v1/meters/{slug}")
        state = res.json().get("annotations", {}).get("meterline.state") if res.is_success else res.status_code
        if state == "ready":
            return
        time.sleep(0.5)
    pytest.fail(f"meter {slug} did not become ready: {state}")


@pytest.mark.parametrize("sdk", SDKS)
def test_meter_create_update_delete(stack: LocalStack, sent: list[dict[str, Any]], sdk_call: SdkCall, sdk: str) -> None:
    """createMeter / updateMeter / deleteMeter through each SDK; the new meter's history is exact."""
    slug = f"sdk_{sdk}_tokens_max"
    create = {"slug": slug, "name": "Max tokens", "eventType": "prompt", "aggregation": "MAX",
              "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}}
    update = {"name": "Largest prompt", "description": "per model", "groupBy": {"model": "$.model"}}
    if sdk == "python":
        [created] = sdk_call(sdk, [{"op": "meters.create", "args": [{"model": "MeterCreate", "value": create}]}])
    else:
        [created] = sdk_call(sdk, [{"op": "meters.create", "args": [create]}])
    assert "ok" in created, created
    assert created["ok"]["slug"] == slug and len(created["ok"]["id"]) == 26 and created["ok"]["createdAt"]
    _wait_ready(stack, slug)

    q = {"slug": slug, "from": START, "to": END, "window": "HOUR", "group_by": ["model"]}
    if sdk == "python":
        calls = [_query_call(sdk, q, "get"),
                 {"op": "meters.update", "args": [slug, {"model": "MeterUpdate", "value": update}]},
                 {"op": "meters.get", "args": [slug]}, {"op": "meters.delete", "args": [slug]},
                 {"op": "meters.get", "args": [slug]}, {"op": "meters.list"}]
    else:
        calls = [_query_call(sdk, q, "get"), {"op": "meters.update", "args": [slug, update]},
                 {"op": "meters.get", "args": [slug]}, {"op": "meters.delete", "args": [slug]},
                 {"op": "meters.get", "args": [slug]}, {"op": "meters.list"}]
    answer, updated, got, deleted, gone, listed = sdk_call(sdk, calls)
    meter = OracleMeter(slug, "prompt", "MAX", "tokens", ("model",))
    want = expected(first_sightings(sent), meter, start=START, end=END, window="HOUR", group_by=["model"],
                    by_subject=False)
    assert want and response_windows(answer["ok"], ["model"]) == want
    assert updated["ok"]["name"] == "Largest prompt" and got["ok"]["description"] == "per model"
    assert got["ok"]["id"] == created["ok"]["id"]
    assert "ok" in deleted and gone["error"]["status"] == 404
    assert slug not in [m["slug"] for m in listed["ok"]]
