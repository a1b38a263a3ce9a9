"""Value rules: which JSON values a meter accepts, and as what.

Amounts become Decimals with exactly 9 fractional digits (ClickHouse Decimal128(9)); anything that
cannot be stored exactly is rejected with a reason code, never rounded: billing must not round silently.
UNIQUE_COUNT and groupBy values become canonical text so equal values always land in one row.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, Inexact
from typing import Any

import orjson

from meterline.core.decimals import CONTEXT, QUANTUM, SCALE, fits_storage
from meterline.core.reasons import ReasonCode

__all__ = [
    "NumericValueError",
    "canonical_unique",
    "group_text",
    "parse_numeric",
]


_NUMERIC_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class NumericValueError(ValueError):
    """A value that cannot be metered as a number; ``code`` is the dead-letter reason code."""

    def __init__(self, code: ReasonCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _to_decimal(value: Any) -> Decimal:
    """Exact Decimal of a JSON number or numeric string, without range checks.

    Floats go through ``repr`` so 0.1 is 0.1 (what the sender wrote), not
    0.1000000000000000055511151231257827.
    """
    if isinstance(value, bool):
        raise NumericValueError(ReasonCode.VALUE_NOT_NUMERIC, "boolean is not numeric")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NumericValueError(ReasonCode.VALUE_NOT_FINITE, f"{value!r} is not finite")
        return Decimal(repr(value))
    if isinstance(value, str):
        if _NUMERIC_RE.fullmatch(value) is None:
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise NumericValueError(ReasonCode.VALUE_NOT_NUMERIC, f"string {shown!r} is not numeric")
        return Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise NumericValueError(ReasonCode.VALUE_NOT_FINITE, f"{value} is not finite")
        return value
    if value is None:
        raise NumericValueError(ReasonCode.VALUE_NULL, "value is null")
    raise NumericValueError(ReasonCode.VALUE_NOT_NUMERIC, f"{type(value).__name__} is not numeric")


def parse_numeric(value: Any) -> Decimal:
    """Parse a meter value into a Decimal with exactly 9 fractional digits.

    Accepts JSON ints/floats and strings matching
    ``^[+-]?(\\d+(\\.\\d*)?|\\.\\d+)([eE][+-]?\\d+)?$`` (ASCII digits only). Rejects bools,
    null, NaN/Infinity, objects and lists, and any value that Decimal128(9) cannot hold
    exactly (|v| >= 10**29 or more than 9 significant fractional digits): billing must never
    round silently. Raises :class:`NumericValueError` (a ``ValueError``) with a human reason.
    """
    d = _to_decimal(value)
    if not fits_storage(d):
        raise NumericValueError(ReasonCode.VALUE_OUT_OF_RANGE, f"{value!r} is outside ±10^29")
    try:
        q = d.quantize(QUANTUM, context=CONTEXT)
    except Inexact:
        raise NumericValueError(
            ReasonCode.VALUE_OUT_OF_RANGE, f"{value!r} has more than {SCALE} fractional digits"
        ) from None
    return q


def canonical_unique(value: Any) -> str:
    """The distinct-value string of a UNIQUE_COUNT value.

    Strings are taken as-is; numbers become their canonical decimal text so 1, 1.0 and 1e0
    (and the string "1") are one value; bools are ``true``/``false``. Numbers are not range
    limited here because they are identifiers, not amounts.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    d = _to_decimal(value)
    if d.is_zero():
        return "0"
    return format(d.normalize(CONTEXT), "f")


def group_text(value: Any) -> str:
    """groupBy value as text: strings as-is, scalars as JSON text, containers compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except (orjson.JSONEncodeError, TypeError):
        # >64-bit ints or non-string keys: orjson refuses, the stdlib does not.
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

