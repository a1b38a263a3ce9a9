"""Numbers orjson cannot carry exactly are found, with the event and field that hold them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from meterline.core.json_numbers import inexact_numbers


def _check(body: bytes) -> list[dict[str, Any]]:
    value = orjson.loads(body)
    return inexact_numbers(body, value if isinstance(value, list) else [value])


@pytest.mark.parametrize(
    "literal",
    [
        "18446744073709551615",  # 2^64 - 1: orjson keeps it as an int
        "-9223372036854775808",  # -2^63
        "9007199254740993",  # beyond 2^53 but an int: exact
        "0.1",
        "1234567.125",
        "0.30000000000000004",  # 17 significant digits, and exactly what the float holds
        "1e300",
    ],
)
def test_numbers_orjson_keeps_exactly_pass(literal: str) -> None:
    body = f'{{"subject": "c", "data": {{"tokens": {literal}}}}}'.encode()
    assert orjson.loads(body)["data"]["tokens"] == (float(literal) if "." in literal or "e" in literal else int(literal))
    assert _check(body) == []


@pytest.mark.parametrize(
    ("literal", "orjson_gives"),
    [
        ("18446744073709551616", 1.8446744073709552e19),  # 2^64
        ("-9223372036854775809", -9.223372036854776e18),  # -2^63 - 1
        ("123456789012345678901234567890", 1.2345678901234568e29),
        ("0.12345678901234567890", 0.12345678901234568),
        ("12345678901.1234567", 12345678901.123457),
    ],
)
def test_numbers_orjson_rounds_are_refused_with_event_and_field(literal: str, orjson_gives: float) -> None:
    body = (
        b'[{"data": {"tokens": 1}}, {"data": {"usage": [{"tokens": 2}, {"tokens": '
        + literal.encode()
        + b'}]}}]'
    )
    assert orjson.loads(body)[1]["data"]["usage"][1]["tokens"] == orjson_gives  # the silent rounding
    errors = _check(body)
    assert [(e["index"], e["field"]) for e in errors] == [(1, "data.usage[1].tokens")]
    assert literal in errors[0]["message"] and "JSON string" in errors[0]["message"]


def test_long_digit_runs_inside_strings_are_not_numbers() -> None:
    body = b'{"id": "12345678901234567890123", "data": {"card": "4111111111111111111"}}'
    assert _check(body) == []


def test_every_inexact_number_is_reported() -> None:
    body = b'[{"data": {"a": 123456789012345678901, "b": 0.1}}, {"data": {"c": -99999999999999999999.5}}]'
    fields = sorted((e["index"], e["field"]) for e in _check(body))
    assert fields == [(0, "data.a"), (1, "data.c")]
