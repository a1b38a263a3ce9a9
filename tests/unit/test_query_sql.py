"""Decisions query/sql.py makes without a server: what it refuses, when edges need raw events, exact AVG.

What each query answers is tested by running it on ClickHouse (tests/integration/test_query.py, every
window of every aggregation, size, zone and filter against an oracle; tests/e2e/test_pipeline.py for
any-second edges); that no request value reaches the SQL text is tests/unit/test_query_sql_binding.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from query.filters import parse_filter
from query.shapes import ingested_event
from query.sql import (
    events_query,
    meter_query,
)
from query.store import meter_values
from query.windowing import split_range

T0 = datetime(2024, 3, 10, 0, 0, tzinfo=UTC)
T1 = datetime(2024, 3, 11, 0, 0, tzinfo=UTC)


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
