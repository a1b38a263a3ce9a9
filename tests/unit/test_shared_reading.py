"""The processor's shared reading (`EventReader` + `MessageWindows`) gives exactly the rows of the
straightforward per-meter computation (`MeterSet.measure` + `WindowAccumulator`, one meter at a time).

The reference below is `message_rows` as it was before meters shared their work: every meter
measures every event on its own. Rows are compared with their Python types and Decimal exponents
(`repr`), in order, so an int left unconverted or a sum with another exponent fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.core.accumulator import WindowAccumulator
from meterline.core.meters import MISSING, Meter, MeterSet, Rejection
from meterline.core.reasons import WHOLE_EVENT, ReasonCode, StoredRejection
from meterline.core.rows import MessagePosition, RowOptions, Rows, always_accept, message_rows
from meterline.core.schema import EVENT_COLUMNS
from meterline.core.times import parse_time

NOW = datetime(2024, 5, 1, 13, 0, tzinfo=UTC)
BASE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
POS = MessagePosition("e", 2, 77)

#: Meters that share value paths and groupBys in every combination the reader distinguishes:
#: one path read as a number and as a unique, groupBys of one and two keys, a jsonpath-ng path
#: (several matches), the root path, and two event types.
LIBRARY = [
    {"slug": "sum_v", "eventType": "a", "aggregation": "SUM", "valueProperty": "$.v", "groupBy": {"g": "$.g"}},
    {"slug": "max_v", "eventType": "a", "aggregation": "MAX", "valueProperty": "$.v", "groupBy": {"g": "$.g"}},
    {"slug": "avg_v", "eventType": "a", "aggregation": "AVG", "valueProperty": "$.v"},
    {"slug": "uniq_v", "eventType": "a", "aggregation": "UNIQUE_COUNT", "valueProperty": "$.v", "groupBy": {"g": "$.g"}},
    {"slug": "cnt_g", "eventType": "a", "aggregation": "COUNT", "groupBy": {"g": "$.g"}},
    {"slug": "cnt_gh", "eventType": "a", "aggregation": "COUNT", "groupBy": {"h": "$.h", "g": "$.g"}},
    {"slug": "cnt", "eventType": "a", "aggregation": "COUNT"},
    {"slug": "min_w", "eventType": "a", "aggregation": "MIN", "valueProperty": "$.w", "groupBy": {"g": "$.g", "h": "$.h"}},
    {"slug": "latest_w", "eventType": "a", "aggregation": "LATEST", "valueProperty": "$.w"},
    {"slug": "uniq_u", "eventType": "a", "aggregation": "UNIQUE_COUNT", "valueProperty": "$.u"},
    {"slug": "sum_many", "eventType": "a", "aggregation": "SUM", "valueProperty": "$.l[*]", "groupBy": {"k": "$.l[*]"}},
    {"slug": "sum_root", "eventType": "b", "aggregation": "SUM", "valueProperty": "$", "groupBy": {"r": "$"}},
    {"slug": "cnt_b", "eventType": "b", "aggregation": "COUNT", "groupBy": {"g": "$.g"}},
    # live meters: a rebuilding generation of sum_v beside the active one, and meters with an eventFrom
    {"slug": "sum_v", "eventType": "a", "aggregation": "SUM", "valueProperty": "$.v", "groupBy": {"g": "$.g"},
     "generation": 2},
    {"slug": "sum_v_from", "eventType": "a", "aggregation": "SUM", "valueProperty": "$.v", "groupBy": {"g": "$.g"},
     "eventFrom": "2024-05-01T12:01:00Z"},
    {"slug": "cnt_b_from", "eventType": "b", "aggregation": "COUNT", "eventFrom": "2024-05-01T12:01:00.000001Z"},
]


def meter_set(chosen: Sequence[dict[str, Any]]) -> MeterSet:
    """MeterSet of library entries, with their generations (0 unless given)."""
    meters = [Meter.model_validate({k: v for k, v in m.items() if k != "generation"}) for m in chosen]
    return MeterSet(meters, [m.get("generation", 0) for m in chosen])

scalars = st.one_of(
    st.integers(-(2**63), 2**64 - 1),  # what orjson decodes (ingest refuses larger)
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.1, 1.5, "1", "1.0", "-0", "2.5e3", "x", "", True, False, None, "0.0000000001",
                     "100000000000000000000000000000", "-99999999999999999999999999999.999999999",
                     "99999999999999999999999999999", "60000000000000000000000000000", "-70000000000000000000000000000"]),
    st.decimals(min_value=-(10**20), max_value=10**20, places=9, allow_nan=False).map(str),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.sampled_from("ab"), scalars, max_size=2))
datas = st.one_of(
    st.fixed_dictionaries({}, optional={"v": values, "w": values, "u": values, "g": values, "h": values,
                                        "l": st.lists(scalars, max_size=3)}),
    scalars,
)
events = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["a", "a", "a", "b", "other"]), "subject": st.sampled_from(["s1", "s2"]),
         "offset_us": st.sampled_from([0, 1, 59_999_999, 60_000_000, 61_000_000]) | st.integers(0, 180_000_000)},
        optional={"data": datas},
    ),
    max_size=40,
)


def as_events(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, s in enumerate(specs):
        t = BASE + timedelta(microseconds=s["offset_us"])
        e = {"specversion": "1.0", "id": f"id{i}", "source": "src", "type": s["type"], "subject": s["subject"],
             "time": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        if "data" in s:
            e["data"] = s["data"]
        out.append(e)
    return out


def reference_rows(events: Sequence[Mapping[str, Any]], meters: MeterSet, indexes: Sequence[int], strict: bool,
                   offset: int = POS.offset, window_seconds: int = 60) -> Rows:
    """Windows, dead letters and events' errors, one meter at a time (the pre-sharing algorithm)."""
    from meterline.core.rows import _data_text, _dead  # the same row helpers: only metering differs

    out = Rows()
    acc = WindowAccumulator(window_seconds)
    for index, event in zip(indexes, events, strict=True):
        t = parse_time(event["time"])  # the strict parser: any RFC 3339 shape
        data = _data_text(event)
        errors: list[str] = []
        rejected: list[StoredRejection] = []
        measurements, rejections = meters.measure(event, t)
        for m in measurements:
            if not acc.add(event["subject"], t, m, offset * 100_000 + index):
                rejections.append(Rejection(
                    m.meter.slug, ReasonCode.VALUE_OUT_OF_RANGE,
                    f"{m.value} would take the sum of its window in this message past ±10^29", m.generation))
        if rejections:
            for r in rejections:
                _dead(out, POS, index, r.meter, event, t, data, r.code, r.reason, NOW, r.generation)
                if f"{r.meter}: {r.reason}" not in errors:
                    errors.append(f"{r.meter}: {r.reason}")
                if (r.meter, r.code) not in rejected:
                    rejected.append(StoredRejection(r.meter, r.code))
        elif strict and not measurements:
            reason = f"no meter has eventType {event['type']!r}"
            _dead(out, POS, index, WHOLE_EVENT, event, t, data, ReasonCode.UNKNOWN_TYPE, reason, NOW)
            errors.append(f"*: {reason}")
            rejected.append(StoredRejection(WHOLE_EVENT, ReasonCode.UNKNOWN_TYPE))
        out.events.append([errors, rejected])
    for d in acc.deltas():
        out.windows.append([
            d.meter, d.subject, d.window_start, d.group_key, d.group, POS.log_epoch, POS.partition, POS.offset,
            d.count, d.sum, d.min, d.max, sorted(d.uniques), d.latest_time or d.window_start, d.latest_value,
            d.latest_rank, d.generation, "default",  # the message's namespace: none given, `default`
        ])
    return out


def typed(rows: list[list[Any]]) -> list[list[tuple[str, str]]]:
    """Each cell as (type, repr): Decimal('5') and Decimal('5.000000000') or 5 differ here."""
    return [[(type(c).__name__, repr(c)) for c in row] for row in rows]


@given(
    specs=events,
    chosen=st.lists(st.sampled_from(range(len(LIBRARY))), min_size=1, max_size=len(LIBRARY), unique=True),
    strict=st.booleans(),
    subset=st.booleans(),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_shared_reading_matches_per_meter_reference(specs: list[dict[str, Any]], chosen: list[int], strict: bool,
                                                    subset: bool) -> None:
    meters = meter_set([LIBRARY[i] for i in chosen])
    evs = as_events(specs)
    indexes = list(range(len(evs)))
    if subset:  # recompute's shape: a subset of a message with its original indexes
        indexes = [i for i in indexes if i % 3 != 1]
        evs = [evs[i] for i in indexes]
    got = message_rows(evs, POS, meters, RowOptions(strict_event_types=strict), always_accept, now=NOW,
                       indexes=indexes)
    want = reference_rows(evs, meters, indexes, strict)
    assert typed(got.windows) == typed(want.windows)
    assert typed(got.dead_letters) == typed(want.dead_letters)
    assert got.dead_by_reason == want.dead_by_reason
    errors, rejections = EVENT_COLUMNS.index("validation_errors"), EVENT_COLUMNS.index("rejections")
    assert [row[errors] for row in got.events] == [row[0] for row in want.events]
    assert [typed(row[rejections]) for row in got.events] == [typed(row[1]) for row in want.events]


def test_many_meters_on_one_event_match_the_reference_and_an_independent_sum() -> None:
    """Twenty meters on shared paths: the rows equal the reference, and sums equal plain Decimal sums."""
    lib = [m for m in LIBRARY if m["eventType"] == "a"]
    meters = meter_set(lib)
    evs = as_events([{"type": "a", "subject": "s1", "offset_us": i * 1000,
                      "data": {"v": i * 7 % 13, "w": f"{i}.5", "u": f"user-{i % 4}", "g": "x" if i % 2 else "y",
                               "h": "z"}} for i in range(100)])
    got = message_rows(evs, POS, meters, RowOptions(), always_accept, now=NOW)
    want = reference_rows(evs, meters, list(range(100)), strict=False)
    assert typed(got.windows) == typed(want.windows)
    sums = {(r[0], r[3]): r[9] for r in got.windows if r[-2] == 0}  # generation, before the namespace
    for g in ("x", "y"):
        expected = sum(Decimal(e["data"]["v"]) for e in evs if e["data"]["g"] == g)
        assert sums[("sum_v", f'{{"g":"{g}"}}')] == expected
    assert MISSING is not None  # the reader's "no data" sentinel is the measuring one


def test_memos_that_start_again_when_full_still_match_the_reference(monkeypatch: Any) -> None:
    """The group-key memos are bounded: once full they are cleared, and keys stay exact."""
    from meterline.core.meters import reading

    monkeypatch.setattr(reading, "_GROUP_MEMO_LIMIT", 3)
    lib = [m for m in LIBRARY if m["eventType"] == "a"]
    meters = meter_set(lib)
    evs = as_events([{"type": "a", "subject": f"s{i % 2}", "offset_us": i * 1_000_000,
                      "data": {"v": i, "g": f"g{i % 7}", "h": f"h{i % 5}", "u": str(i % 3), "w": i % 4}}
                     for i in range(120)])
    for offset in range(3):  # memos carry over between messages of one MeterSet
        got = message_rows(evs, POS._replace(offset=offset), meters, RowOptions(), always_accept, now=NOW)
        want = reference_rows(evs, meters, list(range(120)), strict=False, offset=offset)
        for row in want.windows:
            row[7] = offset
        assert typed(got.windows) == typed(want.windows)


def test_measurements_that_would_overflow_their_row_are_dead_lettered_like_the_reference() -> None:
    """Running sums past ±10^29 in one message: the same measurements are left out and dead-lettered
    (after the event's other refusals), for every meter sharing the row."""
    meters = meter_set([m for m in LIBRARY if m["slug"] in ("sum_v", "max_v", "avg_v", "uniq_u")])
    big = "60000000000000000000000000000"
    data = [{"v": big, "g": "x"}, {"v": big, "g": "x", "u": "a"}, {"v": "-" + big, "g": "x"}, {"v": big, "g": "y"},
            {"v": big, "g": "x"}, {"v": big, "g": "x"}]
    evs = as_events([{"type": "a", "subject": "s1", "offset_us": i, "data": d} for i, d in enumerate(data)])
    got = message_rows(evs, POS, meters, RowOptions(), always_accept, now=NOW)
    want = reference_rows(evs, meters, list(range(len(evs))), strict=False)
    assert typed(got.windows) == typed(want.windows)
    assert typed(got.dead_letters) == typed(want.dead_letters)
    assert got.dead_by_reason == want.dead_by_reason
    overflowed = [(d[3], d[4]) for d in got.dead_letters if d[11] == "value_out_of_range"]
    # by hand: in group x the running sum 6e28 -> 1.2e29 would overflow (event 1), then -> 0 after event 2,
    # 6e28 at event 4, and event 5 would overflow again; avg_v (no groupBy) sums x and y together
    assert {(i, m) for i, m in overflowed if m in ("sum_v", "max_v")} == {(i, m) for i in (1, 5) for m in ("sum_v", "max_v")}
    errors = EVENT_COLUMNS.index("validation_errors")
    assert all(any("past ±10^29" in e for e in got.events[i][errors]) for i, _ in overflowed)


#: Times as a foreign producer may write them (the worker's fast paths only know ingest's shape): with an
#: offset, without a fraction, with nanoseconds.
SHAPES = ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%f789Z", "offset")


def shaped(t: datetime, shape: str) -> str:
    if shape == "offset":
        return (t + timedelta(hours=1, minutes=30)).strftime("%Y-%m-%dT%H:%M:%S.%f+01:30")
    return t.strftime(shape)


@given(
    specs=events,
    chosen=st.lists(st.sampled_from(range(len(LIBRARY))), min_size=1, max_size=len(LIBRARY), unique=True),
    window_seconds=st.sampled_from([1, 7, 60, 90, 3600]),
    shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=40),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_window_size_and_time_shape_match_the_reference(specs: list[dict[str, Any]], chosen: list[int],
                                                             window_seconds: int, shapes: list[str]) -> None:
    """Window starts are reused while events stay in one window and a message of one subject and window is
    one cell: neither may hold for other window sizes, unordered times or times not in ingest's shape."""
    meters = meter_set([LIBRARY[i] for i in chosen])
    evs = as_events(specs)
    for i, e in enumerate(evs):
        e["time"] = shaped(parse_time(e["time"]), shapes[i % len(shapes)])
    got = message_rows(evs, POS, meters, RowOptions(window_seconds=window_seconds), always_accept, now=NOW)
    want = reference_rows(evs, meters, list(range(len(evs))), False, window_seconds=window_seconds)
    assert typed(got.windows) == typed(want.windows)
    assert typed(got.dead_letters) == typed(want.dead_letters)


#: Group values whose hashes are equal though their keys differ (1, True, 1.0 and "1"), beside strings.
group_values = st.one_of(st.sampled_from(["x", "y", "1", "", 1, True, 1.0, None, 0, False]), values)
column_datas = st.one_of(
    st.fixed_dictionaries({}, optional={"v": values, "w": values, "u": values, "g": group_values,
                                        "h": group_values, "l": st.lists(scalars, max_size=3)}),
    st.fixed_dictionaries({"v": st.integers(-(10**30), 10**30), "g": st.sampled_from(["x", "y", "z"]),
                           "h": st.sampled_from(["p", "q"]), "u": st.sampled_from(["a", "b"]), "w": st.integers()}),
    scalars,
    st.just(MISSING),
)


@given(
    datas=st.lists(column_datas, min_size=1, max_size=30),
    chosen=st.lists(st.sampled_from(range(len(LIBRARY))), min_size=1, max_size=len(LIBRARY), unique=True),
    repeat=st.booleans(),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_reading_a_column_of_events_is_reading_each_event(datas: list[Any], chosen: list[int], repeat: bool) -> None:
    """`EventReader.read_columns` (what the worker runs) gives per event exactly `EventReader.read`'s
    readings and keys, which the test above ties to the per-meter reference; memos warmed by a first
    message (``repeat``) must not make a value of another type (True for 1, 1.0 for "1") reuse a key."""
    meters = meter_set([LIBRARY[i] for i in chosen])
    for reader in meters.readers_of("default").values():
        if repeat:
            reader.read_columns(datas[::-1])
        values, keys = reader.read_columns(datas)
        want = [reader.read(d) for d in datas]
        for j, (want_values, want_keys) in enumerate(want):
            assert typed([[col[j] for col in values]]) == typed([list(want_values)])
            assert [want_keys[gi] if col is None else col[j] for gi, col in enumerate(keys)] == list(want_keys)
            assert all(want_keys[gi] == "{}" for gi, col in enumerate(keys) if col is None)


def test_messages_gathered_in_one_rows_keep_each_message_s_dead_letters_in_place() -> None:
    """Refusals and overflows are found after a message's loop and put back where their event was metered;
    with several messages in one `Rows` (a worker's batch) each lands among its own message's letters."""
    meters = meter_set([m for m in LIBRARY if m["slug"] in ("sum_v", "max_v", "uniq_u")])
    big = "60000000000000000000000000000"
    data = [{"v": big, "g": "x"}, {"v": "no", "g": "x"}, {"v": big, "g": "x"}, {"g": "x", "u": "a"}, {"v": 1}]
    evs = as_events([{"type": "a", "subject": "s1", "offset_us": i, "data": d} for i, d in enumerate(data)])
    evs.insert(2, {"id": "broken"})  # an invalid event between them: its letter is written in the loop
    gathered = Rows()
    apart = []
    for offset in (1, 2):
        message_rows(evs, POS._replace(offset=offset), meters, RowOptions(), always_accept, now=NOW, rows=gathered)
        apart.append(message_rows(evs, POS._replace(offset=offset), meters, RowOptions(), always_accept, now=NOW))
    assert typed(gathered.dead_letters) == typed(apart[0].dead_letters + apart[1].dead_letters)
    assert typed(gathered.events) == typed(apart[0].events + apart[1].events)
    # by hand (sum_v twice: its active and building generation): each event's letters after the last event's
    assert [d[3] for d in apart[0].dead_letters] == [0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4, 5]
    assert [d[11] for d in apart[0].dead_letters if d[3] == 3] == ["value_missing"] + ["value_out_of_range"] * 3


@pytest.mark.parametrize(("changes", "reason"), [
    ({"id": "", "source": 7}, "id must be a non-empty string"),
    ({"source": 7, "subject": ""}, "source must be a non-empty string"),
    ({"subject": b"s"}, "subject must be a non-empty string"),
    ({"type": "", "time": "2106-01-01T00:00:00.000000Z"}, "type must be a non-empty string"),
    ({"time": "2106-01-01T00:00:00.000000Z"}, "time must be between"),
    ({"time": "1969-12-31T23:59:59.999999Z"}, "time must be between"),
])
def test_an_unstorable_event_s_reason_names_the_first_rule_it_breaks(changes: dict[str, Any], reason: str) -> None:
    """The row builder checks the common event in one expression and asks `storage_problem` only when it
    fails, so the reason is still the first broken rule in `storage_problem`'s order."""
    [event] = as_events([{"type": "a", "subject": "s1", "offset_us": 0, "data": {"v": 1}}])
    rows = message_rows([{**event, **changes}], POS, meter_set(LIBRARY[:1]), RowOptions(), always_accept, now=NOW)
    [dead] = rows.dead_letters
    assert dead[12].startswith(f"invalid event: {reason}") and not rows.events
