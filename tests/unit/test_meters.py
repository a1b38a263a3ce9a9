"""meterline.core.meters: value rules, JSONPath extraction (fast path == jsonpath-ng), validation."""

from __future__ import annotations

import math
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonpath_ng.ext.parser import parse as jsonpath_parse

from meterline.core.errors import ConfigError, MeterNotFoundError
from meterline.core.meters import (
    MISSING,
    Aggregation,
    Measurement,
    Meter,
    MeterSet,
    Rejection,
    compile_path,
    load_meters,
    parse_numeric,
    validate_meters,
)
from meterline.core.meters.jsonpath import jsonpath_ng_getter, simple_steps

WIDE = Context(prec=2000, Emax=10**6, Emin=-(10**6))


# ----------------------------------------------------------------------------- parse_numeric


def _oracle(s: str) -> Decimal | None:
    """Independent oracle: exact Decimal if Decimal128(9) holds it exactly, else None."""
    d = Decimal(s)
    if d.copy_abs() >= Decimal("1e29"):
        return None
    scaled = d.scaleb(9, WIDE)
    if scaled != scaled.to_integral_value(context=WIDE):
        return None
    return d


digits = st.text("0123456789", min_size=1, max_size=40)
numeric_strings = st.builds(
    lambda sign, body, exp: sign + body + exp,
    st.sampled_from(["", "+", "-"]),
    st.one_of(
        digits,
        st.builds(lambda a, b: f"{a}.{b}", digits, st.text("0123456789", max_size=15)),
        st.builds(lambda b: f".{b}", digits),
    ),
    st.one_of(
        st.just(""),
        st.builds(
            lambda e, s, n: f"{e}{s}{n}",
            st.sampled_from("eE"),
            st.sampled_from(["", "+", "-"]),
            st.integers(0, 60).map(str),
        ),
    ),
)


@given(numeric_strings)
@settings(max_examples=500)
def test_parse_numeric_matches_decimal_oracle(s: str) -> None:
    expected = _oracle(s)
    if expected is None:
        with pytest.raises(ValueError):
            parse_numeric(s)
    else:
        got = parse_numeric(s)
        assert got == expected
        assert got.as_tuple().exponent == -9


@given(st.text(max_size=30))
@settings(max_examples=500)
def test_parse_numeric_junk_raises_only_value_error(s: str) -> None:
    try:
        got = parse_numeric(s)
    except ValueError:
        return
    assert isinstance(got, Decimal) and got == Decimal(s)


@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(),
        st.binary(max_size=4),
    )
)
def test_parse_numeric_any_json_value_only_value_error(v: Any) -> None:
    try:
        got = parse_numeric(v)
    except ValueError:
        return
    assert isinstance(v, (int, float)) and not isinstance(v, bool)
    expected = Decimal(v) if isinstance(v, int) else Decimal(repr(v))
    assert got == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("123456", "123456"),
        ("1.5e3", "1500"),
        ("-2", "-2"),
        (".5", "0.5"),
        ("5.", "5"),
        (0.1, "0.1"),
        (10200, "10200"),
        ("0.000000001", "0.000000001"),
        ("1.0000000000000", "1"),
        ("99999999999999999999999999999.999999999", "99999999999999999999999999999.999999999"),
        ("0e999999", "0"),
    ],
)
def test_parse_numeric_accepts(value: Any, expected: str) -> None:
    assert parse_numeric(value) == Decimal(expected)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (True, "value_not_numeric"),
        (None, "value_null"),
        ({"a": 1}, "value_not_numeric"),
        ([1], "value_not_numeric"),
        ("NaN", "value_not_numeric"),
        ("Infinity", "value_not_numeric"),
        (math.nan, "value_not_finite"),
        (math.inf, "value_not_finite"),
        (" 1", "value_not_numeric"),
        ("1\n", "value_not_numeric"),
        ("1_000", "value_not_numeric"),
        ("0x10", "value_not_numeric"),
        ("١", "value_not_numeric"),  # non-ASCII digit
        ("", "value_not_numeric"),
        ("0.0000000001", "value_out_of_range"),
        ("1e29", "value_out_of_range"),
        (10**29, "value_out_of_range"),
        (1e300, "value_out_of_range"),
        ("1e-99999999", "value_out_of_range"),
        ("1e99999999999", "value_out_of_range"),
    ],
)
def test_parse_numeric_rejects(value: Any, code: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_numeric(value)
    assert info.value.code == code


# ----------------------------------------------------------------------------- JSONPath

KEYS = ["a", "b", "tokens", "x_1", "a b", "a-b", "0"]
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=3)
)
json_data = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=12,
)


def _render_step(step: str | int, style: int) -> str:
    if isinstance(step, int):
        return f"[{step}]"
    plain = step.isidentifier()
    if plain and style == 0:
        return f".{step}"
    quote = "'" if style != 2 else '"'
    return f"[{quote}{step}{quote}]"


simple_paths = st.lists(st.one_of(st.sampled_from(KEYS), st.integers(-3, 3)), min_size=0, max_size=4).flatmap(
    lambda steps: st.lists(st.integers(0, 2), min_size=len(steps), max_size=len(steps)).map(
        lambda styles: "$" + "".join(_render_step(s, y) for s, y in zip(steps, styles))
    )
)


@given(simple_paths, json_data)
@settings(max_examples=600)
def test_fast_path_agrees_with_jsonpath_ng(path: str, data: Any) -> None:
    assert simple_steps(jsonpath_parse(path)) is not None, path  # really the fast path
    fast = compile_path(path)(data)
    slow = jsonpath_ng_getter(path)(data)
    if slow is MISSING:
        assert fast is MISSING
    else:
        assert fast is not MISSING and fast == slow and type(fast) is type(slow)


@pytest.mark.parametrize("path", ["$.items[*].x", "$..x", "$.a[0:2]", "$['a','b']", "$.items[?(@.x > 1)].x"])
def test_complex_paths_use_jsonpath_ng(path: str) -> None:
    assert simple_steps(jsonpath_parse(path)) is None
    compile_path(path)  # compiles


def test_compile_path_is_cached() -> None:
    assert compile_path("$.cached.path") is compile_path("$.cached.path")


def test_compile_path_invalid_shows_parser_error() -> None:
    with pytest.raises(ValueError, match=r"invalid JSONPath '\$\.\['"):
        compile_path("$.[")


# ----------------------------------------------------------------------------- measuring


def _m(**kw: Any) -> Meter:
    base: dict[str, Any] = {"slug": "m", "eventType": "t", "aggregation": "SUM", "valueProperty": "$.v"}
    base.update(kw)
    return Meter.model_validate(base)


def _measure(meter: Meter, data: Any = MISSING) -> Measurement | Rejection:
    ev: dict[str, Any] = {"type": meter.event_type}
    if data is not MISSING:
        ev["data"] = data
    ms, rs = MeterSet([meter]).measure(ev)
    assert len(ms) + len(rs) == 1
    return (ms + rs)[0]  # type: ignore[operator]


def test_meter_aliases_and_dump_shape() -> None:
    m = Meter(
        slug="s", event_type="e", aggregation=Aggregation.SUM, value_property="$.v", group_by={"k": "$.k"}
    )
    assert m.model_dump(by_alias=True, mode="json") == {
        "slug": "s",
        "description": "",
        "eventType": "e",
        "aggregation": "SUM",
        "valueProperty": "$.v",
        "groupBy": {"k": "$.k"},
        "eventFrom": None,
    }


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({}, "value_missing"),
        ({"v": None}, "value_null"),
        ({"v": "abc"}, "value_not_numeric"),
        ({"v": True}, "value_not_numeric"),
        ({"v": {"x": 1}}, "value_not_numeric"),
        ({"v": float("nan")}, "value_not_finite"),
        ({"v": "1e40"}, "value_out_of_range"),
        ("a string", "value_missing"),
        (None, "value_missing"),
        (MISSING, "value_missing"),
        ([1, 2], "value_missing"),
    ],
)
def test_value_rejections(data: Any, code: str) -> None:
    r = _measure(_m(), data)
    assert isinstance(r, Rejection) and r.code == code and r.meter == "m"
    assert "$.v" in r.reason


def test_value_ambiguous() -> None:
    r = _measure(_m(valueProperty="$.items[*].v"), {"items": [{"v": 1}, {"v": 2}]})
    assert isinstance(r, Rejection) and r.code == "value_ambiguous"
    ok = _measure(_m(valueProperty="$.items[*].v"), {"items": [{"v": 1}]})
    assert isinstance(ok, Measurement) and ok.value == Decimal(1)


def test_count_counts_without_data_or_groups() -> None:
    meter = _m(aggregation="COUNT", valueProperty=None, groupBy={"k": "$.k"})
    for data in (MISSING, None, "str", [], {}):
        r = _measure(meter, data)
        assert isinstance(r, Measurement)
        assert r.value is None and r.group == {} and r.group_key == "{}"


def test_group_values_and_key() -> None:
    meter = _m(
        groupBy={
            "s": "$.s",
            "i": "$.i",
            "f": "$.f",
            "b": "$.b",
            "o": "$.o",
            "n": "$.n",
            "z": "$.z",
            "w": "$.w[*]",
        }
    )
    data = {
        "v": 1,
        "s": "x",
        "i": 3,
        "f": 1.5,
        "b": False,
        "o": {"b": 1, "a": [1, "2"]},
        "n": None,
        "w": [1, 2],
    }
    r = _measure(meter, data)
    assert isinstance(r, Measurement)
    assert r.group == {"s": "x", "i": "3", "f": "1.5", "b": "false", "o": '{"a":[1,"2"],"b":1}', "w": "[1,2]"}
    assert r.group_key == orjson.dumps(r.group, option=orjson.OPT_SORT_KEYS).decode()
    # group_key is independent of the groupBy/data key order
    meter2 = _m(groupBy=dict(reversed(list(meter.group_by.items()))))
    r2 = _measure(meter2, dict(reversed(list(data.items()))))
    assert isinstance(r2, Measurement) and r2.group_key == r.group_key


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", "abc"),
        (1, "1"),
        (1.0, "1"),
        ("1", "1"),
        ("1.0", "1.0"),
        (1e2, "100"),
        (-0.0, "0"),
        (True, "true"),
        (False, "false"),
        (10**40, "1" + "0" * 40),
        (0.1, "0.1"),
    ],
)
def test_unique_count_values(value: Any, expected: str) -> None:
    r = _measure(_m(aggregation="UNIQUE_COUNT"), {"v": value})
    assert isinstance(r, Measurement) and r.value == expected


@pytest.mark.parametrize(
    ("value", "code"), [(None, "value_null"), ({"a": 1}, "value_not_scalar"), ([1], "value_not_scalar")]
)
def test_unique_count_rejections(value: Any, code: str) -> None:
    r = _measure(_m(aggregation="UNIQUE_COUNT"), {"v": value})
    assert isinstance(r, Rejection) and r.code == code


def test_meterset_lookup_and_fanout() -> None:
    a = _m(slug="a")
    b = _m(slug="b", aggregation="COUNT", valueProperty=None)
    c = _m(slug="c", eventType="other")
    ms = MeterSet([a, b, c])
    assert list(ms.for_type("t")) == [a, b]
    assert list(ms.for_type("nope")) == []
    assert ms.get("c") is c
    with pytest.raises(MeterNotFoundError):
        ms.get("zzz")
    got, rej = ms.measure({"type": "t", "data": {"v": "2"}})
    assert [m.meter.slug for m in got] == ["a", "b"] and rej == []
    assert ms.measure({"type": "nope", "data": {}}) == ([], [])


# ----------------------------------------------------------------------------- validation

SRC = "conf.yaml"


def _errors(meters: list[Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_meters({"meters": meters}, SRC)
    return str(info.value).splitlines()


GOOD = {"slug": "ok", "eventType": "e", "aggregation": "SUM", "valueProperty": "$.v"}


@pytest.mark.parametrize(
    ("patch", "field", "fragment"),
    [
        ({"slug": "Bad Slug"}, "slug", "must match"),
        ({"slug": "a__b"}, "slug", "must match"),
        ({"slug": "a" * 64}, "slug", "at most 63"),
        ({"aggregation": "TOTAL"}, "aggregation", "SUM, COUNT, AVG, MIN, MAX, UNIQUE_COUNT, LATEST"),
        ({"valueProperty": "$.["}, "valueProperty", "invalid JSONPath"),
        ({"aggregation": "COUNT"}, "valueProperty", "must not be set for COUNT"),
        ({"valueProperty": None}, "valueProperty", "required for SUM"),
        ({"groupBy": {"subject": "$.s"}}, "groupBy", "'subject' is reserved"),
        ({"groupBy": {"bad-key": "$.s"}}, "groupBy", "'bad-key' must match"),
        ({"groupBy": {"k": "$.["}}, "groupBy", "invalid JSONPath"),
        ({"eventType": ""}, "eventType", "non-empty"),
        ({"eventType": None}, "eventType", "valid string"),
        ({"valueproperty": "$.v"}, "valueproperty", "Extra inputs"),
    ],
)
def test_validation_messages_name_file_slug_field(patch: dict[str, Any], field: str, fragment: str) -> None:
    item = {**GOOD, **patch}
    errs = _errors([GOOD, item])
    slug = item["slug"]
    assert any(e.startswith(f"{SRC}: meters[1] ({slug}).{field}: ") and fragment in e for e in errs), errs


def test_validation_missing_fields() -> None:
    errs = _errors([{"slug": "x"}])
    assert f"{SRC}: meters[0] (x).eventType: is required" in errs
    assert f"{SRC}: meters[0] (x).aggregation: is required" in errs


def test_validation_lists_every_problem_and_duplicates() -> None:
    errs = _errors(
        [
            GOOD,
            {**GOOD, "aggregation": "NOPE"},
            GOOD,
            {"slug": "B", "eventType": "e", "aggregation": "COUNT", "valueProperty": "$.v"},
            "not a mapping",
        ]
    )
    assert any(e.startswith(f"{SRC}: meters[1] (ok).aggregation:") for e in errs)
    assert any(e.startswith(f"{SRC}: meters[2] (ok).slug: duplicate") for e in errs)
    assert any(e.startswith(f"{SRC}: meters[3] (B).slug:") for e in errs)
    assert any(e.startswith(f"{SRC}: meters[3] (B).valueProperty:") for e in errs)
    assert any(e.startswith(f"{SRC}: meters[4]: must be a mapping") for e in errs)


def test_validate_accepts_list_or_mapping_and_ignores_window_size() -> None:
    assert validate_meters([{**GOOD, "windowSize": "MINUTE"}], SRC)[0].slug == "ok"
    assert validate_meters({"meters": None}, SRC) == []


def test_load_meters_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    with pytest.raises(ConfigError, match="cannot read"):
        load_meters(p)
    p.write_text("meters: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_meters(p)
    p.write_text("events_topic: x\nmeters:\n  - {slug: s, eventType: e, aggregation: COUNT}\n")
    assert [m.slug for m in load_meters(p)] == ["s"]
    p.write_text("meters:\n  - {slug: s, eventType: e, aggregation: MAXX}\n")
    with pytest.raises(ConfigError, match=rf"^{p}: meters\[0\] \(s\)\.aggregation: "):
        load_meters(p)
