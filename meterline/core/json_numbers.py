"""JSON numbers that orjson cannot carry exactly, found before they are metered.

Why: ingest parses bodies with orjson, which turns an integer beyond 64 bits into the nearest float
(123456789012345678901234567890 becomes 1.2345678901234568e+29) and a decimal with more significant
digits than a float holds into a rounded float, without a word. Metered, those would be invoices off by
the rounding. So a request carrying such a number is refused (400, naming the event and field) and the
client is told to send it as a JSON string, which meters read exactly.

Only bodies with a run of 16+ digits can hold such a number; only those pay for a second, exact parse
with the standard library, which sees every number's literal text.

This module does no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final

#: A literal orjson may not carry exactly has at least 16 digits (2^53 has 16; floats hold 15-17), so a
#: body without a run of 16 digits-or-dots has none. Found by mapping digits and dots to "0", everything
#: else to " ", and a substring search: ~20 us for a 100-event body, where a regex took ~200.
_DIGITS_AND_DOTS: Final = bytes(0x30 if chr(b) in "0123456789." else 0x20 for b in range(256))
_LONG_RUN: Final = b"0" * 16
INT_MIN: Final = -(2**63)
UINT_MAX: Final = 2**64 - 1


def inexact_numbers(body: bytes, items: Sequence[Any]) -> list[dict[str, Any]]:
    """`{index, field, message}` for every number in `body` that orjson's `items` do not hold exactly.

    `items` are the events orjson parsed from `body` (a batch, or one event as a one-item list).
    """
    if _LONG_RUN not in body.translate(_DIGITS_AND_DOTS):
        return []
    literals: dict[float, str] = {}  # what orjson made of each inexact literal -> the literal

    def exact_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # beyond Python's digit limit for int(): certainly beyond 64 bits
            literals[float(text)] = text
            return 0
        if not INT_MIN <= value <= UINT_MAX:
            literals[float(text)] = text
        return value

    def exact_float(text: str) -> float:
        value = float(text)
        try:
            exact = math.isfinite(value) and Decimal(repr(value)) == Decimal(text)
        except InvalidOperation:
            exact = False
        if not exact:
            literals[value] = text
        return value

    try:
        json.loads(body, parse_int=exact_int, parse_float=exact_float)
    except (ValueError, RecursionError):
        return []  # the stdlib refuses what orjson read; there is no literal to compare against
    if not literals:
        return []
    errors = [
        {"index": index, "field": field, "message": _message(literals[value])}
        for index, item in enumerate(items)
        for field, value in _floats(item)
        if value in literals
    ]
    # Every inexact literal became a float somewhere in `items`; should one hide (e.g. as a dict key),
    # the request is still refused, naming the literal.
    return errors or [{"field": "body", "message": _message(text)} for text in literals.values()]


def _message(literal: str) -> str:
    shown = literal if len(literal) <= 60 else literal[:57] + "..."
    return (
        f"the number {shown} cannot be carried exactly (an integer beyond 64 bits or more significant digits "
        f'than a float holds); send it as a JSON string, e.g. "{shown}", which meters read exactly'
    )


def _floats(item: Any) -> Iterator[tuple[str, float]]:
    """Every float leaf of `item` with its path (`data.usage[2].tokens`), iteratively."""
    stack: list[tuple[str, Any]] = [("", item)]
    while stack:
        path, node = stack.pop()
        if type(node) is float:
            yield path or "event", node
        elif type(node) is dict:
            stack.extend((f"{path}.{key}" if path else str(key), child) for key, child in node.items())
        elif type(node) is list:
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(node))
