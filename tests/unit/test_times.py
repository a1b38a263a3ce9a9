"""meterline.core.times: the strict RFC 3339 parser, the fast paths proven equal to it, the written shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meterline.core.times import (
    MAX_TIME,
    MIN_TIME,
    format_instant,
    format_sql_time,
    format_time,
    normalize_time_text,
    parse_canonical_time,
    parse_time,
)


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


# ------------------------------------------------------------------- fast paths == the strict parser
def _outcome(parse: object, text: str) -> object:
    try:
        return parse(text)  # type: ignore[operator]
    except ValueError:
        return ValueError


wide = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))
_ALPHABET = "0123456789-:.TtZz ,W+\u0663\uff12x"


@st.composite
def time_texts(draw: st.DrawFn) -> str:
    """RFC 3339-looking text in every shape the fast paths special-case, often mutated by one character."""
    t = draw(wide)
    digits = draw(st.integers(0, 9))
    fraction = ("." + f"{t.microsecond:06d}{draw(st.integers(0, 999)):03d}"[:digits]) if digits else ""
    minutes = draw(st.sampled_from([0, 0, 60, -300, 330, 345, -59, 23 * 60 + 59, 24 * 60]))
    zone = draw(st.sampled_from(["Z", "z", "offset"]))
    if zone == "offset":
        local = t.replace(tzinfo=None) + timedelta(minutes=minutes) if -60 * 24 < minutes < 60 * 24 else t
        sign = "-" if minutes < 0 else "+"
        suffix = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    else:
        local, suffix = t.replace(tzinfo=None), zone
    sep = draw(st.sampled_from(["T", "T", "t", " "]))
    text = f"{local.year:04d}-{local.month:02d}-{local.day:02d}{sep}{local:%H:%M:%S}{fraction}{suffix}"
    if draw(st.booleans()):
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from(_ALPHABET)) + text[i + 1 :]
    return text


@settings(max_examples=1500, deadline=None)
@given(st.one_of(time_texts(), st.text(_ALPHABET, min_size=20, max_size=30)))
@example("2024-W01-1T00:00:00.000000Z")  # an ISO week date: fromisoformat reads it, RFC 3339 does not
@example("2024-01-01T00:00:00,000000Z")  # a comma fraction: the same
def test_parse_canonical_time_is_parse_time(text: str) -> None:
    assert _outcome(parse_canonical_time, text) == _outcome(parse_time, text)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(time_texts(), st.text(_ALPHABET, min_size=18, max_size=35)))
@example("2000-01-01T00:00:00.0+00:60")  # found by this test: fromisoformat read the offset as +01:00
def test_normalize_time_text_is_format_of_parse(text: str) -> None:
    fast = normalize_time_text(text)
    if fast is None:
        return  # the caller takes the strict path
    t = parse_time(text)
    assert MIN_TIME <= t < MAX_TIME
    assert fast == format_time(t)


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2105, 12, 31), timezones=st.just(UTC)),
       st.integers(0, 6), st.sampled_from(["Z", "+05:30", "-08:00", "+00:00"]))
def test_normalize_time_text_takes_the_common_shapes(t: datetime, digits: int, suffix: str) -> None:
    """Not vacuous: what ingest usually receives is normalised on the fast path."""
    zone = timezone(timedelta(hours=5, minutes=30)) if suffix == "+05:30" else (
        timezone(timedelta(hours=-8)) if suffix == "-08:00" else UTC)
    local = t.astimezone(zone)
    fraction = ("." + f"{local.microsecond:06d}"[:digits]) if digits else ""
    text = f"{local:%Y-%m-%dT%H:%M:%S}{fraction}{suffix}"
    truncated = t.replace(microsecond=int(f"{t.microsecond:06d}"[:digits].ljust(6, "0")) if digits else 0)
    if MIN_TIME <= truncated < MAX_TIME:
        assert normalize_time_text(text) == format_time(truncated)


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC)))
def test_parse_canonical_time_of_format_time(t: datetime) -> None:
    assert parse_canonical_time(format_time(t)) == t


# ------------------------------------------------------------------------------------ written shapes
@given(aware, st.integers(-14 * 4, 14 * 4))
def test_format_instant_and_sql_time_against_strftime(t: datetime, quarter_hours: int) -> None:
    shifted = t.astimezone(timezone(timedelta(minutes=15 * quarter_hours)))
    want = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if t.microsecond else t.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert format_instant(shifted) == want
    assert format_sql_time(shifted) == t.strftime("%Y-%m-%d %H:%M:%S")
    assert format_sql_time(shifted, micro=True) == t.strftime("%Y-%m-%d %H:%M:%S.%f")
    assert format_sql_time(t.replace(tzinfo=None)) == t.strftime("%Y-%m-%d %H:%M:%S")  # naive = UTC
