"""OpenMeter's `FilterString` ($eq $ne $in $nin $like $nlike $ilike $nilike $contains $ncontains $gt $gte
$lt $lte $exists $and $or), parsed from JSON and turned into a ClickHouse boolean expression.

Used by `advancedMeterGroupByFilters` (meter queries) and the `filter` of `GET /api/v2/events`. Every
value becomes a bound parameter; only the column expression (chosen by meterline, never by the request)
is text. Like OpenMeter (`pkg/filter/filter.go`), a filter object holds exactly one operator and
nesting is bounded, so a request cannot build an arbitrarily deep expression.

Missing values: meterline keeps a missing group value apart from the empty string (it is SQL NULL, the
`null` group). A positive operator never matches a missing value; a negative one ($ne, $nin, $nlike,
$nilike, $ncontains) does, because "absent" is not equal to, in, or like anything. OpenMeter reads a
missing value as "" instead, so there `{"$eq": ""}` also matches events without the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meterline.core.errors import InvalidQueryError
from meterline.core.times import format_sql_time
from query.time_ranges import parse_instant

MAX_DEPTH = 8
MAX_VALUES = 1000

_SCALAR_OPS = ("$eq", "$ne", "$like", "$nlike", "$ilike", "$nilike", "$contains", "$ncontains",
               "$gt", "$gte", "$lt", "$lte")
_LIST_OPS = ("$in", "$nin")
_GROUP_OPS = ("$and", "$or")
OPERATORS = (*_SCALAR_OPS, *_LIST_OPS, "$exists", *_GROUP_OPS)
NEGATIVE = frozenset({"$ne", "$nin", "$nlike", "$nilike", "$ncontains"})


@dataclass(frozen=True, slots=True)
class FilterString:
    """One operator and its operand: a str, a tuple of str ($in/$nin), a bool ($exists) or a tuple of
    FilterString ($and/$or)."""

    op: str
    operand: Any


def _operator(value: Any, field: str, allowed: Sequence[str]) -> tuple[str, Any, str]:
    """The one operator a filter object sets, its operand, and the field name problems about it carry."""
    if not isinstance(value, Mapping):
        raise InvalidQueryError(field, f"must be an object with one operator ({', '.join(allowed)})")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise InvalidQueryError(f"{field}.{unknown[0]}", f"unknown operator; use one of {', '.join(allowed)}")
    ops = [k for k, v in value.items() if v is not None]
    if len(ops) != 1:
        raise InvalidQueryError(field, f"must set exactly one operator, got {len(ops)}")
    return ops[0], value[ops[0]], f"{field}.{ops[0]}"


def _check_nested(operand: Any, where: str, depth: int) -> None:
    """A group operator ($and/$or) holds a non-empty list of filters, nested at most MAX_DEPTH deep."""
    if not isinstance(operand, list) or not operand:
        raise InvalidQueryError(where, "must be a non-empty array of filters")
    if depth + 1 > MAX_DEPTH:
        raise InvalidQueryError(where, f"filters nest at most {MAX_DEPTH} levels deep")


def parse_filter(value: Any, field: str, depth: int = 0) -> FilterString:
    """A FilterString from decoded JSON; every problem is a 400 naming `field` (e.g.
    `advancedMeterGroupByFilters.model.$in[2]`)."""
    op, operand, where = _operator(value, field, OPERATORS)
    if op in _SCALAR_OPS:
        if not isinstance(operand, str):
            raise InvalidQueryError(where, "must be a string")
        return FilterString(op, operand)
    if op in _LIST_OPS:
        if not isinstance(operand, list) or not all(isinstance(v, str) for v in operand):
            raise InvalidQueryError(where, "must be an array of strings")
        if not operand or len(operand) > MAX_VALUES:
            raise InvalidQueryError(where, f"must hold between 1 and {MAX_VALUES} strings")
        return FilterString(op, tuple(operand))
    if op == "$exists":
        if not isinstance(operand, bool):
            raise InvalidQueryError(where, "must be true or false")
        return FilterString(op, operand)
    _check_nested(operand, where, depth)
    return FilterString(op, tuple(parse_filter(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(operand)))


def like_escape(text: str) -> str:
    """`text` as a LIKE pattern that matches it literally (for $contains)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


Bind = Callable[[Any, str], str]
"""bind(value, clickhouse_type) -> "{pN:Type}": registers a query parameter, returns its placeholder."""


def filter_sql(column: str, f: FilterString, bind: Bind) -> str:
    """A boolean ClickHouse expression; `column` may be NULL (a missing group value)."""
    if f.op in _GROUP_OPS:
        parts = [filter_sql(column, child, bind) for child in f.operand]
        return "(" + (" AND " if f.op == "$and" else " OR ").join(parts) + ")"
    if f.op == "$exists":
        return f"({column} IS {'NOT ' if f.operand else ''}NULL)"
    positive = _positive_sql(column, f, bind)
    if f.op in NEGATIVE:
        return f"(NOT ifNull({positive}, 0))"
    return f"ifNull({positive}, 0)"


def _positive_sql(column: str, f: FilterString, bind: Bind) -> str:
    op, v = f.op, f.operand
    if op in ("$in", "$nin"):
        return f"({column} IN {bind(list(v), 'Array(String)')})"
    if op in ("$contains", "$ncontains"):
        return f"({column} ILIKE {bind('%' + like_escape(v) + '%', 'String')})"
    sql_op = {"$eq": "=", "$ne": "=", "$like": "LIKE", "$nlike": "LIKE", "$ilike": "ILIKE", "$nilike": "ILIKE",
              "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[op]
    return f"({column} {sql_op} {bind(v, 'String')})"


_DT64 = "DateTime64(6, 'UTC')"
_TIME_OPS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


@dataclass(frozen=True, slots=True)
class FilterTime:
    """OpenMeter's FilterTime: one of $gt $gte $lt $lte (a datetime) or $and/$or (FilterTimes)."""

    op: str
    operand: Any


def parse_time_filter(value: Any, field: str, depth: int = 0) -> FilterTime:
    """A FilterTime from decoded JSON (RFC 3339 instants); problems are a 400 naming `field`."""
    op, operand, where = _operator(value, field, (*_TIME_OPS, *_GROUP_OPS))
    if op in _TIME_OPS:
        if not isinstance(operand, str):
            raise InvalidQueryError(where, "must be an RFC 3339 date-time string")
        return FilterTime(op, parse_instant(operand, where))
    _check_nested(operand, where, depth)
    return FilterTime(op, tuple(parse_time_filter(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(operand)))


def time_filter_sql(column: str, f: FilterTime, bind: Bind) -> str:
    """A boolean expression on a DateTime64 column; instants are bound with microseconds."""
    if f.op in _GROUP_OPS:
        parts = [time_filter_sql(column, child, bind) for child in f.operand]
        return "(" + (" AND " if f.op == "$and" else " OR ").join(parts) + ")"
    placeholder = bind(format_sql_time(f.operand, micro=True), _DT64)
    return f"({column} {_TIME_OPS[f.op]} {placeholder})"


__all__ = [
    "MAX_DEPTH",
    "OPERATORS",
    "FilterString",
    "FilterTime",
    "filter_sql",
    "like_escape",
    "parse_filter",
    "parse_time_filter",
    "time_filter_sql",
]
