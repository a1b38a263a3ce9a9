"""A query's time range: parameter validation, whole minutes vs raw edges, and local-time bucket ends.

We store one row per UTC *minute*. A query's `from`/`to` may be any instant: they are cut to the second
(as OpenMeter does), the whole minutes between them are read from the minute windows and the partial
minutes at either edge from the stored raw events (`split_range`), so any second is answered exactly.
Buckets in a time zone are computed by ClickHouse (bucket *starts*); this module computes each bucket's
*end* (the next local bucket start, which is not "start + fixed duration" across DST changes or in
:30/:45 zones).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from importlib import resources
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from meterline.core.errors import InvalidQueryError
from meterline.core.meters import WindowSize
from meterline.core.times import MAX_TIME, MIN_TIME, format_instant, parse_time

MINUTE = timedelta(minutes=1)
_QUARTER = timedelta(minutes=15)
WINDOW_SIZES = tuple(size.value for size in WindowSize)  # the one definition: meterline.core.meters


def size_name(size: str | Enum | None) -> str | None:
    """`WindowSize.HOUR` or `"HOUR"` -> `"HOUR"`."""
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


@functools.cache
def iana_zones() -> frozenset[str]:
    """The zone names of the pinned `tzdata` package: the IANA database's names, and nothing else.

    Why not whatever `ZoneInfo` can open: it also opens files of the system zoneinfo directory such as
    `localtime`, `posixrules` or `right/UTC`, which ClickHouse refuses (or reads differently); such a
    name must be a 400 on `windowTimeZone`, not a storage error (503) from ClickHouse.
    """
    text = resources.files("tzdata").joinpath("zones").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def parse_zone(name: str | None) -> ZoneInfo:
    """An IANA zone name -> ZoneInfo (default UTC); unknown names are a 400 on `windowTimeZone`."""
    if name is None or name == "":
        return ZoneInfo("UTC")
    if name not in iana_zones():
        raise InvalidQueryError("windowTimeZone", f"unknown IANA time zone: {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidQueryError("windowTimeZone", f"unknown IANA time zone: {name!r}") from None


def floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def floor_second(t: datetime) -> datetime:
    return t.replace(microsecond=0)


def ceil_minute(t: datetime) -> datetime:
    floor = floor_minute(t)
    return floor if floor == t else floor + MINUTE


@dataclass(frozen=True, slots=True)
class RangeSplit:
    """[start, end) cut to the second, split into the whole minutes answered from the minute windows
    (`whole_start`..`whole_end`, None = unbounded, `whole_empty` when there are none) and the partial
    minutes at the edges (`edges`) answered from the stored raw events."""

    start: datetime | None
    end: datetime | None
    whole_start: datetime | None
    whole_end: datetime | None
    whole_empty: bool
    edges: tuple[tuple[datetime, datetime], ...]


def split_range(start: datetime | None, end: datetime | None) -> RangeSplit:
    """Cut `from`/`to` to the second (OpenMeter's `time >= from.Unix() AND time < to.Unix()`) and split.

    Without `to` the range is open: the current minute, and events timed in the future, are included,
    as in OpenMeter.
    """
    start = None if start is None else floor_second(start.astimezone(UTC))
    end = None if end is None else floor_second(end.astimezone(UTC))
    edges: list[tuple[datetime, datetime]] = []
    whole_start = None if start is None else ceil_minute(start)
    whole_end = None if end is None else floor_minute(end)
    if whole_start is not None and whole_end is not None and whole_start > whole_end:
        # from and to inside one minute: only raw events.
        assert start is not None and end is not None
        return RangeSplit(start, end, whole_start, whole_start, True, ((start, end),))
    if start is not None and whole_start is not None and start < whole_start:
        edges.append((start, whole_start))
    if end is not None and whole_end is not None and whole_end < end:
        edges.append((whole_end, end))
    empty = whole_start is not None and whole_end is not None and whole_start >= whole_end
    return RangeSplit(start, end, whole_start, whole_end, empty, tuple(edges))


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


__all__ = ["format_instant"]  # re-exported: routes format window bounds with it
