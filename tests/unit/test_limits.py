"""Per-key limits (meterline.adapters.limits) and the query cost estimate (query/cost.py), in memory."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.adapters.limits import Limiter, LimitMiddleware
from meterline.core.access import KEY_SCOPES, Principal
from meterline.core.errors import QueryTooLargeError, RateLimitedError
from meterline.settings import Settings
from query.cost import check_cost, estimated_rows

A = Principal("acme", KEY_SCOPES, key_id="a")
B = Principal("acme", KEY_SCOPES, key_id="b")


def _limiter(**values: Any) -> Limiter:
    return Limiter(Settings(**values))


def test_request_rate_per_key() -> None:
    limiter = _limiter(rate_limit_requests="5/minute")
    for _ in range(5):
        limiter.charge_request(A)
    with pytest.raises(RateLimitedError) as refused:
        limiter.charge_request(A)
    assert 1 <= refused.value.retry_after <= 60
    for _ in range(5):
        limiter.charge_request(B)  # another key has its own budget


def test_event_rate_counts_events() -> None:
    limiter = _limiter(rate_limit_events="100/minute")
    limiter.charge_events(A, 60)
    with pytest.raises(RateLimitedError):
        limiter.charge_events(A, 41)
    limiter.charge_events(A, 40)  # the refused 41 were not counted
    with pytest.raises(RateLimitedError, match="in one request"):
        limiter.charge_events(B, 101)
    limiter.charge_events(B, 100)


async def test_concurrency_limit_answers_429_and_frees_slots() -> None:
    limiter = _limiter(max_concurrent_requests=2)
    release = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = LimitMiddleware(slow, limiter)

    async def call(principal: Principal) -> tuple[int, dict[bytes, bytes]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "state": {"principal": principal}}
        await middleware(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    first = [asyncio.create_task(call(A)) for _ in range(2)]
    await asyncio.sleep(0)
    while sum(limiter.in_flight.values()) < 2:
        await asyncio.sleep(0.001)
    status, headers = await call(A)
    assert status == 429 and headers[b"retry-after"] == b"1"
    other = asyncio.create_task(call(B))  # B is not held back by A's requests
    release.set()
    assert [await t for t in first] == [(204, {}), (204, {})]
    assert await other == (204, {})
    assert not limiter.in_flight  # every slot released
    assert (await call(A))[0] == 204


@settings(max_examples=200)
@given(st.integers(0, 3000), st.sampled_from([None, "MINUTE", "HOUR", "DAY", "MONTH"]),
       st.lists(st.text(min_size=1, max_size=3), max_size=4, unique=True), st.booleans())
def test_estimate_bounds_the_real_window_count(minutes: int, size: str | None, subjects: list[str], by: bool) -> None:
    start = datetime(2024, 1, 31, 22, 0, tzinfo=UTC)
    end = start + timedelta(minutes=minutes + 1)
    # Oracle: walk minute by minute and count distinct UTC buckets (UTC is the most buckets any zone has
    # for MINUTE and HOUR; a zone's DAY/MONTH boundaries shift but their count differs by at most one).
    keys = {
        {"MINUTE": lambda t: t, "HOUR": lambda t: t.replace(minute=0), "DAY": lambda t: t.date(),
         "MONTH": lambda t: (t.year, t.month), None: lambda t: 0}[size](start + timedelta(minutes=i))
        for i in range(minutes + 1)
    }
    series = len(subjects) if by and subjects else 1
    assert estimated_rows(start, end, size, subjects, by) >= len(keys) * series


def test_cost_ceiling_names_the_parameter() -> None:
    start = datetime(2000, 1, 1, tzinfo=UTC)
    end = datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(QueryTooLargeError) as refused:
        check_cost(start, end, "MINUTE", [], True, 100_000)
    assert refused.value.field == "windowSize"
    check_cost(start, end, "MONTH", [], True, 100_000)
    check_cost(None, end, "MINUTE", [], True, 100_000)  # without `from` only ClickHouse knows
    with pytest.raises(QueryTooLargeError):
        check_cost(end - timedelta(days=30), end, "HOUR", [f"s{i}" for i in range(200)], True, 100_000)
    check_cost(end - timedelta(days=30), end, "HOUR", [f"s{i}" for i in range(200)], False, 100_000)


def test_keyless_local_mode_is_not_limited() -> None:
    limiter = _limiter(rate_limit_requests="1/minute", rate_limit_events="1/minute")
    local = Principal("default", KEY_SCOPES)
    for _ in range(10):
        limiter.charge_events(local, 5)
    keyed = Principal("default", KEY_SCOPES, key_id="k")
    limiter.charge_events(keyed, 1)
    with pytest.raises(RateLimitedError):
        limiter.charge_events(keyed, 1)
