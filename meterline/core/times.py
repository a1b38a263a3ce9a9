"""Times as text: the one RFC 3339 parser of meterline and the fixed shapes it writes.

Why one module: ingest, the processor, the query API and the offline jobs must agree on which strings
are times and which instant each names. A second, looser parser (`datetime.fromisoformat` accepts ISO
week dates, comma fractions and basic format, which RFC 3339 does not) would let the query API accept
bounds ingest refuses, or the processor read a foreign event differently from ingest.

* `parse_time` is the strict parser every path ends in; its errors are human reasons.
* `normalize_time_text` and `parse_canonical_time` are fast paths (the C `fromisoformat`) for the shapes
  that dominate the hot loops. Each recognises a strict subset of what `parse_time` accepts and returns
  exactly what the strict path would (tests/unit/test_times.py proves both with hypothesis); anything
  else falls through to `parse_time`.
* `format_time` writes events' canonical shape, `format_instant` the API's window bounds, and
  `format_sql_time` the text ClickHouse reads into a bound `DateTime('UTC')`/`DateTime64(6, 'UTC')`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

__all__ = [
    "MAX_TIME",
    "MIN_TIME",
    "as_utc",
    "format_instant",
    "format_sql_time",
    "format_time",
    "normalize_time_text",
    "parse_canonical_time",
    "parse_time",
]

#: Event times must fit every ClickHouse column they end up in: `meter_windows.window_start` is a
#: `DateTime` (seconds since 1970, up to 2106), so anything outside would be clamped silently.
MIN_TIME: Final = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TIME: Final = datetime(2106, 1, 1, tzinfo=UTC)

_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
_NAIVE_RE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?", re.ASCII)
_ZERO_DELTA: Final = timedelta(0)


def parse_time(value: str) -> datetime:
    """Parse an RFC 3339 timestamp into an aware UTC datetime.

    Offsets are applied, fractional seconds of up to 9 digits are truncated (not rounded) to
    microseconds so a nanosecond timestamp never moves into the next window. Naive times are
    rejected: guessing a zone would put usage into the wrong window.
    Raises ValueError with a human reason.
    """
    if not isinstance(value, str):
        raise ValueError(f"time must be a string, got {type(value).__name__}")  # noqa: TRY004 - callers catch ValueError
    m = _RFC3339_RE.fullmatch(value)
    if m is None:
        if _NAIVE_RE.fullmatch(value):
            raise ValueError(f"time {value!r} has no time zone offset (use 'Z' or ±HH:MM)")
        raise ValueError(f"time {value!r} is not RFC 3339 (e.g. 2024-01-01T00:00:00.001Z)")
    year, month, day, hour, minute, second, frac, z, sign, oh, om = m.groups()
    micro = int((frac + "00000")[:6]) if frac else 0
    if z:
        tz: timezone = UTC
    else:
        oh_i, om_i = int(oh), int(om)
        if oh_i > 23 or om_i > 59:
            raise ValueError(f"time {value!r} has an invalid offset")
        offset = timedelta(hours=oh_i, minutes=om_i)
        tz = UTC if offset == _ZERO_DELTA else timezone(-offset if sign == "-" else offset)
    try:
        t = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=tz)
    except ValueError as exc:
        raise ValueError(f"time {value!r} is invalid: {exc}") from None
    if tz is not UTC:
        try:
            t = t.astimezone(UTC)
        except OverflowError as exc:
            raise ValueError(f"time {value!r} is out of range") from exc
    return t


_CANONICAL_LEN: Final = len("2024-01-01T00:00:00.000000Z")
_NO_FRACTION_LEN: Final = len("2024-01-01T00:00:00Z")


def parse_canonical_time(value: Any) -> datetime:
    """`parse_time`, fast for `format_time`'s own shape (what ingest writes to Kafka).

    Why: the processor parses every event's time; the C `fromisoformat` is ~10x faster than the regex
    parser. It accepts far more than RFC 3339 (week dates, comma fractions), so only strings with every
    separator of `YYYY-MM-DDTHH:MM:SS.ffffffZ` in place go to it; the rest take `parse_time`.
    """
    # value[4:20:3] is the characters at 4, 7, 10, 13, 16 and 19: every separator but the 'Z', in one slice.
    if type(value) is str and len(value) == _CANONICAL_LEN and value[4:20:3] == "--T::." and value[26] == "Z":
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return parse_time(value)


#: RFC 3339 with 'Z' or an offset and at most microseconds: exactly the shape `fromisoformat` parses the
#: way `parse_time` does (it accepts much more, hence the pattern first).
_FAST_SHAPE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)\Z", re.ASCII)


def normalize_time_text(value: str) -> str | None:
    """`format_time(parse_time(value))` when `value` is a common shape inside [MIN_TIME, MAX_TIME),
    else None: the caller takes the strict path, which decides and explains.

    Why: ingest normalises every event's time; this skips the datetime round trip for text already in
    the canonical shape (~1 us an event) and pads short fractions as text.
    """
    if not _FAST_SHAPE.match(value):
        return None
    if value[-1] != "Z" and (value[-2:] > "59" or value[-5:-3] > "23"):
        return None  # fromisoformat reads "+00:60" as an hour; RFC 3339 (and parse_time) refuse it
    try:
        t = datetime.fromisoformat(value)  # also rejects impossible dates and hours
    except (ValueError, OverflowError):
        return None
    if not MIN_TIME <= t < MAX_TIME:
        return None
    n = len(value)
    if value[-1] != "Z":  # an offset: convert, in format_time's shape via the C isoformat
        return t.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    if n == _CANONICAL_LEN:
        return value
    if n == _NO_FRACTION_LEN:
        return value[:-1] + ".000000Z"
    return value[:-1] + "0" * (_CANONICAL_LEN - n) + "Z"  # 1-5 fraction digits: pad to microseconds


def as_utc(t: datetime) -> datetime:
    """Aware UTC; a naive datetime is UTC (what the ClickHouse driver returns for UTC columns)."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def format_time(t: datetime) -> str:
    """Aware datetime -> ``2024-01-01T00:00:00.001000Z`` (UTC, always microseconds).

    One fixed shape so times compare as strings and round-trip through parse_time.
    """
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError("format_time needs an aware datetime")
    u = t.astimezone(UTC)
    return (
        f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:"
        f"{u.second:02d}.{u.microsecond:06d}Z"
    )


def format_instant(t: datetime) -> str:
    """Window bounds are whole seconds, so `2024-01-01T00:00:00Z` (OpenMeter's shape) is exact;
    a fraction, if any, is written in microseconds."""
    u = t.astimezone(UTC)
    text = f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}"
    return f"{text}.{u.microsecond:06d}Z" if u.microsecond else f"{text}Z"


def format_sql_time(t: datetime, *, micro: bool = False) -> str:
    """UTC text for a bound ClickHouse parameter: `YYYY-MM-DD HH:MM:SS` for `DateTime('UTC')`, with
    `.ffffff` for `DateTime64(6, 'UTC')`. A naive `t` is UTC. The text carries no zone, and the
    parameter's type names UTC, so the answer never depends on the server's or driver's zone."""
    u = as_utc(t)
    text = f"{u.year:04d}-{u.month:02d}-{u.day:02d} {u.hour:02d}:{u.minute:02d}:{u.second:02d}"
    return f"{text}.{u.microsecond:06d}" if micro else text
