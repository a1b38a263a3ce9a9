"""A query's time range: parameter validation, whole minutes vs raw edges, and local-time bucket ends.

We store one row per UTC *minute*. A query's `from`/`to` may be any instant: they are cut to the second
(as OpenMeter does), the whole minutes between them are read from the minute windows and the partial
minutes at either edge from the stored raw events (`split_range`), so any second is answered exactly.
Buckets in a time zone are computed by ClickHouse (bucket *starts*); this module computes each bucket's
*end* (the next local bucket start, which is not "start + fixed duration" across DST changes or in
:30/:45 zones).

Closed months that windows compaction also stored as 15-minute rows (docs/design.md, "Coarse rows") can
answer their whole quarters from those rows (`coarse_plan`): a quarter hour lies inside one local hour,
day and month whenever the zone's offset is a multiple of 15 minutes throughout it (`quarters_fit`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
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


def floor_quarter(t: datetime) -> datetime:
    return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)


def ceil_quarter(t: datetime) -> datetime:
    floor = floor_quarter(t)
    return floor if floor == t else floor + _QUARTER


def month_bounds(partition: str) -> tuple[datetime, datetime]:
    """[start, end) in UTC of a `meter_windows` partition (`YYYYMM`, a UTC month)."""
    year, month = int(partition[:4]), int(partition[4:6])
    return datetime(year, month, 1, tzinfo=UTC), datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


@functools.cache
def quarters_fit(zone: str, partition: str) -> bool:
    """Whether every UTC quarter hour of the month lies inside one local hour (hence day and month) of `zone`:
    the offset is a multiple of 15 minutes and does not change inside any quarter.

    True for every zone's current rules (Asia/Kathmandu +05:45, Australia/Eucla +08:45, America/St_Johns
    -03:30, DST changes on the quarter), false for months with an offset such as Africa/Monrovia's -00:44:30
    (until 1972) or local mean time. Checked at the first and last minute of each quarter (offsets change
    at most twice a year, never twice within 15 minutes), once per zone and month.
    """
    tz = ZoneInfo(zone)
    start, end = month_bounds(partition)
    t = start
    last = timedelta(minutes=14)
    while t < end:
        offset = t.astimezone(tz).utcoffset()
        if offset is None or offset % _QUARTER or (t + last).astimezone(tz).utcoffset() != offset:
            return False
        t += _QUARTER
    return True


@dataclass(frozen=True, slots=True)
class CoarsePlan:
    """A range's whole minutes as spans read from 15-minute rows where their month's rows still match
    (`coarse`: partition, its fingerprint, [start, end)), and spans read from minute rows (`minutes`,
    None = unbounded)."""

    coarse: tuple[tuple[str, int, datetime, datetime], ...]
    minutes: tuple[tuple[datetime | None, datetime | None], ...]


def coarse_plan(split: RangeSplit, size: str | Enum | None, zone: str, fingerprints: Mapping[str, int]) -> CoarsePlan | None:
    """Which whole minutes of `split` may come from coarse rows (None: none; read minute rows as always).

    `fingerprints`: the partitions with coarse rows and the fingerprint they were built for. Only HOUR, DAY
    and MONTH buckets (a MINUTE bucket needs minutes), or one bucket over an explicit [from, to) (without
    them the answer reports the first and last minute with data). Only whole quarters inside a month, in
    months whose quarters fit the zone; the rest stays minute rows.
    """
    name = size_name(size)
    if split.whole_empty or not fingerprints:
        return None
    if name == "MINUTE" or (name is None and (split.start is None or split.end is None)):
        return None
    coarse: list[tuple[str, int, datetime, datetime]] = []
    for partition in sorted(fingerprints):
        month_start, month_end = month_bounds(partition)
        a = month_start if split.whole_start is None else max(month_start, split.whole_start)
        b = month_end if split.whole_end is None else min(month_end, split.whole_end)
        a, b = ceil_quarter(a), floor_quarter(b)
        if a < b and (name is None or quarters_fit(zone, partition)):
            coarse.append((partition, fingerprints[partition], a, b))
    if not coarse:
        return None
    minutes: list[tuple[datetime | None, datetime | None]] = []
    cursor: datetime | None = split.whole_start
    for _, _, a, b in coarse:
        if cursor is None or cursor < a:
            minutes.append((cursor, a))
        cursor = b
    last = coarse[-1][3]
    if split.whole_end is None or last < split.whole_end:
        minutes.append((last, split.whole_end))
    return CoarsePlan(tuple(coarse), tuple(minutes))


__all__ = ["format_instant"]  # re-exported: routes format window bounds with it
