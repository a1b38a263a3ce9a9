"""The processor's pure row builder: shapes follow meterline.core.schema, and rows are deterministic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from meterline.core.meters import Meter, MeterSet
from meterline.core.positions import dedupe_key
from meterline.core.reasons import WHOLE_EVENT, ReasonCode, unmetered, was_too_late
from meterline.core.rows import (
    MessagePosition,
    RowOptions,
    Rows,
    always_accept,
    message_rows,
    stored_messages,
    undecodable_rows,
)
from meterline.core.schema import DEAD_LETTER_COLUMNS, EVENT_COLUMNS, STORED_EVENT_COLUMNS, WINDOW_COLUMNS
from tests.oracle import first_sighting_decider

NOW = datetime(2024, 5, 1, 13, 0, tzinfo=UTC)
POS = MessagePosition("cluster-1", 3, 42)
METERS = MeterSet([
    Meter(slug="tokens", eventType="prompt", aggregation="SUM", valueProperty="$.tokens", groupBy={"model": "$.model"}),
    Meter(slug="calls", eventType="prompt", aggregation="COUNT"),
])


def ev(i: int, tokens: Any = 5, *, t: str = "2024-05-01T12:00:30.000000Z", etype: str = "prompt", **data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "src", "type": etype, "subject": "cust",
            "time": t, "data": {"tokens": tokens, "model": "a", **data}}


def col(row: list[Any], columns: tuple[str, ...], name: str) -> Any:
    return row[columns.index(name)]


def test_shapes_follow_schema_columns() -> None:
    rows = message_rows([ev(1), ev(2, tokens="x")], POS, METERS, RowOptions(), always_accept, now=NOW)
    assert all(len(r) == len(EVENT_COLUMNS) for r in rows.events)
    assert all(len(r) == len(DEAD_LETTER_COLUMNS) for r in rows.dead_letters)
    assert all(len(r) == len(WINDOW_COLUMNS) for r in rows.windows)
    first = rows.events[0]
    assert col(first, EVENT_COLUMNS, "dedupe_key") == dedupe_key("src", "e1")
    assert col(first, EVENT_COLUMNS, "time") == datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
    assert col(first, EVENT_COLUMNS, "kafka_offset") == 42 and col(first, EVENT_COLUMNS, "batch_index") == 0
    assert col(first, EVENT_COLUMNS, "data") == '{"tokens":5,"model":"a"}'


def test_one_window_row_per_meter_group_and_minute_with_message_position() -> None:
    events = [ev(1, 2), ev(2, 3), ev(3, 4, t="2024-05-01T12:01:00.000000Z")]
    rows = message_rows(events, POS, METERS, RowOptions(), always_accept, now=NOW)
    by_key = {(r[0], r[2].minute): r for r in rows.windows}
    tokens0 = by_key[("tokens", 0)]
    assert col(tokens0, WINDOW_COLUMNS, "sum") == Decimal(5) and col(tokens0, WINDOW_COLUMNS, "count") == 2
    assert col(tokens0, WINDOW_COLUMNS, "group") == {"model": "a"}
    assert col(tokens0, WINDOW_COLUMNS, "kafka_partition") == 3 and col(tokens0, WINDOW_COLUMNS, "kafka_offset") == 42
    assert col(by_key[("calls", 1)], WINDOW_COLUMNS, "count") == 1
    # LATEST tie-break rank = offset * 100000 + index
    assert col(by_key[("tokens", 1)], WINDOW_COLUMNS, "latest_rank") == 42 * 100_000 + 2


def test_duplicates_produce_no_rows() -> None:
    rows = message_rows([ev(1), ev(1), ev(2)], POS, METERS, RowOptions(), first_sighting_decider(), now=NOW)
    assert [col(r, EVENT_COLUMNS, "batch_index") for r in rows.events] == [0, 2]
    assert rows.duplicates == 1 and rows.accepted == 2
    assert sum(r[WINDOW_COLUMNS.index("count")] for r in rows.windows if r[0] == "calls") == 2


def test_rejection_is_dead_lettered_and_recorded_on_the_event() -> None:
    rows = message_rows([ev(1, tokens="lots")], POS, METERS, RowOptions(), always_accept, now=NOW)
    [dead] = rows.dead_letters
    assert col(dead, DEAD_LETTER_COLUMNS, "meter") == "tokens"
    assert col(dead, DEAD_LETTER_COLUMNS, "reason_code") == "value_not_numeric"
    [errors] = [col(r, EVENT_COLUMNS, "validation_errors") for r in rows.events]
    assert errors and errors[0].startswith("tokens: ")
    assert [r[0] for r in rows.windows] == ["calls"]  # COUNT still meters it


def test_too_late_events_are_dead_lettered_not_metered() -> None:
    old = (NOW - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rows = message_rows([ev(1, t=old), ev(2)], POS, METERS, RowOptions(late_horizon=timedelta(days=2)),
                        always_accept, now=NOW)
    assert [col(r, DEAD_LETTER_COLUMNS, "reason_code") for r in rows.dead_letters] == ["too_late"]
    assert rows.late == 1
    assert sum(r[WINDOW_COLUMNS.index("count")] for r in rows.windows if r[0] == "calls") == 1


def test_strict_event_types_dead_letters_unknown_types() -> None:
    events = [ev(1, etype="other")]
    assert not message_rows(events, POS, METERS, RowOptions(), always_accept, now=NOW).dead_letters
    rows = message_rows(events, POS, METERS, RowOptions(strict_event_types=True), always_accept, now=NOW)
    assert [col(r, DEAD_LETTER_COLUMNS, "reason_code") for r in rows.dead_letters] == ["unknown_type"]
    assert len(rows.events) == 1 and not rows.windows


def test_invalid_events_and_payloads_become_dead_letters() -> None:
    rows = message_rows([{"id": "x"}, ev(2)], POS, METERS, RowOptions(), always_accept, now=NOW)
    assert [col(r, DEAD_LETTER_COLUMNS, "reason_code") for r in rows.dead_letters] == ["invalid_event"]
    assert len(rows.events) == 1
    bad = undecodable_rows(POS, b"not json", "not JSON", NOW, message_rows([], POS, METERS, RowOptions(), always_accept))
    assert col(bad.dead_letters[0], DEAD_LETTER_COLUMNS, "data") == "not json"


def test_rows_are_deterministic_for_replays() -> None:
    events = [ev(i, i, t=f"2024-05-01T12:0{i % 3}:00.000000Z") for i in range(20)]
    a = message_rows(events, POS, METERS, RowOptions(), always_accept, now=NOW)
    b = message_rows(events, POS, METERS, RowOptions(), always_accept, now=NOW + timedelta(hours=1))
    assert a.windows == b.windows


def test_a_subset_keeps_its_original_positions_and_ranks() -> None:
    """Recompute and replay rebuild from stored subsets of a message; rows must match the worker's."""
    whole = [ev(0), ev(1, tokens="x"), ev(2, tokens=7), ev(3, tokens=9)]
    worker = message_rows(whole, POS, METERS, RowOptions(), always_accept, now=NOW)
    subset = message_rows([whole[2], whole[3]], POS, METERS, RowOptions(), always_accept, now=NOW, indexes=[2, 3])
    assert [col(r, EVENT_COLUMNS, "batch_index") for r in subset.events] == [2, 3]
    tokens = [r for r in subset.windows if r[0] == "tokens"]
    assert col(tokens[0], WINDOW_COLUMNS, "latest_rank") == 42 * 100_000 + 3
    worker_latest = {col(r, WINDOW_COLUMNS, "latest_rank") for r in worker.windows if r[0] == "tokens"}
    assert worker_latest == {42 * 100_000 + 3}
    with pytest.raises(ValueError):
        message_rows(whole[:1], POS, METERS, RowOptions(), always_accept, now=NOW, keys=[b"k" * 16], indexes=[0])


@pytest.mark.parametrize(("field", "value"), [
    ("time", "9999-12-31T23:59:59Z"), ("time", "1969-12-31T23:59:59Z"), ("source", ""), ("id", 7),
    ("type", None), ("subject", ["x"]),
])
def test_an_event_clickhouse_cannot_store_is_dead_lettered_not_written(field: str, value: Any) -> None:
    """A foreign producer's unstorable event must not reach ClickHouse (its batch would retry for ever)."""
    events = [ev(1), {**ev(2), field: value}, ev(3)]
    rows = message_rows(events, POS, METERS, RowOptions(), always_accept, now=NOW)
    assert [col(r, EVENT_COLUMNS, "id") for r in rows.events] == ["e1", "e3"]
    [dead] = rows.dead_letters
    assert col(dead, DEAD_LETTER_COLUMNS, "reason_code") == "invalid_event"
    assert col(dead, DEAD_LETTER_COLUMNS, "batch_index") == 1
    assert field in col(dead, DEAD_LETTER_COLUMNS, "reason")
    assert col(dead, DEAD_LETTER_COLUMNS, "time") == datetime(1970, 1, 1, tzinfo=UTC)
    assert {r[WINDOW_COLUMNS.index("window_start")].year for r in rows.windows} == {2024}


def test_control_characters_from_the_topic_are_stored_under_distinct_keys() -> None:
    """Ingest refuses them, but the processor keeps what it can store: the key tells the pairs apart."""
    events = [{**ev(1), "source": "a\x00b", "id": "c"}, {**ev(2), "source": "a", "id": "b\x00c"}]
    rows = message_rows(events, POS, METERS, RowOptions(), first_sighting_decider(), now=NOW)
    assert rows.accepted == 2 and not rows.dead_letters


def test_optional_and_extension_attributes_are_kept() -> None:
    """datacontenttype, dataschema and extensions go to `attributes`, so the event list shows them."""
    extra = {"datacontenttype": "application/json", "dataschema": "https://x/s.json", "traceparent": "00-ab"}
    rows = message_rows([{**ev(1), **extra}, ev(2)], POS, METERS, RowOptions(), always_accept, now=NOW)
    assert orjson.loads(col(rows.events[0], EVENT_COLUMNS, "attributes")) == extra
    assert col(rows.events[1], EVENT_COLUMNS, "attributes") == ""


@pytest.mark.parametrize("sign", [1, -1])
def test_a_window_sum_past_decimal128_is_dead_lettered_not_written(sign: int) -> None:
    """ClickHouse cannot store a sum of 10^29 or more in Decimal128(9): the insert would fail on every
    retry and stall the partition. The measurement that would overflow is rejected instead, visibly."""
    big = Decimal(sign * 6 * 10**28)
    events = [ev(1, str(big)), ev(2, str(big)), ev(3, "1"), ev(4, str(big), t="2024-05-01T12:01:00.000000Z")]
    rows = message_rows(events, POS, METERS, RowOptions(), always_accept, now=NOW)
    sums = {r[2].minute: col(r, WINDOW_COLUMNS, "sum") for r in rows.windows if r[0] == "tokens"}
    assert sums == {0: Decimal(sign * 6 * 10**28 + 1), 1: big}  # event 2 would take minute 0 to 1.2e29
    assert all(s.copy_abs() < Decimal(10) ** 29 for s in sums.values())
    [dead] = rows.dead_letters
    assert (col(dead, DEAD_LETTER_COLUMNS, "batch_index"), col(dead, DEAD_LETTER_COLUMNS, "meter"),
            col(dead, DEAD_LETTER_COLUMNS, "reason_code")) == (1, "tokens", "value_out_of_range")
    assert sum(col(r, WINDOW_COLUMNS, "count") for r in rows.windows if r[0] == "calls") == 4  # COUNT unaffected


def _stored(rows: Rows) -> list[list[Any]]:
    """What `SELECT STORED_EVENT_COLUMNS FROM events` returns for these rows (named tuples as dicts)."""
    out = []
    for r in rows.events:
        row = {c: col(r, EVENT_COLUMNS, c) for c in EVENT_COLUMNS}
        row["rejections"] = [{"meter": m, "code": str(c)} for m, c in row["rejections"]]
        out.append([row[c] for c in STORED_EVENT_COLUMNS])
    return out


def test_events_rows_carry_typed_rejections_and_stored_messages_rebuild_the_worker_rows() -> None:
    """Logic reads `rejections` (meter or WHOLE_EVENT, code), never `validation_errors` text; re-metering
    the stored events (recompute, replay, query edges) yields exactly the worker's window rows."""
    strict = MeterSet([*METERS.meters, Meter(slug="other", eventType="other", aggregation="COUNT")])
    events = [ev(0, t="2024-04-01T00:00:00.000000Z"), ev(1, tokens="x"), ev(2, tokens=7), ev(3, etype="nobody"),
              ev(4, tokens=9)]
    options = RowOptions(late_horizon=timedelta(days=3), strict_event_types=True)
    worker = message_rows(events, POS, strict, options, always_accept, now=NOW)
    assert [col(r, EVENT_COLUMNS, "rejections") for r in worker.events] == [
        [(WHOLE_EVENT, ReasonCode.TOO_LATE)], [("tokens", ReasonCode.VALUE_NOT_NUMERIC)], [],
        [(WHOLE_EVENT, ReasonCode.UNKNOWN_TYPE)], [],
    ]
    rebuilt = Rows()
    for pos, stored, indexes in stored_messages(_stored(worker), skip=unmetered):
        assert indexes == [1, 2, 4]
        message_rows(stored, pos, strict, options, always_accept, now=NOW, rows=rebuilt, indexes=indexes)
    assert rebuilt.windows == worker.windows
    kept = [i for _, _, idx in stored_messages(_stored(worker), skip=was_too_late) for i in idx]
    assert kept == [1, 2, 3, 4]


def test_each_namespace_is_metered_by_its_own_meters_only() -> None:
    """Two tenants with a `calls` meter each (different meanings) and one with none: a message is metered
    by its namespace's meters alone, and in strict mode a tenant without a meter for the type dead-letters."""
    tenant_meters = MeterSet([
        Meter(slug="calls", eventType="prompt", aggregation="COUNT"),
        Meter(slug="calls", eventType="prompt", aggregation="SUM", valueProperty="$.tokens"),
        Meter(slug="tokens", eventType="prompt", aggregation="SUM", valueProperty="$.tokens"),
    ], [1, 1, 1], ["acme", "beta", "acme"])
    sent = {ns: [{**ev(i, i + 1), "meterline_namespace": ns} for i in range(n)]
            for ns, n in (("acme", 4), ("beta", 3), ("gamma", 2))}
    # The oracle: what each tenant's own definitions mean over its own events.
    expected = {
        "acme": {"calls": Decimal(len(sent["acme"])), "tokens": Decimal(sum(e["data"]["tokens"] for e in sent["acme"]))},
        "beta": {"calls": Decimal(sum(e["data"]["tokens"] for e in sent["beta"]))},
        "gamma": {},
    }
    for offset, (ns, events) in enumerate(sent.items()):
        rows = message_rows(events, POS._replace(offset=offset), tenant_meters, RowOptions(strict_event_types=True),
                            always_accept, now=NOW)
        assert {col(r, WINDOW_COLUMNS, "namespace") for r in rows.windows} <= {ns}
        got: dict[str, Decimal] = {}
        for r in rows.windows:
            meter, agg = r[0], "count" if (ns, r[0]) == ("acme", "calls") else "sum"
            got[meter] = got.get(meter, Decimal(0)) + Decimal(col(r, WINDOW_COLUMNS, agg))
        assert got == expected[ns]
        unknown = [d for d in rows.dead_letters if col(d, DEAD_LETTER_COLUMNS, "reason_code") == ReasonCode.UNKNOWN_TYPE]
        assert len(unknown) == (len(events) if ns == "gamma" else 0)
    assert tenant_meters.for_type("prompt", "beta")[0].aggregation.value == "SUM"
    assert tenant_meters.for_type("prompt") == ()  # the default namespace has none of these
