"""A batch's rows as the columns clickhouse-connect writes fastest.

Profiling the worker (docs/performance.md) showed a third of the insert thread's time in
clickhouse-connect turning rows into columns and every DateTime64 into ticks through
`datetime.timestamp()`, plus one `DESCRIBE` round trip per insert to learn the column types. Here
rows are transposed by `zip` (C), DateTime64 columns become exact integer ticks (clickhouse-connect
writes int columns as they are), and the sink passes the column types it learnt once per table.
The values stored are the same: ticks are floor((t - epoch) * 10**precision), as clickhouse-connect
computes them.

Two column types are encoded faster than clickhouse-connect does it row by row (`fast_types`, ~0.35 µs
an event of the worker's insert thread): Array columns whose rows are all empty (an event's errors and
rejections, nearly always) and FixedString columns of bytes of the right size (dedupe keys). Whatever
else they hold goes to clickhouse-connect's own code; the bytes are the same either way
(tests/unit/test_columns.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.datatypes.base import ClickHouseType
from clickhouse_connect.datatypes.container import Array
from clickhouse_connect.datatypes.string import FixedString
from clickhouse_connect.driver.insert import InsertContext

__all__ = ["fast_types", "ticked", "to_columns"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _ticks(column: Sequence[Any], precision: int) -> list[int] | None:
    """Integer ticks of aware datetimes (10**-precision s), or None when a value is anything else:
    then clickhouse-connect converts the column itself, exactly as before."""
    scale = 10 ** (6 - precision) if precision <= 6 else 0
    if not scale:
        return None
    out: list[int] = []
    last: Any = None
    last_ticks = 0
    try:
        for t in column:
            if t is not last:  # rows of one message share their `ingested_at` object
                if type(t) is not datetime or t.tzinfo is None:
                    return None
                last, last_ticks = t, ((t - _EPOCH) // _MICROSECOND) // scale
            out.append(last_ticks)
    except (TypeError, OverflowError):
        return None
    return out


def to_columns(rows: Sequence[Sequence[Any]], datetime64: dict[int, int]) -> list[Sequence[Any]]:
    """Columns of `rows`; columns whose index is in `datetime64` (index -> precision) as ticks."""
    return ticked(list(zip(*rows, strict=True)), datetime64)


def ticked(columns: Sequence[Sequence[Any]], datetime64: dict[int, int]) -> list[Sequence[Any]]:
    """`columns` (a new list) with those whose index is in `datetime64` as ticks."""
    columns = list(columns)
    for i, precision in datetime64.items():
        ticks = _ticks(columns[i], precision)
        if ticks is not None:
            columns[i] = ticks
    return columns


class _Arrays(Array, registered=False):  # registered=False: clickhouse-connect keeps its own Array for names
    """Array whose column of all-empty rows is written at once: every row's end offset is 0."""

    __slots__ = ()

    def write_column_data(self, column: Sequence[Any], dest: bytearray, ctx: InsertContext) -> None:
        if not column or any(map(len, column)):  # len() raises on a non-sequence, as the driver's loop would
            super().write_column_data(column, dest, ctx)
            return
        dest += bytes(8 * len(column))  # UInt64 offsets (zero reads the same in either byte order)
        super().write_column_data([], dest, ctx)  # the elements: none, written as the driver writes none


class _FixedStrings(FixedString, registered=False):
    """FixedString whose column of bytes values of exactly its size is written as one join."""

    __slots__ = ()

    def _write_column_binary(self, column: Sequence[Any], dest: bytearray, ctx: InsertContext) -> None:
        if not self.nullable and column and type(column[0]) is bytes and self.write_format(ctx) != "string" \
                and set(map(len, column)) == {self.byte_size}:
            try:
                joined = b"".join(column)
            except TypeError:  # a value the driver writes its own way (e.g. a list of ints)
                pass
            else:
                dest += joined
                return
        super()._write_column_binary(column, dest, ctx)


def fast_types(types: Sequence[ClickHouseType]) -> list[ClickHouseType]:
    """`types` with Array and FixedString column types replaced by the faster writers above."""
    out: list[ClickHouseType] = []
    for t in types:
        if type(t) is Array:
            out.append(_Arrays(t.type_def))
        elif type(t) is FixedString:
            out.append(_FixedStrings(t.type_def))
        else:
            out.append(t)
    return out
