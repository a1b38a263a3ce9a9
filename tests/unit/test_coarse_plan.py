"""Which minutes of a query come from 15-minute rows (`query.time_ranges.coarse_plan`), against oracles:
every whole minute is read exactly once, coarse spans are whole quarters of months that have coarse rows,
and a quarter is used only where it lies in one local bucket minute by minute (zoneinfo)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.compaction import DONE, RUNNING, SWAPPING, Claim, coarse_fingerprints
from query.time_ranges import CoarsePlan, coarse_plan, month_bounds, quarters_fit, split_range

MINUTE = timedelta(minutes=1)
ZONES = ("UTC", "Asia/Kathmandu", "Australia/Eucla", "America/St_Johns", "America/New_York", "Europe/London",
         "Asia/Kolkata", "Africa/Monrovia")


def _minutes(a: datetime, b: datetime) -> list[datetime]:
    out, t = [], a
    while t < b:
        out.append(t)
        t += MINUTE
    return out


def _local_hour(t: datetime, tz: ZoneInfo) -> tuple[int, ...]:
    local = t.astimezone(tz)
    return (local.year, local.month, local.day, local.hour, int(local.utcoffset().total_seconds()))  # type: ignore[union-attr]


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("partition", ["202403", "202410", "202411", "197201", "197112"])
def test_quarters_fit_means_each_quarter_is_in_one_local_hour(zone: str, partition: str) -> None:
    """Oracle: minute by minute, each UTC quarter's 15 minutes share one local hour (and offset). A zone
    whose offset is not a multiple of 15 minutes is refused even where its hour boundaries happen to fall in
    a quarter's last minute (Monrovia's -00:44:30 puts them at :44:30 UTC): never a false yes."""
    tz = ZoneInfo(zone)
    start, end = month_bounds(partition)
    hours = [_local_hour(t, tz) for t in _minutes(start, end)]
    fits = all(len(set(hours[i:i + 15])) == 1 for i in range(0, len(hours), 15))
    odd = any(h[-1] % 900 for h in hours)
    assert quarters_fit(zone, partition) == (fits and not odd)


def test_quarters_fit_known_zones() -> None:
    for zone in ("Asia/Kathmandu", "Australia/Eucla", "America/St_Johns", "America/New_York"):
        assert quarters_fit(zone, "202403")  # DST changes in March 2024 fall on quarter hours
    assert not quarters_fit("Africa/Monrovia", "197112")  # -00:44:30 until 1972


def _check(plan: CoarsePlan | None, start: datetime | None, end: datetime | None, size: str | None, zone: str,
           fingerprints: dict[str, int]) -> None:
    split = split_range(start, end)
    assert split.whole_start is not None and split.whole_end is not None
    whole = _minutes(split.whole_start, split.whole_end)
    if plan is None:
        return
    seen: dict[datetime, str] = {}
    for partition, fp, a, b in plan.coarse:
        assert fingerprints[partition] == fp
        month_start, month_end = month_bounds(partition)
        assert month_start <= a < b <= month_end and a.minute % 15 == 0 == b.minute % 15
        assert quarters_fit(zone, partition) or size is None
        for t in _minutes(a, b):
            assert t not in seen
            seen[t] = "coarse"
    for a, b in plan.minutes:
        assert a is not None and b is not None
        for t in _minutes(a, b):
            assert t not in seen
            seen[t] = "minute"
    assert sorted(seen) == whole  # every whole minute read once, nothing outside
    # Every quarter that could come from coarse rows does.
    for t in whole:
        q = t.replace(minute=t.minute - t.minute % 15)
        p = f"{q.year:04d}{q.month:02d}"
        whole_quarter = q >= split.whole_start and q + timedelta(minutes=15) <= split.whole_end
        if p in fingerprints and whole_quarter and (size is None or quarters_fit(zone, p)):
            assert seen[t] == "coarse", t


instants = st.datetimes(min_value=datetime(2024, 1, 20), max_value=datetime(2024, 4, 5)).map(
    lambda d: d.replace(tzinfo=UTC))


@settings(max_examples=60, deadline=None)
@given(instants, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=20)),
       st.sampled_from(["HOUR", "DAY", "MONTH", None]), st.sampled_from(ZONES[:5]),
       st.sets(st.sampled_from(["202401", "202402", "202403", "202404"])))
def test_plan_reads_every_minute_once(start: datetime, length: timedelta, size: str | None, zone: str,
                                      months: set[str]) -> None:
    fingerprints = {p: 7 for p in months}
    plan = coarse_plan(split_range(start, start + length), size, zone, fingerprints)
    _check(plan, start, start + length, size, zone, fingerprints)


def test_plan_refuses_minutes_open_ranges_and_months_without_coarse_rows() -> None:
    start, end = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)
    split = split_range(start, end)
    assert coarse_plan(split, "MINUTE", "UTC", {"202401": 3}) is None
    assert coarse_plan(split, "HOUR", "UTC", {}) is None
    assert coarse_plan(split, "HOUR", "UTC", {"202405": 3}) is None
    # No window size: the answer reports the first and last minute with data unless from/to are given.
    assert coarse_plan(split_range(None, end), None, "UTC", {"202401": 3}) is None
    assert coarse_plan(split_range(start, None), None, "UTC", {"202401": 3}) is None
    # Only whole quarters: a range inside one quarter reads minutes.
    short = split_range(datetime(2024, 1, 5, 10, 1, tzinfo=UTC), datetime(2024, 1, 5, 10, 29, tzinfo=UTC))
    assert coarse_plan(short, "HOUR", "UTC", {"202401": 3}) is None


def test_plan_with_an_open_end_reads_later_months_as_minutes() -> None:
    plan = coarse_plan(split_range(datetime(2024, 1, 10, 0, 7, 30, tzinfo=UTC), None), "DAY", "Asia/Kathmandu",
                       {"202401": 3, "202402": 4})
    assert plan == CoarsePlan(
        coarse=(("202401", 3, datetime(2024, 1, 10, 0, 15, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)),
                ("202402", 4, datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC))),
        minutes=((datetime(2024, 1, 10, 0, 8, tzinfo=UTC), datetime(2024, 1, 10, 0, 15, tzinfo=UTC)),
                 (datetime(2024, 3, 1, tzinfo=UTC), None)),
    )


def test_zone_with_an_odd_offset_keeps_that_month_in_minutes() -> None:
    start, end = datetime(1971, 12, 20, tzinfo=UTC), datetime(1972, 2, 10, tzinfo=UTC)
    months = {"197112": 1, "197201": 2, "197202": 3}
    plan = coarse_plan(split_range(start, end), "HOUR", "Africa/Monrovia", months)
    # Monrovia kept -00:44:30 until 7 January 1972: only February's quarters fit its hours.
    assert plan is not None and [c[0] for c in plan.coarse] == ["197202"]
    _check(plan, start, end, "HOUR", "Africa/Monrovia", months)
    assert coarse_plan(split_range(start, end), "HOUR", "UTC", months) is not None
    assert [c[0] for c in coarse_plan(split_range(start, end), None, "Africa/Monrovia", months).coarse] == [  # type: ignore[union-attr]
        "197112", "197201", "197202"]  # one bucket over [from, to): any zone


def _claim(partition: str, cid: str, state: str, age: float, fingerprint: int = 0) -> Claim:
    return Claim(partition, cid, state, age, {}, fingerprint)


def test_coarse_fingerprints_come_from_the_newest_done_compaction() -> None:
    claims = [
        _claim("202401", "a", DONE, 50.0, 11),
        _claim("202401", "b", DONE, 10.0, 19),      # newest done of 202401
        _claim("202401", "c", SWAPPING, 1.0),       # in progress: its swap changes the partition's fingerprint
        _claim("202402", "d", DONE, 5.0, 0),        # done before coarse rows existed: none
        _claim("202402", "e", DONE, 60.0, 8),
        _claim("202403", "f", RUNNING, 1.0),
    ]
    assert coarse_fingerprints(claims) == {"202401": 19}
