"""Local-time bucket ends and query-range validation, against a minute-by-minute zoneinfo oracle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from meterline.core.errors import InvalidQueryError
from meterline.core.times import format_instant
from query.windowing import (
    TimeRange,
    bucket_end,
    clip,
    parse_instant,
    parse_zone,
    resolve_range,
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


def test_resolve_range_validation() -> None:
    now = datetime(2024, 5, 1, 12, 34, 56, 789, tzinfo=UTC)
    assert resolve_range(None, None, now) == TimeRange(None, datetime(2024, 5, 1, 12, 34, tzinfo=UTC))
    with pytest.raises(InvalidQueryError) as exc:
        resolve_range(datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC), None, now)
    assert exc.value.field == "from"
    with pytest.raises(InvalidQueryError) as exc:
        resolve_range(None, datetime(2024, 1, 1, 0, 0, 0, 5, tzinfo=UTC), now)
    assert exc.value.field == "to"
    t = datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidQueryError) as exc:
        resolve_range(t, t, now)
    assert exc.value.field == "from"


def test_parse_instant_and_zone() -> None:
    assert parse_instant("2024-01-01T05:30:00+05:30", "from") == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_instant("2024-01-01T00:00:00Z", "to") == datetime(2024, 1, 1, tzinfo=UTC)
    for bad in ("2024-01-01T00:00:00", "tomorrow", ""):
        with pytest.raises(InvalidQueryError) as exc:
            parse_instant(bad, "to")
        assert exc.value.field == "to"
    assert parse_zone(None).key == "UTC" and parse_zone("Asia/Kathmandu").key == "Asia/Kathmandu"
    for bad in ("Mars/Olympus", "../etc/passwd", "/etc/localtime", "UTC\x00"):
        with pytest.raises(InvalidQueryError) as exc:
            parse_zone(bad)
        assert exc.value.field == "windowTimeZone"


def test_clip_and_format() -> None:
    bounds = TimeRange(datetime(2024, 1, 1, 10, 7, tzinfo=UTC), datetime(2024, 1, 1, 12, 0, tzinfo=UTC))
    start, end = clip(datetime(2024, 1, 1, 10, tzinfo=UTC), datetime(2024, 1, 1, 11, tzinfo=UTC), bounds)
    assert (format_instant(start), format_instant(end)) == ("2024-01-01T10:07:00Z", "2024-01-01T11:00:00Z")
    start, end = clip(datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC), TimeRange(None, bounds.end))
    assert (start, end) == (datetime(2024, 1, 1, tzinfo=UTC), bounds.end)


@pytest.mark.parametrize(
    "text", ["0999-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "1969-12-31T23:59:00Z", "2106-01-01T00:01:00Z"]
)
def test_instants_outside_the_storable_span_are_a_400(text: str) -> None:
    """Found by schemathesis: such bounds reached ClickHouse and came back as a 503."""
    with pytest.raises(InvalidQueryError) as info:
        parse_instant(text, "from")
    assert info.value.field == "from"
