"""processor.columns: rows become columns, DateTime64 columns exact integer ticks (or untouched)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from processor.columns import to_columns

aware = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)).map(
    lambda t: t.replace(tzinfo=UTC))


def oracle_ticks(t: datetime, precision: int) -> int:
    """floor(seconds since the epoch * 10**precision), from the calendar, in integers."""
    micros = calendar.timegm(t.utctimetuple()) * 1_000_000 + t.microsecond
    return micros * 10**precision // 1_000_000


@given(st.lists(st.tuples(aware, aware, st.text(max_size=3)), min_size=1, max_size=20))
def test_datetime64_columns_become_exact_ticks(rows: list[tuple[datetime, datetime, str]]) -> None:
    shared = rows[0][1]  # one object repeated, like a message's ingested_at
    rows = [(a, shared if i % 2 else b, s) for i, (a, b, s) in enumerate(rows)]
    micro, milli, text = to_columns(rows, {0: 6, 1: 3})
    assert list(micro) == [oracle_ticks(r[0], 6) for r in rows]
    assert list(milli) == [oracle_ticks(r[1], 3) for r in rows]
    assert list(text) == [r[2] for r in rows]


def test_other_offsets_count_from_the_same_instant() -> None:
    t = datetime(2024, 5, 1, 12, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=-5)))
    (col,) = to_columns([(t,)], {0: 3})
    assert col == [oracle_ticks(t.astimezone(UTC), 3)]


def test_a_column_with_anything_but_aware_datetimes_is_left_to_the_driver() -> None:
    naive = datetime(2024, 5, 1)
    rows = [(datetime(2024, 5, 1, tzinfo=UTC),), (naive,)]
    (col,) = to_columns(rows, {0: 6})
    assert list(col) == [rows[0][0], naive]
