"""Exact decimal arithmetic and text for metered amounts: the one place a Decimal is added, divided or written.

Why one module: Python's default decimal context keeps 28 significant digits, but ClickHouse's
`Decimal128(9)` stores 38 (29 integer, 9 fractional) and a query's totals are summed as `Decimal256(9)`
(76). Any operation that silently uses the default context rounds those values: `normalize()` wrote
12345678901234567890123.123456789 as ...123.12346 in the "exact" CSV, and `quantize()` raised
InvalidOperation for every average of 1e19 or more. Everything here uses `CONTEXT`, which holds every
value the schema stores with room to spare, and traps instead of rounding.

This module does no I/O.
"""

from __future__ import annotations

from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow
from typing import Final

__all__ = [
    "CONTEXT",
    "MAX_ABS_VALUE",
    "QUANTUM",
    "SCALE",
    "add",
    "average",
    "decimal_text",
    "fits_storage",
]

SCALE: Final = 9
"""Fractional digits of ClickHouse Decimal128(9), where values and per-message window sums are stored."""
QUANTUM: Final = Decimal(1).scaleb(-SCALE)
MAX_ABS_VALUE: Final = Decimal(10) ** 29
"""Decimal128(9) holds 38 digits, 9 of them fractional: a stored value must stay below 10**29."""
CONTEXT: Final = Context(
    prec=120, Emax=999_999, Emin=-999_999,
    traps=[InvalidOperation, DivisionByZero, Overflow, Inexact],
)
"""120 digits hold any Decimal256(9) total (76) exactly, and `Inexact` is trapped: an operation that
would lose a digit raises instead of answering a different number (dropping zeros is not Inexact)."""


def fits_storage(value: Decimal) -> bool:
    """Whether `value` (at most 9 fractional digits) fits a Decimal128(9) column."""
    return value.copy_abs() < MAX_ABS_VALUE  # abs() would round in the default context


def add(a: Decimal, b: Decimal) -> Decimal:
    """Exact sum (raises rather than rounds: the traps are on)."""
    return CONTEXT.add(a, b)


def average(total: Decimal, count: int) -> Decimal:
    """`total / count` rounded half-even to 9 fractional digits (the stored scale), exactly.

    Integer arithmetic on the total's 10**-9 units, so there is no intermediate rounding to get wrong
    and no size limit: a Decimal256 total of any magnitude averages exactly.
    """
    if count <= 0:
        raise ValueError(f"average of {count} values")
    units = CONTEXT.scaleb(total, SCALE)
    if units != units.to_integral_value(context=CONTEXT):
        raise ValueError(f"{total} has more than {SCALE} fractional digits")
    n = int(units)
    q, r = divmod(abs(n), count)
    if 2 * r > count or (2 * r == count and q % 2 == 1):
        q += 1
    return CONTEXT.scaleb(Decimal(-q if n < 0 else q), -SCALE)


def decimal_text(value: Decimal) -> str:
    """Plain, exact decimal text without exponent or trailing zeros: 1.500000000 -> '1.5', 1E+2 -> '100',
    -0E-9 -> '0'. Also a valid JSON number literal carrying every digit (see query/routes.py)."""
    if not value.is_finite():
        raise ValueError(f"{value} is not finite")
    if value.is_zero():
        return "0"
    return format(value.normalize(CONTEXT), "f")
