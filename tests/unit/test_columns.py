"""processor.columns: rows become columns, DateTime64 columns exact integer ticks (or untouched), and the
faster column writers encode exactly what clickhouse-connect's own would."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from clickhouse_connect.datatypes.registry import get_from_name
from clickhouse_connect.driver.insert import InsertContext
from hypothesis import given
from hypothesis import strategies as st

from processor.columns import fast_types, to_columns

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


# ---------------------------------------------------------------------------- fast_types
# The oracle is clickhouse-connect itself: a column written with the faster types must be byte for byte what
# the driver's own types write, and a column the driver refuses must be refused the same way.

def encoded(type_name: str, column: list[Any], fast: bool) -> bytes | str:
    """The Native bytes of one column (prefix and data), or the name of the error writing it raised."""
    ch_type = get_from_name(type_name)
    if fast:
        (ch_type,) = fast_types([ch_type])
        assert type(ch_type) is not type(get_from_name(type_name)), "the fast type was not used"
    ctx = InsertContext("t", ["c"], [ch_type])
    dest = bytearray()
    try:
        ch_type.write_column(column, dest, ctx)
    except Exception as exc:  # noqa: BLE001 - the refusal itself is compared
        return type(exc).__name__
    return bytes(dest)


texts = st.text(alphabet=st.sampled_from("ab:*é\0"), max_size=4)
string_rows = st.lists(st.one_of(st.just([]), st.lists(texts, max_size=3)), min_size=1, max_size=30)
tuple_rows = st.lists(st.one_of(st.just([]), st.lists(st.tuples(texts, texts), max_size=2)), min_size=1, max_size=30)


@given(string_rows, st.booleans())
def test_array_columns_encode_as_the_driver_does(rows: list[list[str]], empty: bool) -> None:
    rows = [[] for _ in rows] if empty else rows  # all empty: the fast path
    assert encoded("Array(String)", rows, True) == encoded("Array(String)", rows, False)
    nested = [[r] if i % 2 else [] for i, r in enumerate(rows)]
    assert encoded("Array(Array(String))", nested, True) == encoded("Array(Array(String))", nested, False)


@given(tuple_rows, st.booleans())
def test_arrays_of_tuples_encode_as_the_driver_does(rows: list[list[tuple[str, str]]], empty: bool) -> None:
    rows = [[] for _ in rows] if empty else rows
    name = "Array(Tuple(meter String, code String))"  # events.rejections
    assert encoded(name, rows, True) == encoded(name, rows, False)


def test_array_columns_the_driver_refuses_are_refused_alike() -> None:
    for rows in ([[], None], [None], [[], 5]):
        assert encoded("Array(String)", rows, True) == encoded("Array(String)", rows, False)
        assert isinstance(encoded("Array(String)", rows, False), str)


@given(st.lists(st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=17)), min_size=1, max_size=30),
       st.booleans())
def test_fixed_string_columns_encode_as_the_driver_does(values: list[bytes], exact: bool) -> None:
    if exact:  # all of the column's size: the fast path
        values = [v.ljust(16, b"\1")[:16] for v in values]
    for name in ("FixedString(16)", "Nullable(FixedString(16))", "LowCardinality(FixedString(16))"):
        assert encoded(name, values, True) == encoded(name, values, False)


def test_fixed_string_columns_of_other_values_go_to_the_driver() -> None:
    for column in ([b"a" * 16, bytearray(b"b" * 16)], [bytearray(b"b" * 16), b"a" * 16], ["x" * 16, "y"],
                   [b"a" * 16, list(range(16))], [b"a" * 16, None], [b"a" * 16, b""], [b"a" * 16, b"a" * 17]):
        assert encoded("FixedString(16)", column, True) == encoded("FixedString(16)", column, False)
