"""Pure time logic of meter queries: parameter validation and local-time window arithmetic.

We store one row per UTC *minute*, so a query can only be answered exactly when its bounds are whole
minutes; a sub-minute `from`/`to` is rejected (400 naming the field) instead of silently widened.
Buckets in a time zone are computed by ClickHouse (bucket *starts*); this module computes each bucket's
*end* (the next local bucket start, which is not "start + fixed duration" across DST changes or in
:30/:45 zones) and clips edge buckets to the requested [from, to).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meterline.core.errors import InvalidQueryError
from meterline.core.times import MAX_TIME, MIN_TIME, parse_time

MINUTE = timedelta(minutes=1)
_QUARTER = timedelta(minutes=15)
WINDOW_SIZES = ("MINUTE", "HOUR", "DAY", "MONTH")


def size_name(size: str | Enum | None) -> str | None:
    """`WindowSize.HOUR` or `"HOUR"` -> `"HOUR"`; lets this module stay independent of the enum's home."""
    if size is None:
        return None
    value = size.value if isinstance(size, Enum) else size
    return str(value)


def parse_instant(value: str, field: str) -> datetime:
    """RFC 3339 text -> aware UTC datetime; a missing offset is ambiguous, so it is a 400, not a guess."""
    try:
        parsed = parse_time(value.strip())  # the one RFC 3339 parser: ingest and queries agree
    except ValueError as exc:
        raise InvalidQueryError(field, str(exc)) from None
    if not MIN_TIME <= parsed <= MAX_TIME:
        # The span ingest accepts and ClickHouse's DateTime stores; outside it ClickHouse would fail.
        raise InvalidQueryError(field, f"must be between {MIN_TIME:%Y-%m-%d} and {MAX_TIME:%Y-%m-%d}: {value!r}")
    return parsed


def parse_zone(name: str | None) -> ZoneInfo:
    """An IANA zone name -> ZoneInfo (default UTC); unknown names are a 400 on `windowTimeZone`."""
    if name is None or name == "":
        return ZoneInfo("UTC")
    try:
        if "\x00" in name or name.startswith("/") or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidQueryError("windowTimeZone", f"unknown IANA time zone: {name!r}") from None


def floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class TimeRange:
    """The validated [start, end) of a query; `start` None = from the beginning of the data."""

    start: datetime | None
    end: datetime


def resolve_range(start: datetime | None, end: datetime | None, now: datetime | None = None) -> TimeRange:
    """Validate `from`/`to`: minute-aligned, from < to; `to` defaults to now floored to the minute.

    Flooring (not ceiling) `now` keeps the default answer stable: only whole minutes are reported, the
    in-progress minute appears once it is over. `from` defaults to no lower bound, as in OpenMeter.
    """
    for field, t in (("from", start), ("to", end)):
        if t is not None and (t.second or t.microsecond):
            raise InvalidQueryError(field, "must be aligned to a whole minute (windows are stored per minute)")
    if end is None:
        end = floor_minute((now or datetime.now(UTC)).astimezone(UTC))
    if start is not None and start >= end:
        raise InvalidQueryError("from", "must be before 'to'")
    return TimeRange(start=start, end=end)


def bucket_end(start: datetime, size: str | Enum, tz: ZoneInfo) -> datetime:
    """The first local bucket start after `start` (itself a bucket start), as aware UTC.

    HOUR scans forward in 15-minute steps for the next instant at local :00 — every zone offset is a
    multiple of 15 minutes, so this is exact across DST changes and in Asia/Kolkata (+5:30) or
    Asia/Kathmandu (+5:45), where local hours start at UTC :30 / :15.
    """
    name = size_name(size)
    start = start.astimezone(UTC)
    if name == "MINUTE":
        return start + MINUTE
    if name == "HOUR":
        t = start + _QUARTER
        for _ in range(4 * 24):
            local = t.astimezone(tz)
            if local.minute == 0 and local.second == 0:
                return t
            t += _QUARTER
        raise AssertionError(f"no local hour start within a day after {start} in {tz}")
    local = start.astimezone(tz)
    if name == "DAY":
        nxt = (local.replace(tzinfo=None) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    elif name == "MONTH":
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        nxt = datetime(year, month, 1)
    else:
        raise InvalidQueryError("windowSize", f"must be one of {', '.join(WINDOW_SIZES)}")
    return nxt.replace(tzinfo=tz).astimezone(UTC)


def clip(start: datetime, end: datetime, bounds: TimeRange) -> tuple[datetime, datetime]:
    """Edge buckets report only the part of the bucket that was queried, as OpenMeter's from/to imply."""
    if bounds.start is not None and start < bounds.start:
        start = bounds.start
    return start, min(end, bounds.end)

