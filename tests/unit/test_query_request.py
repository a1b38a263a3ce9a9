"""Meter query requests (GET parameters and POST bodies), filters and CSV cells: pure parsing rules."""

from __future__ import annotations

import csv
import io

import pytest
from starlette.datastructures import QueryParams

from meterline.core.errors import InvalidQueryError
from meterline.core.meters import Meter
from query.export import csv_text, prefers_csv, text_cell
from query.filters import MAX_DEPTH, FilterString, parse_filter
from query.request import from_body, from_query_params

METER = Meter.model_validate({"slug": "tokens", "eventType": "prompt", "aggregation": "SUM",
                              "valueProperty": "$.tokens", "groupBy": {"model": "$.model", "type": "$.type"}})


def test_subject_filters_and_groups() -> None:
    q = from_query_params(METER, QueryParams("subject=a&subject=b&subject=a&groupBy=model"))
    assert q.subjects == ("a", "b") and q.group_by_subject and q.group_by == ("model",)
    assert not from_query_params(METER, QueryParams("groupBy=model")).group_by_subject


def test_get_and_post_mean_the_same() -> None:
    get = from_query_params(METER, QueryParams(
        "from=2024-01-01T00:00:15.5Z&windowSize=HOUR&windowTimeZone=Asia/Kolkata&filterGroupBy[model]=a"
        "&filterGroupBy[model]=b&clientId=c1"))
    post = from_body(METER, {"from": "2024-01-01T00:00:15.5Z", "windowSize": "HOUR", "windowTimeZone": "Asia/Kolkata",
                             "filterGroupBy": {"model": ["a", "b"]}, "clientId": "c1"})
    assert get == post
    assert post.filters == {"model": FilterString("$in", ("a", "b"))}


def test_advanced_filters_as_json_and_deep_object() -> None:
    as_json = from_query_params(METER, QueryParams('advancedMeterGroupByFilters={"model":{"$in":["a","b"]},"type":{"$ne":"x"}}'))
    deep = from_query_params(METER, QueryParams(
        "advancedMeterGroupByFilters[model][$in]=a&advancedMeterGroupByFilters[model][$in]=b"
        "&advancedMeterGroupByFilters[type][$ne]=x"))
    assert as_json.filters == deep.filters == {
        "model": FilterString("$in", ("a", "b")), "type": FilterString("$ne", "x")}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("unknown=1", "unknown"),
        ("filterCustomerId=c", "filterCustomerId"),
        ("groupBy=customer_id", "groupBy"),
        ("groupBy=colour", "groupBy"),
        ("windowSize=WEEK", "windowSize"),
        ("from=2024-01-01T00:00:01Z&to=2024-01-01T00:00:01.9Z", "from"),
        ("filterGroupBy=%7B%27model%27%3A+%27a%27%7D", "filterGroupBy"),
        ("filterGroupBy[model]=a&advancedMeterGroupByFilters={\"type\":{\"$eq\":\"x\"}}", "filterGroupBy"),
        ("advancedMeterGroupByFilters=notjson", "advancedMeterGroupByFilters"),
        ("advancedMeterGroupByFilters[model]=%5Bobject+Object%5D", "advancedMeterGroupByFilters[model]"),
        ("advancedMeterGroupByFilters[model][$eq]=%5Bobject+Object%5D", "advancedMeterGroupByFilters[model][$eq]"),
        ("clientId=" + "x" * 37, "clientId"),
        ("windowTimeZone=right/UTC", "windowTimeZone"),
    ],
)
def test_bad_parameters_are_a_400_naming_them(query: str, field: str) -> None:
    with pytest.raises(InvalidQueryError) as info:
        from_query_params(METER, QueryParams(query))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"$eq": "a", "$ne": "b"}, "f"),
        ({}, "f"),
        ({"$regex": "a"}, "f.$regex"),
        ({"$in": []}, "f.$in"),
        ({"$in": ["a", 1]}, "f.$in"),
        ({"$eq": 5}, "f.$eq"),
        ({"$exists": "yes"}, "f.$exists"),
        ({"$and": {"$eq": "a"}}, "f.$and"),
        ("a", "f"),
    ],
)
def test_filter_string_validation(value: object, field: str) -> None:
    with pytest.raises(InvalidQueryError) as info:
        parse_filter(value, "f")
    assert info.value.field == field


def test_filter_nesting_is_bounded() -> None:
    deep: dict[str, object] = {"$eq": "x"}
    for _ in range(MAX_DEPTH):
        deep = {"$or": [deep]}
    parse_filter(deep, "f")
    with pytest.raises(InvalidQueryError):
        parse_filter({"$and": [deep]}, "f")


@pytest.mark.parametrize("text", ["=1+1", "+SUM(A1)", "-2+3", "@cmd", "\tx", "\rx"])
def test_formula_like_cells_are_text(text: str) -> None:
    cell = text_cell(text)
    parsed = next(csv.reader(io.StringIO(cell)))[0]
    assert parsed == "'" + text


def test_null_and_empty_string_stay_distinguishable() -> None:
    out = csv_text(["a", "b", "c", "value"], [(("x",), [None, ""], "1.5")])
    assert out == 'a,b,c,value\r\nx,,"",1.5\r\n'
    assert text_cell('say "hi", ok') == '"say ""hi"", ok"'
    assert text_cell("plain") == "plain" and text_cell("-") == "'-"


@pytest.mark.parametrize(
    ("accept", "csv_wanted"),
    [
        ("text/csv", True), ("application/json", False), (None, False), ("*/*", False),
        ("text/csv, application/json", False), ("application/json;q=0.5, text/csv", True),
        ("application/json, text/csv;q=0.1", False), ("text/*", True), ("text/csv;q=0", False),
        ("application/json;q=0, */*;q=0.5", True),
    ],
)
def test_content_negotiation(accept: str | None, csv_wanted: bool) -> None:
    assert prefers_csv(accept) is csv_wanted
