"""meterline.core.decimals against oracles computed here in a 200-digit context, at the schema's extremes."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meterline.core.decimals import MAX_ABS_VALUE, add, average, decimal_text, fits_storage
from query.store import meter_values

WIDE = Context(prec=200)
NINE = Decimal("1e-9")

#: Every value Decimal128(9) stores: up to 38 digits, 9 of them fractional.
stored = st.integers(-(10**38) + 1, 10**38 - 1).map(lambda units: Decimal(units).scaleb(-9, WIDE))
#: Query totals are summed as Decimal256(9): up to 76 digits.
totals = st.integers(-(10**76) + 1, 10**76 - 1).map(lambda units: Decimal(units).scaleb(-9, WIDE))


@settings(max_examples=500)
@given(stored)
@example(Decimal("12345678901234567890123.123456789"))  # the CSV bug: the default context wrote ...123.12346
@example(Decimal("-0E-9"))
@example(Decimal("1E+2"))
def test_decimal_text_is_exact_plain_and_canonical(d: Decimal) -> None:
    text = decimal_text(d)
    assert Decimal(text) == d  # exact
    assert "e" not in text.lower() and text != "-0"
    digits = text.lstrip("-")
    if "." in digits:
        assert not digits.endswith("0") and not digits.endswith(".")
    assert digits == "0" or not digits.startswith("0") or digits.startswith("0.")


def _oracle_average(total: Decimal, count: int) -> Decimal:
    with localcontext(WIDE):
        return (total / count).quantize(NINE, rounding=ROUND_HALF_EVEN)


@settings(max_examples=500)
@given(totals, st.integers(1, 2**64 - 1))
@example(Decimal("1e20"), 1)  # |avg| >= 1e19 made quantize raise InvalidOperation in the default context
@example(Decimal("99999999999999999999999999999.999999999"), 3)
@example(Decimal("0.000000005"), 1)
@example(Decimal("0.000000015"), 2)  # an exact half: ties go to even
@example(Decimal("0.000000025"), 2)
@example(Decimal("-0.000000015"), 2)
def test_average_is_the_exact_half_even_quotient(total: Decimal, count: int) -> None:
    assert average(total, count) == _oracle_average(total, count)
    assert average(total, count).as_tuple().exponent == -9


@settings(max_examples=200)
@given(st.lists(st.tuples(totals, st.integers(0, 10**6)), min_size=1, max_size=5))
def test_meter_values_avg_at_any_size(rows: list[tuple[Decimal, int]]) -> None:
    """The query path: what ClickHouse returns (a Decimal256 total and a count) becomes the exact AVG."""
    columns = {"total_sum": [t for t, _ in rows], "total_count": [c for _, c in rows]}
    want = [_oracle_average(t, c) if c else Decimal(0) for t, c in rows]
    assert meter_values("AVG", columns) == want


def test_average_refuses_what_it_cannot_answer() -> None:
    with pytest.raises(ValueError):
        average(Decimal(1), 0)
    with pytest.raises(ValueError):
        average(Decimal("0.0000000001"), 1)


@given(stored, stored)
def test_add_is_exact_and_fits_storage_is_the_decimal128_bound(a: Decimal, b: Decimal) -> None:
    with localcontext(WIDE):
        want = a + b
    assert add(a, b) == want
    assert fits_storage(want) == (want.copy_abs() < MAX_ABS_VALUE)  # abs() would round to 28 digits
