"""Decisions query/sql.py makes without a server: what it refuses, when edges need raw events, exact AVG.

What each query answers is tested by running it on ClickHouse (tests/integration/test_query.py, every
window of every aggregation, size, zone and filter against an oracle; tests/e2e/test_pipeline.py for
any-second edges); that no request value reaches the SQL text is tests/unit/test_query_sql_binding.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meterline.core.compaction import STALE_COARSE
from query.filters import parse_filter
from query.shapes import ingested_event
from query.sql import (
    events_query,
    meter_query,
)
from query.store import meter_values
from query.time_ranges import coarse_plan, split_range

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
    assert "UNION ALL" in q.sql and "FROM meterline_edges" in q.sql and q.tables == {"meterline_edges": '{"subject":"s"}'}
    assert q.parameters["from"] == "2024-03-10 00:01:00" and q.parameters["to"] == "2024-03-10 01:00:00"
    assert "(NOT ifNull((if(mapContains(group, {p0:String}), group[{p0:String}], NULL) = {p1:String}), 0))" in q.sql
    inside = split_range(datetime(2024, 3, 10, 0, 0, 15, tzinfo=UTC), datetime(2024, 3, 10, 0, 0, 30, tzinfo=UTC))
    q = meter_query("db", "m", "SUM", split=inside, edges="")
    assert "meter_windows" not in q.sql  # from and to inside one minute: raw events only


def test_meter_query_with_coarse_rows_reads_quarters_and_minutes_around_them() -> None:
    """Coarse spans read `meter_windows_coarse`, the minutes around them `meter_windows`, edges raw events."""
    split = split_range(datetime(2024, 1, 30, 23, 50, 10, tzinfo=UTC), datetime(2024, 2, 2, 0, 5, tzinfo=UTC))
    plan = coarse_plan(split, "DAY", "Asia/Kathmandu", {"202401": 41, "202402": 57})
    assert plan is not None
    q = meter_query("db", "m", "SUM", split=split, window_size="DAY", tz="Asia/Kathmandu", subjects=["s"],
                    generation=3, coarse=plan, edges="")
    assert q.sql.count("FROM `db`.meter_windows_coarse FINAL") == 1 and q.sql.count("FROM `db`.meter_windows FINAL") == 1
    assert "FROM meterline_edges" in q.sql and q.sql.count("UNION ALL") == 2
    bounds = sorted(v for v in q.parameters.values() if isinstance(v, str) and v.startswith("2024-"))
    # Quarters 00:00 31 Jan..00:00 2 Feb; minutes 23:51..00:00 of 30 Jan and 00:00..00:05 of 2 Feb.
    assert bounds == ["2024-01-30 23:51:00", "2024-01-31 00:00:00", "2024-01-31 00:00:00", "2024-02-01 00:00:00",
                      "2024-02-01 00:00:00", "2024-02-02 00:00:00", "2024-02-02 00:00:00", "2024-02-02 00:05:00"]
    assert "from" not in q.parameters and "to" not in q.parameters
    # The coarse read checks each month's mark itself: the map named for joinGet, the plan's fingerprints.
    coarse = next(part for part in q.sql.split("UNION ALL") if "meter_windows_coarse" in part)
    assert coarse.count("joinGet(") == 2 and "meter_windows_coarse_valid" not in q.sql
    assert {"db.meter_windows_coarse_valid", 41, 57, "202401", "202402",
            f"{STALE_COARSE}: 202401", f"{STALE_COARSE}: 202402"} <= {v for v in q.parameters.values() if not isinstance(v, list)}


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


def test_merged_edge_deltas_roll_up_like_the_unmerged_ones() -> None:
    """merge_deltas is a pure pre-aggregation: per (subject, minute, group) the merged row must give what
    the rollup of the original rows gives (count/sum add, min/max, uniques, LATEST by (time, rank))."""
    import random
    from datetime import timedelta

    from query.edges import merge_deltas

    rng = random.Random(9)
    t0 = datetime(2024, 3, 10, tzinfo=UTC)
    deltas = []
    for offset in range(300):
        value = None if rng.random() < 0.2 else Decimal(rng.randrange(-500, 500)) / 100
        subject, group = rng.choice(["a", "b"]), rng.choice(["{}", '{"m":"x"}'])
        deltas.append(["m", subject, t0 + timedelta(minutes=rng.randrange(2)), group, {}, "e", 0, offset,
                       1, value or Decimal(0), value, value, [f"u{rng.randrange(5)}"],
                       t0 + timedelta(seconds=rng.randrange(30)), value, offset])

    def rollup(rows: list[list[object]]) -> dict[tuple[object, ...], tuple[object, ...]]:
        out = {}
        for key in {(r[1], r[2], r[3]) for r in rows}:
            mine = [r for r in rows if (r[1], r[2], r[3]) == key]
            valued = [r for r in mine if r[14] is not None]
            mins = [r[10] for r in mine if r[10] is not None]
            maxs = [r[11] for r in mine if r[11] is not None]
            out[key] = (sum(r[8] for r in mine), sum(r[9] for r in mine), min(mins, default=None),
                        max(maxs, default=None), set().union(*(r[12] for r in mine)),
                        max(valued, key=lambda r: (r[13], r[15]))[14] if valued else None)
        return out

    merged = merge_deltas(deltas)
    assert len(merged) == len({(r[1], r[2], r[3]) for r in deltas}) < len(deltas)
    assert rollup(merged) == rollup(deltas)
