"""SQL text and bound parameters of every query in query/sql.py (no server needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from query.filters import FilterString, parse_filter
from query.shapes import ingested_event
from query.sql import (
    dead_letters_query,
    edge_events_query,
    events_query,
    group_values_query,
    meter_query,
    subjects_query,
)
from query.store import meter_values
from query.windowing import split_range

T0 = datetime(2024, 3, 10, 0, 0, tzinfo=UTC)
T1 = datetime(2024, 3, 11, 0, 0, tzinfo=UTC)


def test_meter_query_hour_in_zone_with_filters() -> None:
    q = meter_query(
        "db", "tokens", "SUM", split=split_range(T0, T1), window_size="HOUR", tz="Asia/Kathmandu",
        subjects=["a", "b"], group_by=["model"], group_by_subject=True,
        filters={"type": FilterString("$in", ("input",))},
    )
    assert "FROM `db`.meter_windows FINAL" in q.sql
    assert "toUnixTimestamp(toStartOfHour(window_start, {tz:String})) AS bucket" in q.sql
    assert "subject AS subject_key" in q.sql
    assert "if(mapContains(group, {p0:String}), group[{p0:String}], NULL) AS group_0" in q.sql
    assert "sum(sum) AS total_sum" in q.sql
    assert "window_start >= {from:DateTime('UTC')}" in q.sql and "window_start < {to:DateTime('UTC')}" in q.sql
    assert "subject IN {subjects:Array(String)}" in q.sql
    assert "ifNull((if(mapContains(group, {p1:String}), group[{p1:String}], NULL) IN {p2:Array(String)}), 0)" in q.sql
    assert "GROUP BY bucket, subject_key, group_0" in q.sql
    assert q.parameters == {
        "meter": "tokens", "from": "2024-03-10 00:00:00", "to": "2024-03-11 00:00:00", "tz": "Asia/Kathmandu",
        "subjects": ["a", "b"], "p0": "model", "p1": "type", "p2": ["input"],
    }
    assert "format(" not in q.sql  # whole minutes only: no edge rows


@pytest.mark.parametrize(
    ("agg", "fragments", "where"),
    [
        ("COUNT", ["sum(count) AS total_count"], None),
        ("AVG", ["sum(sum) AS total_sum", "sum(count) AS total_count"], None),
        ("MIN", ["min(min) AS total_min"], "min IS NOT NULL"),
        ("MAX", ["max(max) AS total_max"], "max IS NOT NULL"),
        ("UNIQUE_COUNT", ["uniqExactArray(uniques) AS total_unique"], None),
        ("LATEST", ["argMax(latest_value, (latest_time, latest_rank)) AS total_latest"], "latest_value IS NOT NULL"),
    ],
)
def test_meter_query_aggregations(agg: str, fragments: list[str], where: str | None) -> None:
    q = meter_query("db", "m", agg, split=split_range(None, T1))
    for fragment in fragments:
        assert fragment in q.sql
    if where:
        assert where in q.sql
    assert "toUInt32(0) AS bucket" in q.sql and "{from:" not in q.sql
    assert q.parameters == {"meter": "m", "to": "2024-03-11 00:00:00"}


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        ("MINUTE", "toUnixTimestamp(window_start) AS bucket"),
        ("DAY", "toUnixTimestamp(toStartOfDay(window_start, {tz:String})) AS bucket"),
        ("MONTH", "toUnixTimestamp(toDateTime(toStartOfMonth(window_start, {tz:String}), {tz:String})) AS bucket"),
    ],
)
def test_meter_query_window_sizes(size: str, fragment: str) -> None:
    q = meter_query("db", "m", "SUM", split=split_range(T0, T1), window_size=size, tz="Europe/Berlin")
    assert fragment in q.sql
    assert ("tz" in q.parameters) == (size != "MINUTE")


def test_meter_query_rejects_unknowns() -> None:
    with pytest.raises(ValueError):
        meter_query("db", "m", "MEDIAN", split=split_range(None, T1))
    with pytest.raises(ValueError):
        meter_query("db", "m", "SUM", split=split_range(None, T1), window_size="WEEK")


def test_meter_values_avg_is_exact_decimal() -> None:
    columns = {"total_sum": [Decimal("10.000000000"), Decimal(2), Decimal(0)], "total_count": [3, 3, 0]}
    assert meter_values("AVG", columns) == [Decimal("3.333333333"), Decimal("0.666666667"), Decimal(0)]
    assert meter_values("COUNT", {"total_count": [7, 0]}) == [7, 0]
    assert meter_values("UNIQUE_COUNT", {"total_unique": [2]}) == [2]
    assert all(type(v) is Decimal for v in meter_values("MAX", {"total_max": [Decimal("1.5"), 3]}))
    with pytest.raises(ValueError):
        meter_values("MEDIAN", {})


def test_subjects_and_group_values_queries() -> None:
    q = subjects_query("db", "m", start=T0, end=T1)
    assert q.sql.startswith("SELECT DISTINCT subject\nFROM `db`.meter_windows\n")
    assert "ORDER BY subject" in q.sql
    assert q.parameters == {"meter": "m", "p0": "2024-03-10 00:00:00", "p1": "2024-03-11 00:00:00"}
    q = group_values_query("db", "m", "model")
    assert "SELECT DISTINCT group[{key:String}] AS value" in q.sql and "mapContains(group, {key:String})" in q.sql
    assert q.parameters == {"meter": "m", "key": "model"}


def test_meter_query_with_edges_unions_raw_deltas() -> None:
    split = split_range(datetime(2024, 3, 10, 0, 0, 15, tzinfo=UTC), datetime(2024, 3, 10, 1, 0, 30, tzinfo=UTC))
    q = meter_query("db", "m", "UNIQUE_COUNT", split=split, filters={"model": parse_filter({"$ne": "x"}, "f")},
                    edges='{"subject":"s"}')
    assert "UNION ALL" in q.sql and "FROM format(JSONEachRow," in q.sql and "{edges:String}" in q.sql
    assert q.parameters["from"] == "2024-03-10 00:01:00" and q.parameters["to"] == "2024-03-10 01:00:00"
    assert "(NOT ifNull((if(mapContains(group, {p0:String}), group[{p0:String}], NULL) = {p1:String}), 0))" in q.sql
    inside = split_range(datetime(2024, 3, 10, 0, 0, 15, tzinfo=UTC), datetime(2024, 3, 10, 0, 0, 30, tzinfo=UTC))
    q = meter_query("db", "m", "SUM", split=inside, edges="")
    assert "meter_windows" not in q.sql  # from and to inside one minute: raw events only


def test_edge_events_query() -> None:
    a, b = datetime(2024, 3, 10, 0, 0, 15, tzinfo=UTC), datetime(2024, 3, 10, 0, 1, tzinfo=UTC)
    q = edge_events_query("db", "prompt", [(a, b)], ["s1"])
    assert "FROM `db`.events FINAL" in q.sql and "type = {type:String}" in q.sql
    assert "(time >= {p0:DateTime64(6, 'UTC')} AND time < {p1:DateTime64(6, 'UTC')})" in q.sql
    assert "subject IN {p2:Array(String)}" in q.sql and q.sql.endswith("ORDER BY log_epoch, kafka_partition, kafka_offset, batch_index")
    assert q.parameters == {"type": "prompt", "p0": "2024-03-10 00:00:15.000000", "p1": "2024-03-10 00:01:00.000000",
                            "p2": ["s1"]}


def test_events_query() -> None:
    q = events_query("db", start=T0, end=T1, subject="s", limit=5)
    assert "FROM `db`.events FINAL" in q.sql
    assert "time >= {from:DateTime64(6, 'UTC')}" in q.sql and "time <= {to:DateTime64(6, 'UTC')}" in q.sql
    assert "subject = {subject:String}" in q.sql
    assert "ORDER BY time DESC" in q.sql and q.sql.endswith("LIMIT {limit:UInt32}")
    assert q.parameters == {
        "limit": 5, "from": "2024-03-10 00:00:00.000000", "to": "2024-03-11 00:00:00.000000", "subject": "s"
    }
    assert "WHERE" not in events_query("db").sql


def test_dead_letters_query() -> None:
    q = dead_letters_query("db", meter="m", reason_code="value_missing", start=T0, limit=10)
    assert "FROM `db`.dead_letters FINAL" in q.sql
    assert "meter = {meter:String}" in q.sql and "reason_code = {reason_code:String}" in q.sql
    assert "received_at >= {from:DateTime64(6, 'UTC')}" in q.sql and "{to:" not in q.sql
    assert q.parameters == {"limit": 10, "meter": "m", "reason_code": "value_missing", "from": "2024-03-10 00:00:00.000000"}


def test_database_name_is_quoted() -> None:
    assert "FROM `we\\`ird`.events FINAL" in events_query("we`ird").sql  # schema.quote_identifier


def test_ingested_event_shape() -> None:
    row = {
        "id": "1", "source": "s", "type": "t", "subject": "x", "time": T0, "data": '{"a": 1}',
        "ingested_at": T1, "validation_errors": ["m1: value missing", "m2: value null"],
    }
    assert ingested_event(row) == {
        "event": {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "x",
                  "time": "2024-03-10T00:00:00.000000Z", "data": {"a": 1}},
        "validationError": "m1: value missing; m2: value null",
        "ingestedAt": "2024-03-11T00:00:00.000000Z",
        "storedAt": "2024-03-11T00:00:00.000000Z",
    }
