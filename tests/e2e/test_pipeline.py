"""HTTP → Kafka → Faust → ClickHouse → query API, on the real local stack, against an oracle.

A few thousand generated events (several subjects, meters and aggregations, exact duplicates resent
in later batches, some unmeterable values) go through `POST /api/v1/events`; once the processor has
caught up, every window the query API returns is compared with the oracle in tests/oracle.py.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from meterline.localinfra.stack import LocalStack
from tests.e2e.conftest import METERS
from tests.oracle import EventFactory, expected, first_sightings, response_windows

pytestmark = pytest.mark.e2e

START = datetime(2024, 1, 1, tzinfo=UTC)
END = START + timedelta(days=1)
CONTENT_TYPES = ("application/cloudevents-batch+json", "application/json")


@pytest.fixture(scope="module")
def sent(stack: LocalStack) -> list[dict[str, Any]]:
    """Send ~3000 events (10% resent duplicates) in mixed batches and singles; return all that got 204."""
    factory = EventFactory(seed=7, start=START, span=timedelta(hours=5, minutes=30))
    fresh = [factory.event(invalid_rate=0.03) for _ in range(2700)]
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
    return resp.json()


@pytest.mark.parametrize("slug", sorted(METERS))
@pytest.mark.parametrize("window", ["HOUR", "MINUTE", None])
def test_every_window_matches_the_oracle(stack: LocalStack, sent: list[dict[str, Any]], slug: str, window: str | None) -> None:
    meter = METERS[slug]
    group_by = list(meter.group_fields)
    params: dict[str, Any] = {"from": START.isoformat(), "to": END.isoformat(), "groupBy": ["subject", *group_by]}
    if window:
        params["windowSize"] = window
    got = response_windows(query(stack, slug, **params), group_by)
    want = expected(first_sightings(sent), meter, start=START, end=END, window=window, group_by=group_by)
    assert got == want


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
