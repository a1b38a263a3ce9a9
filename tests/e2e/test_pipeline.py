"""HTTP → Kafka → Faust → ClickHouse → query API, on the real local stack, against an oracle.

A few thousand generated events (several subjects, meters and aggregations, exact duplicates resent
in later batches, some unmeterable values) go through `POST /api/v1/events`; once the processor has
caught up, every window the query API returns is compared with the oracle in tests/oracle.py.
"""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from meterline.localinfra.stack import LocalStack
from tests.e2e.conftest import METERS
from tests.oracle import (
    EventFactory,
    Key,
    expected,
    filter_matches,
    first_sightings,
    parse_time,
    response_windows,
)

pytestmark = pytest.mark.e2e

START = datetime(2024, 1, 1, tzinfo=UTC)
END = START + timedelta(days=1)
CONTENT_TYPES = ("application/cloudevents-batch+json", "application/json")


@pytest.fixture(scope="module")
def sent(stack: LocalStack) -> list[dict[str, Any]]:
    """Send ~3000 events (10% resent duplicates) in mixed batches and singles; return all that got 204."""
    factory = EventFactory(seed=7, start=START, span=timedelta(hours=5, minutes=30))
    fresh = [factory.event(invalid_rate=0.03, large_rate=0.05) for _ in range(2700)]
    rng = random.Random(11)
    stream = fresh + [dict(e) for e in rng.sample(fresh, 300)]  # exact duplicates, sent later
    accepted: list[dict[str, Any]] = []
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        i = 0
        while i < len(stream):
            if rng.random() < 0.1:
                chunk = stream[i : i + 1]
                resp = client.post(
                    "/api/v1/events", json=chunk[0], headers={"content-type": "application/cloudevents+json"}
                )
            else:
                chunk = stream[i : i + rng.randrange(50, 400)]
                resp = client.post(
                    "/api/v1/events", json=chunk, headers={"content-type": rng.choice(CONTENT_TYPES)}
                )
            assert resp.status_code == 204, resp.text
            accepted.extend(chunk)
            i += len(chunk)
    wait_until_counted(stack, first_sightings(accepted))
    return accepted


def wait_until_counted(stack: LocalStack, events: list[dict[str, Any]], timeout: float = 180.0) -> None:
    """Poll the COUNT meter until it reaches the oracle's total (a liveness bound, not a speed test)."""
    want = sum(1 for e in events if e["type"] == "prompt")
    deadline = time.monotonic() + timeout
    got: Any = None
    while time.monotonic() < deadline:
        stack.assert_running()
        resp = httpx.get(
            f"{stack.url}/api/v1/meters/prompt_count/query",
            params={"from": START.isoformat(), "to": END.isoformat()},
            timeout=10,
        )
        if resp.status_code == 200:
            got = sum(Decimal(str(r["value"])) for r in resp.json()["data"])
            if got == want:
                return
        time.sleep(0.5)
    pytest.fail(f"processor did not catch up: prompt_count={got}, expected {want}; logs in {stack.data_dir}/logs")


def query(stack: LocalStack, slug: str, **params: Any) -> dict[str, Any]:
    resp = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", params=params, timeout=30)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = json.loads(resp.text, parse_float=Decimal)  # every digit, not a float's 17
    return body


@pytest.mark.parametrize("slug", sorted(METERS))
@pytest.mark.parametrize("window", ["HOUR", "MINUTE", None])
def test_every_window_matches_the_oracle(stack: LocalStack, sent: list[dict[str, Any]], slug: str, window: str | None) -> None:
    got, want = windows_and_oracle(stack, sent, slug, window)
    assert got == want


def windows_and_oracle(stack: LocalStack, sent: list[dict[str, Any]], slug: str,
                       window: str | None) -> tuple[dict[Key, Decimal], dict[Key, Decimal]]:
    """Every window of `slug` over [START, END) grouped by subject and all its groupBy keys, as the API
    answers it and as the oracle computes it from the first sightings of `sent`."""
    meter = METERS[slug]
    group_by = list(meter.group_fields)
    params: dict[str, Any] = {"from": START.isoformat(), "to": END.isoformat(), "groupBy": ["subject", *group_by]}
    if window:
        params["windowSize"] = window
    got = response_windows(query(stack, slug, **params), group_by)
    want = expected(first_sightings(sent), meter, start=START, end=END, window=window, group_by=group_by)
    return got, want


@pytest.mark.parametrize("tz", ["Asia/Kolkata", "Asia/Kathmandu", "America/New_York"])
def test_hourly_windows_in_a_time_zone(stack: LocalStack, sent: list[dict[str, Any]], tz: str) -> None:
    meter = METERS["tokens_total"]
    body = query(
        stack, meter.slug, **{"from": START.isoformat(), "to": END.isoformat(), "windowSize": "HOUR",
                              "windowTimeZone": tz, "groupBy": ["subject"]}
    )
    want = expected(first_sightings(sent), meter, start=START, end=END, window="HOUR", tz=tz)
    assert response_windows(body, ()) == want


def test_subject_filter(stack: LocalStack, sent: list[dict[str, Any]]) -> None:
    meter = METERS["tokens_total"]
    body = query(stack, meter.slug, **{"from": START.isoformat(), "to": END.isoformat(), "subject": ["customer-2"],
                                       "windowSize": "HOUR"})
    want = expected(
        [e for e in first_sightings(sent) if e["subject"] == "customer-2"],
        meter, start=START, end=END, window="HOUR",
    )
    got = {(k[0], "customer-2", k[2]): v for k, v in response_windows(body, ()).items()}
    assert got == want


def test_duplicates_were_sent_and_dropped(stack: LocalStack, sent: list[dict[str, Any]]) -> None:
    """The oracle differs from a naive sum when duplicates count, so the comparison above can fail."""
    meter = METERS["prompt_count"]
    naive = sum(1 for e in sent if e["type"] == "prompt")
    deduped = sum(expected(first_sightings(sent), meter, start=START, end=END, window=None, by_subject=False).values())
    assert naive > deduped


def _second(t: datetime) -> datetime:
    return t.replace(microsecond=0)


EDGE_CASES = [
    # (from, to) offsets from START: sub-second edges on both sides, both inside one minute, whole minutes
    (timedelta(minutes=7, seconds=15, microseconds=250_000), timedelta(hours=2, minutes=3, seconds=41, microseconds=999_999)),
    (timedelta(hours=1, minutes=30, seconds=5), timedelta(hours=1, minutes=30, seconds=55, microseconds=1)),
    (timedelta(minutes=59, seconds=59, microseconds=999_999), timedelta(hours=3, minutes=1)),
    (timedelta(hours=4), timedelta(hours=4, minutes=10, seconds=0, microseconds=500_000)),
]


@pytest.mark.parametrize("slug", sorted(METERS))
@pytest.mark.parametrize(("lo", "hi"), EDGE_CASES)
def test_any_second_is_exact(stack: LocalStack, sent: list[dict[str, Any]], slug: str, lo: timedelta, hi: timedelta) -> None:
    """from/to at any instant: cut to the second, edge minutes from raw events, whole minutes from windows."""
    meter = METERS[slug]
    group_by = list(meter.group_fields)
    start, end = START + lo, START + hi
    for window in (None, "MINUTE", "HOUR"):
        params: dict[str, Any] = {"from": start.isoformat(), "to": end.isoformat(), "groupBy": ["subject", *group_by]}
        if window:
            params["windowSize"] = window
        body = query(stack, slug, **params)
        got = response_windows(body, group_by)
        want = expected(first_sightings(sent), meter, start=_second(start), end=_second(end), window=window,
                        group_by=group_by)
        if window is None:  # the total's window is from..to as given
            want = {(start, *k[1:]): v for k, v in want.items()}
        assert got == want, (window, start, end)
    if meter.event_type == "prompt":  # ~5 prompts a minute: every case selects some, so it can fail
        assert want


def test_query_without_to_includes_the_current_minute(stack: LocalStack, sent: list[dict[str, Any]]) -> None:
    """An event timed now is counted by a query without `to` (OpenMeter has no upper bound then)."""
    now = datetime.now(UTC)
    event = {"specversion": "1.0", "id": f"now-{now.timestamp()}", "source": "e2e", "type": "prompt",
             "subject": "now-subject", "time": now.isoformat(), "data": {"tokens": 7, "model": "m", "type": "input"}}
    resp = httpx.post(f"{stack.url}/api/v1/events", json=event, headers={"content-type": "application/cloudevents+json"})
    assert resp.status_code == 204, resp.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = query(stack, "tokens_total", subject=["now-subject"], **{"from": (now - timedelta(seconds=1)).isoformat()})
        if body["data"]:
            break
        time.sleep(0.5)
    assert [(r["subject"], r["value"]) for r in body["data"]] == [("now-subject", 7)]
    assert "to" not in body
    row = body["data"][0]
    assert parse_time(row["windowEnd"]) == now.replace(second=0, microsecond=0) + timedelta(minutes=1)


FILTERS = [
    {"model": {"$eq": "gpt-4"}},
    {"model": {"$ne": "gpt-4"}},
    {"model": {"$in": ["gpt-4", "claude"]}, "type": {"$eq": "input"}},
    {"model": {"$nin": ["gpt-4"]}},
    {"model": {"$like": "gpt%"}},
    {"model": {"$contains": "PT"}},
    {"model": {"$or": [{"$eq": "claude"}, {"$and": [{"$gt": "gpt-3"}, {"$ncontains": "4"}]}]}},
]


@pytest.mark.parametrize("filters", FILTERS)
def test_post_query_with_advanced_filters(stack: LocalStack, sent: list[dict[str, Any]], filters: dict[str, Any]) -> None:
    """POST /query (queryMeterPost) with advancedMeterGroupByFilters; GET with the same JSON agrees."""
    meter = METERS["tokens_total"]
    body = {"from": START.isoformat(), "to": END.isoformat(), "windowSize": "HOUR", "groupBy": ["model", "type"],
            "subject": ["customer-1", "customer-3"], "advancedMeterGroupByFilters": filters}
    resp = httpx.post(f"{stack.url}/api/v1/meters/tokens_total/query", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    got = response_windows(json.loads(resp.text, parse_float=Decimal), ["model", "type"])

    def where(ev: dict[str, Any]) -> bool:
        data = ev.get("data") or {}
        return ev["subject"] in ("customer-1", "customer-3") and all(
            filter_matches(data.get(k), f) for k, f in filters.items())

    want = expected(first_sightings(sent), meter, start=START, end=END, window="HOUR", group_by=["model", "type"],
                    where=where)
    assert want and got == want
    params = {"from": START.isoformat(), "to": END.isoformat(), "windowSize": "HOUR", "groupBy": ["model", "type"],
              "subject": ["customer-1", "customer-3"], "advancedMeterGroupByFilters": json.dumps(filters)}
    assert response_windows(query(stack, "tokens_total", **params), ["model", "type"]) == want


def test_post_query_multi_value_filter_group_by_and_csv(stack: LocalStack, sent: list[dict[str, Any]]) -> None:
    meter = METERS["tokens_total"]
    body = {"from": START.isoformat(), "to": END.isoformat(), "groupBy": ["subject", "model"],
            "filterGroupBy": {"model": ["gpt-4", "claude"]}}
    resp = httpx.post(f"{stack.url}/api/v1/meters/tokens_total/query", json=body, headers={"accept": "text/csv"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv"), resp.text
    lines = resp.text.split("\r\n")
    assert lines[0] == "window_start,window_end,subject,model,value" and lines[-1] == ""
    want = expected(first_sightings(sent), meter, start=START, end=END, window=None, group_by=["model"],
                    where=lambda ev: (ev.get("data") or {}).get("model") in ("gpt-4", "claude"))
    got = {}
    for line in lines[1:-1]:
        ws, we, subject, model, value = line.split(",")
        assert (parse_time(ws), parse_time(we)) == (START, END)
        got[(START, subject, (model,))] = Decimal(value)
    assert want and got == want


def test_a_busy_edge_minute_is_exact(stack: LocalStack, sent: list[dict[str, Any]]) -> None:
    """3000 subjects in one edge minute: the edge deltas (~0.7 MB) travel as a temporary table; as a bound
    parameter they hit ClickHouse's HTTP form field limit (~128 KiB) and the query failed with a 503."""
    base = datetime(2025, 6, 1, tzinfo=UTC)
    busy = [{"specversion": "1.0", "id": f"busy-{i}", "source": "e2e-busy", "type": "prompt", "subject": f"busy-{i}",
             "time": (base + timedelta(milliseconds=20 * i)).isoformat(), "data": {"tokens": i % 97, "model": f"m{i % 7}"}}
            for i in range(3000)]
    resp = httpx.post(f"{stack.url}/api/v1/events", json=busy, headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 204, resp.text
    deadline = time.monotonic() + 180
    params = {"from": base.isoformat(), "to": (base + timedelta(minutes=2)).isoformat()}
    while time.monotonic() < deadline:
        body = query(stack, "prompt_count", **params)
        if sum(r["value"] for r in body["data"]) == len(busy):
            break
        time.sleep(0.5)
    start, end = base + timedelta(seconds=5, milliseconds=500), base + timedelta(seconds=55)
    got = response_windows(query(stack, "tokens_total", **{"from": start.isoformat(), "to": end.isoformat(),
                                                           "groupBy": ["subject", "model"]}), ["model"])
    want = expected(busy, METERS["tokens_total"], start=_second(start), end=end, window=None, group_by=["model"])
    assert len(want) > 2000 and got == {(start, *k[1:]): v for k, v in want.items()}
