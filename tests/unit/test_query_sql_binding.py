"""Every request-supplied value reaches ClickHouse as a bound parameter, never as SQL text.

A property over every query builder in query/sql.py: values carrying quotes, backticks, backslashes and
a marker character that no SQL text contains are passed everywhere a request can put a string, and the
marker must show up in the parameters and never in the SQL. What the queries answer is tested by
running them (tests/integration/test_query.py, tests/e2e/test_pipeline.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from query.filters import parse_filter
from query.sql import (
    Query,
    dead_letters_query,
    edge_events_query,
    events_query,
    events_v2_query,
    group_values_query,
    meter_query,
    subject_entities_query,
    subjects_query,
)
from query.time_ranges import split_range

MARK = "\u2063"  # INVISIBLE SEPARATOR: never part of meterline's SQL text
T0 = datetime(2024, 3, 10, 0, 0, 15, tzinfo=UTC)
T1 = datetime(2024, 3, 11, 0, 0, 30, tzinfo=UTC)

hostile = st.text(max_size=12).map(lambda s: f"{MARK}{s}'`\"\\){{x:String}}{MARK}")


def marks(value: Any) -> int:
    if isinstance(value, str):
        return value.count(MARK)
    if isinstance(value, list | tuple):
        return sum(marks(v) for v in value)
    return 0


def assert_bound(q: Query, n_values: int) -> None:
    """No marker in the SQL text; every one of the `n_values` values (two markers each) in the parameters."""
    assert MARK not in q.sql, q.sql
    assert sum(marks(v) for v in q.parameters.values()) >= 2 * n_values, (q.parameters, n_values)


@settings(max_examples=40, deadline=None)
@given(meter=hostile, subject=hostile, key=hostile, value=hostile, agg=st.sampled_from(
    ["SUM", "COUNT", "AVG", "MIN", "MAX", "UNIQUE_COUNT", "LATEST"]), op=st.sampled_from(
    ["$eq", "$ne", "$like", "$nlike", "$ilike", "$nilike", "$contains", "$ncontains", "$in", "$nin"]))
def test_meter_query_binds_request_values(meter: str, subject: str, key: str, value: str, agg: str, op: str) -> None:
    operand: Any = [value] if op in ("$in", "$nin") else value
    filters = {key: parse_filter({op: operand}, "filter")}
    q = meter_query("db", meter, agg, split=split_range(T0, T1), window_size="HOUR", tz="Asia/Kathmandu",
                    subjects=[subject], group_by=[key], group_by_subject=True, filters=filters, edges=f"[{MARK}]")
    assert_bound(q, 4)


@settings(max_examples=40, deadline=None)
@given(a=hostile, b=hostile, c=hostile)
def test_listing_queries_bind_request_values(a: str, b: str, c: str) -> None:
    assert_bound(edge_events_query("db", a, [(T0, T1)], [b]), 2)
    assert_bound(subjects_query("db", a, start=T0, end=T1), 1)
    assert_bound(group_values_query("db", a, b, start=T0, end=T1), 2)
    assert_bound(events_query("db", start=T0, end=T1, subject=a, id_contains=b, subject_contains=c), 3)
    assert_bound(events_v2_query("db", filters={"subject": parse_filter({"$eq": a}, "filter"),
                                                "id": parse_filter({"$in": [b]}, "filter")}), 2)
    assert_bound(dead_letters_query("db", meter=a, reason_code=b, start=T0, end=T1), 2)
    assert_bound(subject_entities_query("db", a, keys=[b], id_or_key=c), 3)
