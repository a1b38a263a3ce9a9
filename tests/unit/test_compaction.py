"""The pure rules of windows compaction, each against an independent oracle."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from meterline.core.compaction import (
    ABORTED,
    DONE,
    RUNNING,
    SWAPPING,
    Claim,
    cutoff,
    in_progress,
    may_be_claimed,
    merge_statements,
    merged_watermarks,
    partition_end,
    partition_id,
    replayed,
    watermark_query,
)
from meterline.core.schema import WINDOW_COLUMNS

H, MARGIN = timedelta(days=2), timedelta(hours=1)


@pytest.mark.parametrize(("when", "pid", "end"), [
    (datetime(2024, 1, 31, 23, 59), "202401", datetime(2024, 2, 1, tzinfo=UTC)),
    (datetime(2024, 12, 1, 0, 0), "202412", datetime(2025, 1, 1, tzinfo=UTC)),
    (datetime(2023, 2, 28, 12, 0), "202302", datetime(2023, 3, 1, tzinfo=UTC)),
])
def test_partition_and_its_end(when: datetime, pid: str, end: datetime) -> None:
    assert partition_id(when) == pid
    assert partition_end(pid) == end
    assert when.replace(tzinfo=UTC) < partition_end(pid)


def test_cutoff_is_the_oldest_progress_minus_horizon_and_margin() -> None:
    now = datetime(2024, 5, 10, tzinfo=UTC)
    progress = [now - timedelta(hours=3), now - timedelta(minutes=1)]
    assert cutoff(now, progress, H, MARGIN) == now - timedelta(hours=3) - H - MARGIN
    assert cutoff(now, [now + timedelta(days=1)], H, MARGIN) == now - H - MARGIN  # a clock ahead: now wins
    assert cutoff(now, [progress[0], None], H, MARGIN) is None  # a partition without progress closes nothing
    assert cutoff(now, [], H, MARGIN) is None


def test_a_writer_checks_every_month_a_compactor_may_claim() -> None:
    """Whatever a compactor may claim on its clock, a writer whose clock is off by up to half the margin
    checks: no month is compacted behind a writer that did not look."""
    rng = random.Random(7)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    for _ in range(5000):
        now = base + timedelta(minutes=rng.randrange(600 * 24 * 60))
        pid = partition_id(now - timedelta(days=rng.randrange(0, 90)))
        complete = now - timedelta(minutes=rng.randrange(0, 600))
        closed = cutoff(now, [complete], H, MARGIN)
        assert closed is not None
        skew = timedelta(seconds=rng.uniform(-1, 1) * MARGIN.total_seconds() / 2)
        if partition_end(pid) <= closed:
            assert may_be_claimed(pid, now + skew, H, MARGIN)


def test_watermarks_drop_exactly_the_replays() -> None:
    """Oracle: per Kafka partition, messages are written in offset order (a crash replays a suffix);
    some have rows in the month, some not. Compactions read snapshots. A row the sink sees again is a
    replay iff its message was written before the newest snapshot -- the watermark decides it from
    offsets alone, without knowing which messages were written."""
    rng = random.Random(11)
    keys = [("e1", 0), ("e1", 1), ("e2", 0)]
    for _ in range(300):
        in_month = {k: [rng.random() < 0.5 for _ in range(40)] for k in keys}
        written = dict.fromkeys(keys, 0)  # per key: messages below this offset are written
        claims, snapshot = [], dict.fromkeys(keys, 0)
        for compaction in range(rng.randrange(1, 4)):
            for k in keys:
                written[k] = min(40, written[k] + rng.randrange(0, 15))
            marks = {k: max(o for o in range(written[k]) if in_month[k][o])
                     for k in keys if any(in_month[k][:written[k]])}
            claims.append(Claim("202401", str(compaction), rng.choice([SWAPPING, DONE]), 0.0, marks))
            snapshot = dict(written)
        claims.append(Claim("202401", "x", ABORTED, 0.0, {k: 10**9 for k in keys}))  # aborted: no watermark
        merged = merged_watermarks(claims)
        for k in keys:
            for offset in range(40):
                if in_month[k][offset]:  # only messages with rows in the month ever write rows into it
                    assert replayed(*k, offset, merged) == (offset < snapshot[k]), (k, offset)
        assert not replayed("e3", 0, 0, merged)
        assert not replayed("compacted:default", 0, 0, merged)


def test_in_progress_ignores_finished_and_dead_compactions() -> None:
    claims = [Claim("202401", "a", RUNNING, 5.0), Claim("202401", "b", RUNNING, 120.0),
              Claim("202402", "c", SWAPPING, 1.0), Claim("202403", "d", DONE, 0.0), Claim("202404", "e", ABORTED, 0.0)]
    assert [c.compaction_id for c in in_progress(claims, 60)] == ["a", "c"]


def test_merge_sql_merges_only_foldable_rows_that_fit_and_copies_the_rest() -> None:
    (merged, params), (kept, same) = merge_statements("`db`.meter_windows", "`db`.stage", WINDOW_COLUMNS, "202401",
                                                      {("default", "b"): 3, ("default", "a"): 1, ("t2", "a"): 2})
    assert params is same
    assert params["partition"] == "202401"
    assert params["active"] == [("default", "a", 1), ("default", "b", 3), ("t2", "a", 2)]
    assert "FROM `db`.meter_windows FINAL" in merged and "FROM `db`.meter_windows FINAL" in kept
    assert "GROUP BY meter, subject, window_start, group_key, generation, namespace" in merged
    assert "HAVING abs(sum(toDecimal256(sum, 9)))" in merged
    assert "concat('compacted:', namespace)" in merged
    assert "NOT startsWith(log_epoch, 'replay:')" in merged
    assert "(namespace, meter, generation) IN {active:Array(Tuple(String, String, UInt64))}" in merged
    assert "WHERE _partition_id = {partition:String} AND (NOT (" in kept and "HAVING NOT (" in kept
    assert merged.count("\nSELECT ") == 1 and len(merged.split("SELECT ")[1].split("\nFROM")[0].split(", ")) >= 18
    sql, args = watermark_query("`db`.meter_windows", "202402")
    assert args == {"partition": "202402"} and "max(kafka_offset)" in sql and "'compacted:'" in sql
