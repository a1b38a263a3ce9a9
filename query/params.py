"""Reading single query-string parameters, the same way on every query route.

Each route used to carry its own copy of these; one copy keeps the 400s they raise (RFC 7807, naming
the parameter) worded alike everywhere.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import Request

from meterline.core.errors import InvalidQueryError
from query.time_ranges import parse_instant


def one(request: Request, name: str) -> str | None:
    """The parameter's value, None when absent; given twice is a 400 rather than a silent pick."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidQueryError(name, "must be given at most once")
    return values[0] if values else None


def instant(request: Request, name: str) -> datetime | None:
    """An RFC 3339 instant parameter, None when absent."""
    value = one(request, name)
    return None if value is None else parse_instant(value, name)


def integer(request: Request, name: str, default: int, low: int, high: int | None) -> int:
    """An integer parameter within [low, high] (no upper bound when `high` is None); `default` when absent."""
    raw = one(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidQueryError(name, f"must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise InvalidQueryError(name, f"must be between {low} and {high}" if high else f"must be at least {low}")
    return value
