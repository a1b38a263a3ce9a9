"""Local-time bucket ends and query-range validation, against a minute-by-minute zoneinfo oracle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.errors import InvalidQueryError
from query.time_ranges import (
    bucket_end,
    format_instant,
    parse_instant,
    parse_zone,
    split_range,
)


def _next_start_oracle(start: datetime, size: str, tz: ZoneInfo) -> datetime:
    """Walk minute by minute until the local fields say a new bucket has begun."""
    key = {
        "MINUTE": lambda lt: (lt.year, lt.month, lt.day, lt.hour, lt.minute),
        "HOUR": lambda lt: (lt.year, lt.month, lt.day, lt.hour, lt.fold if lt.hour == (start.astimezone(tz).hour) else 0),
        "DAY": lambda lt: (lt.year, lt.month, lt.day),
        "MONTH": lambda lt: (lt.year, lt.month),
    }[size]
    t = start + timedelta(minutes=1)
    if size == "HOUR":  # a new hour starts wherever the local clock shows :00
        while t.astimezone(tz).minute != 0:
            t += timedelta(minutes=1)
        return t
    first = key(start.astimezone(tz))
    while key(t.astimezone(tz)) == first:
        t += timedelta(minutes=1)
    return t


CASES = [
    ("America/New_York", datetime(2024, 3, 10, 5, 0, tzinfo=UTC), "DAY", 23),  # spring forward
    ("America/New_York", datetime(2024, 11, 3, 4, 0, tzinfo=UTC), "DAY", 25),  # fall back
    ("Europe/Berlin", datetime(2024, 3, 30, 23, 0, tzinfo=UTC), "DAY", 23),
    ("Europe/Berlin", datetime(2024, 10, 26, 22, 0, tzinfo=UTC), "DAY", 25),
    ("America/New_York", datetime(2024, 11, 3, 5, 0, tzinfo=UTC), "HOUR", 1),  # 01:00 EDT
    ("America/New_York", datetime(2024, 11, 3, 6, 0, tzinfo=UTC), "HOUR", 1),  # 01:00 EST (repeat)
    ("America/New_York", datetime(2024, 3, 10, 6, 0, tzinfo=UTC), "HOUR", 1),  # 01:00 EST -> 03:00 EDT
    ("Asia/Kolkata", datetime(2024, 1, 1, 9, 30, tzinfo=UTC), "HOUR", 1),
    ("Asia/Kathmandu", datetime(2024, 1, 1, 10, 15, tzinfo=UTC), "HOUR", 1),
    ("Asia/Kathmandu", datetime(2023, 12, 31, 18, 15, tzinfo=UTC), "DAY", 24),
    ("Asia/Kolkata", datetime(2024, 1, 31, 18, 30, tzinfo=UTC), "MONTH", 29 * 24),  # Feb 2024 (leap)
    ("America/New_York", datetime(2024, 3, 1, 5, 0, tzinfo=UTC), "MONTH", 31 * 24 - 1),
    ("Europe/Berlin", datetime(2024, 9, 30, 22, 0, tzinfo=UTC), "MONTH", 31 * 24 + 1),
    ("UTC", datetime(2024, 12, 1, tzinfo=UTC), "MONTH", 31 * 24),
    ("UTC", datetime(2024, 12, 31, 23, 59, tzinfo=UTC), "MINUTE", 0),
]


@pytest.mark.parametrize(("zone", "start", "size", "hours"), CASES)
def test_bucket_end_matches_oracle(zone: str, start: datetime, size: str, hours: int) -> None:
    tz = ZoneInfo(zone)
    end = bucket_end(start, size, tz)
    assert end == _next_start_oracle(start, size, tz)
    if size == "MINUTE":
        assert end - start == timedelta(minutes=1)
    else:
        assert end - start == timedelta(hours=hours)


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu", "UTC"])
def test_hour_buckets_tile_dst_days(zone: str) -> None:
    """Consecutive hour buckets over whole DST-transition days never overlap or leave gaps."""
    tz = ZoneInfo(zone)
    for day in (datetime(2024, 3, 10), datetime(2024, 3, 31), datetime(2024, 10, 27), datetime(2024, 11, 3)):
        t = day.replace(tzinfo=tz).astimezone(UTC)
        stop = t + timedelta(days=1)
        while t < stop:
            nxt = bucket_end(t, "HOUR", tz)
            assert nxt == _next_start_oracle(t, "HOUR", tz)
            assert nxt.astimezone(tz).minute == 0 and timedelta(0) < nxt - t <= timedelta(hours=1)
            t = nxt


T0 = datetime(2024, 1, 1, tzinfo=UTC)
_instants = st.integers(0, 4 * 3600 * 10**6).map(lambda us: T0 + timedelta(microseconds=us))


@given(_instants, _instants, st.booleans(), st.booleans())
def test_split_range_covers_every_second_once(a: datetime, b: datetime, open_start: bool, open_end: bool) -> None:
    """Whole minutes + edge spans tile [floor_s(from), floor_s(to)) exactly, checked second by second
    against the definition (OpenMeter compares event times with from.Unix() and to.Unix())."""
    start, end = min(a, b), max(a, b)
    if start.replace(microsecond=0) == end.replace(microsecond=0):
        end = end + timedelta(seconds=1)
    split = split_range(None if open_start else start, None if open_end else end)
    lo = T0 - timedelta(minutes=2) if open_start else start.replace(microsecond=0)
    hi = T0 + timedelta(hours=4, minutes=2) if open_end else end.replace(microsecond=0)
    assert split.start == (None if open_start else start.replace(microsecond=0))
    for edge_start, edge_end in split.edges:
        assert edge_end - edge_start < timedelta(minutes=1)
        assert (edge_start.minute, edge_start.hour) == ((edge_end - timedelta(seconds=1)).minute,
                                                        (edge_end - timedelta(seconds=1)).hour)
    t = lo
    while t < hi:
        in_whole = not split.whole_empty and (split.whole_start is None or t >= split.whole_start) and (
            split.whole_end is None or t < split.whole_end)
        in_edges = sum(1 for x, y in split.edges if x <= t < y)
        assert in_whole + in_edges == 1, t
        t += timedelta(seconds=1)
    if split.whole_start is not None:
        assert split.whole_start.second == 0


def test_split_range_examples() -> None:
    s = split_range(datetime(2024, 1, 1, 10, 0, 15, 700000, tzinfo=UTC), datetime(2024, 1, 1, 10, 5, 30, tzinfo=UTC))
    assert s.whole_start == datetime(2024, 1, 1, 10, 1, tzinfo=UTC) and s.whole_end == datetime(2024, 1, 1, 10, 5, tzinfo=UTC)
    assert s.edges == ((datetime(2024, 1, 1, 10, 0, 15, tzinfo=UTC), datetime(2024, 1, 1, 10, 1, tzinfo=UTC)),
                       (datetime(2024, 1, 1, 10, 5, tzinfo=UTC), datetime(2024, 1, 1, 10, 5, 30, tzinfo=UTC)))
    whole = split_range(T0, T0 + timedelta(hours=1))
    assert whole.edges == () and not whole.whole_empty
    inside = split_range(T0 + timedelta(seconds=5), T0 + timedelta(seconds=50))
    assert inside.whole_empty and inside.edges == ((T0 + timedelta(seconds=5), T0 + timedelta(seconds=50)),)
    open_ = split_range(None, None)
    assert open_.whole_start is None and open_.whole_end is None and open_.edges == ()


def test_parse_instant_and_zone() -> None:
    assert parse_instant("2024-01-01T05:30:00+05:30", "from") == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_instant("2024-01-01T00:00:00Z", "to") == datetime(2024, 1, 1, tzinfo=UTC)
    for bad in ("2024-01-01T00:00:00", "tomorrow", ""):
        with pytest.raises(InvalidQueryError) as exc:
            parse_instant(bad, "to")
        assert exc.value.field == "to"
    assert parse_zone(None).key == "UTC" and parse_zone("Asia/Kathmandu").key == "Asia/Kathmandu"
    # Names the system zoneinfo directory has but ClickHouse refuses: a 400, never a 503 (issue 11).
    for bad in ("Mars/Olympus", "../etc/passwd", "/etc/localtime", "UTC\x00", "right/UTC", "localtime",
                "posixrules", "posix/Europe/Budapest"):
        with pytest.raises(InvalidQueryError) as exc:
            parse_zone(bad)
        assert exc.value.field == "windowTimeZone"


def test_format_instant() -> None:
    assert format_instant(datetime(2024, 1, 1, 10, 7, tzinfo=UTC)) == "2024-01-01T10:07:00Z"
    assert format_instant(datetime(2024, 1, 1, 10, 7, 1, 5, tzinfo=UTC)) == "2024-01-01T10:07:01.000005Z"


@pytest.mark.parametrize(
    "text", ["0999-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "1969-12-31T23:59:00Z", "2106-01-01T00:01:00Z"]
)
def test_instants_outside_the_storable_span_are_a_400(text: str) -> None:
    """Found by schemathesis: such bounds reached ClickHouse and came back as a 503."""
    with pytest.raises(InvalidQueryError) as info:
        parse_instant(text, "from")
    assert info.value.field == "from"
