"""meterline.core.windows: RFC 3339 parsing, minute windows, exact per-message accumulation."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Context, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.meters import Meter, MeterSet
from meterline.core.windows import WindowAccumulator, format_time, parse_time, window_start


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00.001Z", datetime(2024, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)),
        ("2025-02-18T16:37:44Z", datetime(2025, 2, 18, 16, 37, 44, tzinfo=UTC)),
        ("2024-01-01t00:00:00z", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01 00:00:00Z", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01T01:30:00+01:30", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2023-12-31T19:00:00-05:00", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01T00:00:00-00:00", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01T00:00:59.999999999Z", datetime(2024, 1, 1, 0, 0, 59, 999999, tzinfo=UTC)),
        ("2024-01-01T00:00:00.5Z", datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    got = parse_time(text)
    assert got == expected and got.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("2024-01-01T00:00:00", "no time zone"),
        ("2024-01-01T00:00:00.123", "no time zone"),
        ("2024-01-01", "not RFC 3339"),
        ("2024-01-01T00:00:00.1234567890Z", "not RFC 3339"),
        ("2024-02-30T00:00:00Z", "invalid"),
        ("2024-01-01T24:00:00Z", "invalid"),
        ("2024-01-01T00:00:00+24:00", "invalid offset"),
        ("yesterday", "not RFC 3339"),
        ("2024-01-01T00:00:00Z ", "not RFC 3339"),
    ],
)
def test_parse_time_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_time(text)


def test_parse_time_non_string() -> None:
    with pytest.raises(ValueError):
        parse_time(123)  # type: ignore[arg-type]


aware = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC))


@given(aware, st.integers(-14 * 4, 14 * 4))
def test_format_parse_round_trip(t: datetime, quarter_hours: int) -> None:
    shifted = t.astimezone(timezone(timedelta(minutes=15 * quarter_hours)))
    text = format_time(shifted)
    assert text.endswith("Z") and len(text) == len("2024-01-01T00:00:00.000000Z")
    assert parse_time(text) == t
    assert parse_time(shifted.isoformat()) == t


def test_format_time_rejects_naive() -> None:
    with pytest.raises(ValueError):
        format_time(datetime(2024, 1, 1))


@given(aware, st.sampled_from([1, 60, 300, 3600]))
def test_window_start(t: datetime, seconds: int) -> None:
    ws = window_start(t, seconds)
    assert ws <= t < ws + timedelta(seconds=seconds)
    assert int(ws.timestamp()) % seconds == 0 and ws.microsecond == 0 and ws.tzinfo is not None


def test_window_start_minute_default() -> None:
    assert window_start(parse_time("2024-01-01T00:00:59.999Z")) == datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        window_start(datetime(2024, 1, 1))


# ----------------------------------------------------------------------------- accumulator

METERS = [
    Meter.model_validate(
        {
            "slug": "sum",
            "eventType": "t",
            "aggregation": "SUM",
            "valueProperty": "$.v",
            "groupBy": {"g": "$.g"},
        }
    ),
    Meter.model_validate({"slug": "cnt", "eventType": "t", "aggregation": "COUNT", "groupBy": {"g": "$.g"}}),
    Meter.model_validate(
        {"slug": "uniq", "eventType": "t", "aggregation": "UNIQUE_COUNT", "valueProperty": "$.u"}
    ),
    Meter.model_validate({"slug": "last", "eventType": "t", "aggregation": "LATEST", "valueProperty": "$.v"}),
]
METER_SET = MeterSet(METERS)
BASE = datetime(2024, 1, 1, tzinfo=UTC)
WIDE = Context(prec=200)  # the default 28-digit context would round the oracle itself

values = st.one_of(
    st.integers(-(10**28), 10**28),
    st.decimals(min_value=-(10**20), max_value=10**20, places=9, allow_nan=False, allow_infinity=False).map(
        str
    ),
)
events = st.lists(
    st.fixed_dictionaries(
        {
            "subject": st.sampled_from(["s1", "s2"]),
            "offset_us": st.integers(0, 180_000_000),  # three minutes
            "data": st.fixed_dictionaries(
                {"v": values, "u": st.sampled_from(["a", "b", 1, 1.0, "1"])},
                optional={"g": st.sampled_from(["x", "y", 7, None])},
            ),
        }
    ),
    max_size=60,
)


@given(events)
@settings(max_examples=200)
def test_accumulator_matches_oracle(evs: list[dict[str, Any]]) -> None:
    acc = WindowAccumulator(60)
    flat: list[tuple[str, str, datetime, int, Any]] = []  # (subject, meter, time, rank, measurement)
    for rank, ev in enumerate(evs):
        t = BASE + timedelta(microseconds=ev["offset_us"])
        ms, rej = METER_SET.measure({"type": "t", "data": ev["data"]})
        assert rej == []
        for m in ms:
            acc.add(ev["subject"], t, m, rank)
            flat.append((ev["subject"], m.meter.slug, t, rank, (m.group_key, m.group, ev["data"])))

    # Oracle: plain dict grouping with window arithmetic done in integer seconds and sums
    # done in integer nano-units, independent of the implementation's Decimal context.
    groups: dict[tuple[str, str, datetime, str], list[tuple[datetime, int, Any]]] = defaultdict(list)
    for subject, slug, t, rank, (gk, _group, data) in flat:
        secs = int((t - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
        ws = datetime.fromtimestamp(secs - secs % 60, tz=UTC)
        groups[(slug, subject, ws, gk)].append((t, rank, data))

    deltas = {(d.meter, d.subject, d.window_start, d.group_key): d for d in acc.deltas()}
    assert set(deltas) == set(groups)
    assert len(acc.deltas()) == len(deltas)
    for key, items in groups.items():
        d = deltas[key]
        slug = key[0]
        assert d.count == len(items)
        latest = max(items, key=lambda i: (i[0], i[1]))
        assert (d.latest_time, d.latest_rank) == (latest[0], latest[1])
        if slug in ("sum", "last"):
            nums = [Decimal(str(i[2]["v"])) for i in items]
            nanos = sum(int(n.scaleb(9, WIDE)) for n in nums)
            assert d.sum == Decimal(nanos).scaleb(-9, WIDE)
            assert d.min == min(nums) and d.max == max(nums)
            assert d.latest_value == Decimal(str(latest[2]["v"]))
            assert d.uniques == set()
        elif slug == "uniq":
            canon = {"a": "a", "b": "b", "1": "1"}
            assert d.uniques == {canon[str(i[2]["u"]).removesuffix(".0")] for i in items}
            assert d.latest_value is None
        else:
            assert d.sum == 0 and d.min is None and d.max is None and d.latest_value is None


def test_accumulator_latest_tie_break_and_exact_sum() -> None:
    acc = WindowAccumulator()
    m = METERS[3]
    t = BASE + timedelta(seconds=5)
    ms1, _ = MeterSet([m]).measure({"type": "t", "data": {"v": "99999999999999999999999999.999999999"}})
    ms2, _ = MeterSet([m]).measure({"type": "t", "data": {"v": "0.000000001"}})
    acc.add("s", t, ms1[0], rank=200)
    acc.add("s", t, ms2[0], rank=100)  # same time, lower rank: not the latest
    (d,) = acc.deltas()
    assert d.latest_value == Decimal("99999999999999999999999999.999999999")
    assert d.sum == Decimal("100000000000000000000000000.000000000")  # 27 integer digits, exact
    assert d.count == 2 and d.window_start == BASE


def test_accumulator_rejects_naive_time() -> None:
    ms, _ = METER_SET.measure({"type": "t", "data": {"v": 1, "u": "a"}})
    with pytest.raises(ValueError):
        WindowAccumulator().add("s", datetime(2024, 1, 1), ms[0], 0)
