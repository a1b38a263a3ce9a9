"""Exact decimals end to end: 38-digit values, totals past 10^29 and extreme averages go through
ingest -> Kafka -> processor -> ClickHouse -> the query API, and every JSON and CSV answer is compared
digit for digit with an oracle computed here in a 200-digit context.

Values are sent as JSON strings (ingest refuses JSON numbers a float would round). All events of one
example share a subject and a minute; each request is one Kafka message, so one message's window sum
must fit Decimal128(9): a value that would push it past 10^29 is dead-lettered for the numeric meters
(COUNT still counts it), and the oracle models exactly that. Across messages totals are summed as
Decimal256 and may exceed 10^29.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meterline.localinfra.stack import LocalStack

pytestmark = pytest.mark.e2e

WIDE = Context(prec=200)
LIMIT = Decimal(10) ** 29  # Decimal128(9): 29 integer digits
T0 = datetime(2030, 1, 1, tzinfo=UTC)  # away from test_pipeline's windows
NUMERIC = ("big_sum", "big_avg", "big_min", "big_max", "big_latest")

units = st.one_of(
    st.integers(-(10**38) + 1, 10**38 - 1),  # anything Decimal128(9) stores (38 digits)
    st.integers(10**37, 10**38 - 1),  # >= 10^28: a few of these overflow one message's window sum
    st.integers(-(10**20), 10**20),
)
values_strategy = st.lists(units.map(lambda u: Decimal(u).scaleb(-9, WIDE)), min_size=1, max_size=8)


def text_of(value: Decimal, style: int) -> str:
    """The value as a JSON string a client might send: plain, scientific, or with trailing zeros."""
    if style == 0:
        return format(value, "f")
    if style == 1:
        return format(value.normalize(WIDE), "e")
    return format(value.quantize(Decimal("1e-9"), context=WIDE), "f")


def oracle(values: list[Decimal], times: list[datetime], messages: list[list[int]]) -> dict[str, Decimal]:
    """Each numeric meter's answer: per message a running window sum; a value that would take it to
    10^29 or beyond is rejected. AVG rounds half-even to 9 places, LATEST is the latest event time."""
    accepted: list[int] = []
    with localcontext(WIDE):
        for message in messages:
            running = Decimal(0)
            for i in message:
                if abs(running + values[i]) < LIMIT:
                    running += values[i]
                    accepted.append(i)
        kept = [values[i] for i in accepted]
        total = sum(kept, Decimal(0))
        return {
            "big_sum": total,
            "big_avg": (total / len(kept)).quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN),
            "big_min": min(kept),
            "big_max": max(kept),
            "big_latest": values[max(accepted, key=lambda i: times[i])],
        }


def wait_counted(stack: LocalStack, subject: str, want: int, timeout: float = 120.0) -> None:
    """Poll the COUNT meter of this subject until every event is in (a liveness bound, not a speed test)."""
    deadline = time.monotonic() + timeout
    got: Any = None
    while time.monotonic() < deadline:
        stack.assert_running()
        resp = httpx.get(f"{stack.url}/api/v1/meters/big_count/query", params=_params(subject), timeout=10)
        if resp.status_code == 200:
            got = sum(int(r["value"]) for r in resp.json()["data"])
            if got == want:
                return
        time.sleep(0.2)
    pytest.fail(f"processor did not catch up: big_count={got}, expected {want}; logs in {stack.data_dir}/logs")


def _params(subject: str) -> dict[str, str]:
    return {"from": "2030-01-01T00:00:00Z", "to": "2030-01-01T01:00:00Z", "subject": subject}


@settings(max_examples=3, deadline=None)
@given(values=values_strategy, split=st.integers(0, 8), seed=st.integers(0, 2**32), style=st.integers(0, 2))
# The examples: a 23+9-digit sum (the CSV wrote ...123.12346) and an average of 1e20 (a 500).
@example(values=[Decimal(12345678901234567890000), Decimal("123.123456789")], split=0, seed=0, style=0)
@example(values=[Decimal("1e20"), Decimal("1e20"), Decimal("2e20")], split=1, seed=1, style=1)
# Two messages of 9e28: each window sum fits, the total (1.8e29) needs more than Decimal128.
@example(values=[Decimal("9e28"), Decimal("9e28"), Decimal("9e28")], split=1, seed=2, style=0)
def test_extreme_values_are_exact_in_json_and_csv(
    stack: LocalStack, values: list[Decimal], split: int, seed: int, style: int
) -> None:
    rng = random.Random(seed)
    subject = f"exact-{uuid.uuid4().hex}"
    times = [T0 + timedelta(microseconds=us) for us in rng.sample(range(60_000_000), len(values))]
    events = [
        {"specversion": "1.0", "id": f"{subject}-{i}", "source": "exact", "type": "big", "subject": subject,
         "time": t.isoformat().replace("+00:00", "Z"), "data": {"v": text_of(v, style)}}
        for i, (v, t) in enumerate(zip(values, times, strict=True))
    ]
    cut = min(split, len(events))
    messages = [m for m in (list(range(cut)), list(range(cut, len(events)))) if m]
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for message in messages:
            resp = client.post("/api/v1/events", json=[events[i] for i in message],
                               headers={"content-type": "application/cloudevents-batch+json"})
            assert resp.status_code == 204, resp.text
    want = oracle(values, times, messages)
    wait_counted(stack, subject, len(values))

    for slug in NUMERIC:
        resp = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", params=_params(subject), timeout=30)
        assert resp.status_code == 200, resp.text
        [row] = json.loads(resp.text, parse_float=Decimal)["data"]
        assert Decimal(row["value"]) == want[slug], (slug, resp.text)

        resp = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", params=_params(subject),
                         headers={"accept": "text/csv"}, timeout=30)
        assert resp.status_code == 200, resp.text
        [row] = list(csv.DictReader(io.StringIO(resp.text)))
        assert "e" not in row["value"].lower() and Decimal(row["value"]) == want[slug], (slug, resp.text)
