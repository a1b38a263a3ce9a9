"""meterline.core.accumulator: minute windows, exact per-message accumulation."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.accumulator import WindowAccumulator
from meterline.core.meters import Meter, MeterSet

# ----------------------------------------------------------------------------- accumulator

METERS = [
    Meter.model_validate(
        {
            "slug": "sum",
            "eventType": "t",
            "aggregation": "SUM",
            "valueProperty": "$.v",
            "groupBy": {"g": "$.g"},
        }
    ),
    Meter.model_validate({"slug": "cnt", "eventType": "t", "aggregation": "COUNT", "groupBy": {"g": "$.g"}}),
    Meter.model_validate(
        {"slug": "uniq", "eventType": "t", "aggregation": "UNIQUE_COUNT", "valueProperty": "$.u"}
    ),
    Meter.model_validate({"slug": "last", "eventType": "t", "aggregation": "LATEST", "valueProperty": "$.v"}),
]
METER_SET = MeterSet(METERS)
BASE = datetime(2024, 1, 1, tzinfo=UTC)
WIDE = Context(prec=200)  # the default 28-digit context would round the oracle itself

values = st.one_of(
    st.integers(-(10**28), 10**28),
    st.decimals(min_value=-(10**20), max_value=10**20, places=9, allow_nan=False, allow_infinity=False).map(
        str
    ),
)
events = st.lists(
    st.fixed_dictionaries(
        {
            "subject": st.sampled_from(["s1", "s2"]),
            "offset_us": st.integers(0, 180_000_000),  # three minutes
            "data": st.fixed_dictionaries(
                {"v": values, "u": st.sampled_from(["a", "b", 1, 1.0, "1"])},
                optional={"g": st.sampled_from(["x", "y", 7, None])},
            ),
        }
    ),
    max_size=60,
)


@given(events)
@settings(max_examples=200)
def test_accumulator_matches_oracle(evs: list[dict[str, Any]]) -> None:
    acc = WindowAccumulator(60)
    flat: list[tuple[str, str, datetime, int, Any]] = []  # (subject, meter, time, rank, measurement)
    for rank, ev in enumerate(evs):
        t = BASE + timedelta(microseconds=ev["offset_us"])
        ms, rej = METER_SET.measure({"type": "t", "data": ev["data"]})
        assert rej == []
        for m in ms:
            acc.add(ev["subject"], t, m, rank)
            flat.append((ev["subject"], m.meter.slug, t, rank, (m.group_key, m.group, ev["data"])))

    # Oracle: plain dict grouping with window arithmetic done in integer seconds and sums
    # done in integer nano-units, independent of the implementation's Decimal context.
    groups: dict[tuple[str, str, datetime, str], list[tuple[datetime, int, Any]]] = defaultdict(list)
    for subject, slug, t, rank, (gk, _group, data) in flat:
        secs = int((t - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
        ws = datetime.fromtimestamp(secs - secs % 60, tz=UTC)
        groups[(slug, subject, ws, gk)].append((t, rank, data))

    deltas = {(d.meter, d.subject, d.window_start, d.group_key): d for d in acc.deltas()}
    assert set(deltas) == set(groups)
    assert len(acc.deltas()) == len(deltas)
    for key, items in groups.items():
        d = deltas[key]
        slug = key[0]
        assert d.count == len(items)
        latest = max(items, key=lambda i: (i[0], i[1]))
        assert (d.latest_time, d.latest_rank) == (latest[0], latest[1])
        if slug in ("sum", "last"):
            nums = [Decimal(str(i[2]["v"])) for i in items]
            nanos = sum(int(n.scaleb(9, WIDE)) for n in nums)
            assert d.sum == Decimal(nanos).scaleb(-9, WIDE)
            assert d.min == min(nums) and d.max == max(nums)
            assert d.latest_value == Decimal(str(latest[2]["v"]))
            assert d.uniques == set()
        elif slug == "uniq":
            canon = {"a": "a", "b": "b", "1": "1"}
            assert d.uniques == {canon[str(i[2]["u"]).removesuffix(".0")] for i in items}
            assert d.latest_value is None
        else:
            assert d.sum == 0 and d.min is None and d.max is None and d.latest_value is None


def test_accumulator_latest_tie_break_and_exact_sum() -> None:
    acc = WindowAccumulator()
    m = METERS[3]
    t = BASE + timedelta(seconds=5)
    ms1, _ = MeterSet([m]).measure({"type": "t", "data": {"v": "99999999999999999999999999.999999999"}})
    ms2, _ = MeterSet([m]).measure({"type": "t", "data": {"v": "0.000000001"}})
    acc.add("s", t, ms1[0], rank=200)
    acc.add("s", t, ms2[0], rank=100)  # same time, lower rank: not the latest
    (d,) = acc.deltas()
    assert d.latest_value == Decimal("99999999999999999999999999.999999999")
    assert d.sum == Decimal("100000000000000000000000000.000000000")  # 27 integer digits, exact
    assert d.count == 2 and d.window_start == BASE


def test_accumulator_rejects_naive_time() -> None:
    ms, _ = METER_SET.measure({"type": "t", "data": {"v": 1, "u": "a"}})
    with pytest.raises(ValueError):
        WindowAccumulator().add("s", datetime(2024, 1, 1), ms[0], 0)
