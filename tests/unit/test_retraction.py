"""meterline.core.retraction: the window rows that replace a retracted copy's message's rows.

The oracle is the row builder itself run on the message as if the loser had been dropped when it was
first decided -- what a worker that had seen the other copy in time would have written.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from meterline.core.meters import Aggregation, Meter, MeterSet
from meterline.core.retraction import WINDOW_IDENTITY_COLUMNS, replacement_windows
from meterline.core.rows import MessagePosition, RowOptions, message_rows
from meterline.core.schema import STORED_EVENT_COLUMNS, WINDOW_COLUMNS

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
METERS = MeterSet([
    Meter(slug="tokens", event_type="prompt", aggregation=Aggregation.SUM, value_property="$.tokens",
          group_by={"model": "$.model"}),
    Meter(slug="calls", event_type="prompt", aggregation=Aggregation.COUNT),
], [3, 3])
MESSAGE = MessagePosition("c/t", 2, 40)
W = {name: i for i, name in enumerate(WINDOW_COLUMNS)}


def event(i: int, minute: int, model: str) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "app", "type": "prompt", "subject": "acme",
            "time": (T0 + timedelta(minutes=minute, seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "data": {"tokens": 10 * (i + 1), "model": model}}


def stored(events: list[dict[str, Any]], indexes: list[int]) -> list[list[Any]]:
    """`events` rows as a retraction reads them (STORED_EVENT_COLUMNS)."""
    rows = []
    for i, e in zip(indexes, events, strict=True):
        t = datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        rows.append([*MESSAGE, i, e["id"], e["source"], e["type"], e["subject"], t,
                     orjson.dumps(e["data"]).decode(), [], "default"])
    assert len(rows[0]) == len(STORED_EVENT_COLUMNS)
    return rows


def identities(rows: list[list[Any]]) -> list[list[Any]]:
    return [[r[W[c]] for c in WINDOW_IDENTITY_COLUMNS] for r in rows]


def test_the_replacement_is_the_message_as_if_the_loser_had_been_dropped() -> None:
    events = [event(0, 0, "a"), event(1, 0, "b"), event(2, 1, "a"), event(3, 0, "a")]
    options = RowOptions()
    written = message_rows(events, MESSAGE, METERS, options, lambda k, p: True, now=T0).windows
    loser = 1  # the only event of model "b" in minute 0: its tokens row has nothing left to count
    keep = [i for i in range(len(events)) if i != loser]
    expected = message_rows([events[i] for i in keep], MESSAGE, METERS, options, lambda k, p: True, now=T0,
                            indexes=keep).windows
    rows = replacement_windows(MESSAGE, stored([events[i] for i in keep], keep), identities(written), METERS,
                               options, T0)
    real = [r for r in rows if r[W["count"]] > 0]
    zeros = [r for r in rows if r[W["count"]] == 0]
    assert real == expected
    assert [(z[W["meter"]], z[W["group_key"]]) for z in zeros] == [("tokens", '{"model":"b"}')]
    [z] = zeros
    assert (z[W["sum"]], z[W["min"]], z[W["max"]], z[W["uniques"]], z[W["latest_value"]]) == (Decimal(0), None,
                                                                                            None, [], None)
    assert (z[W["log_epoch"]], z[W["kafka_partition"]], z[W["kafka_offset"]], z[W["generation"]]) == (*MESSAGE, 3)
    # Every stored row of the message is replaced: same identities, nothing more.
    key = lambda r: (r[W["meter"]], r[W["window_start"]], r[W["group_key"]], r[W["generation"]])
    assert sorted(map(key, rows)) == sorted(map(key, written))


def test_a_message_whose_every_event_lost_keeps_only_zero_rows_and_unheld_generations_are_left() -> None:
    events = [event(0, 0, "a")]
    written = message_rows(events, MESSAGE, METERS, RowOptions(), lambda k, p: True, now=T0).windows
    old = [dict(zip(WINDOW_IDENTITY_COLUMNS, r, strict=True)) | {"generation": 2} for r in identities(written)]
    rows = replacement_windows(MESSAGE, [], identities(written) + [list(o.values()) for o in old], METERS,
                               RowOptions(), None)
    assert len(rows) == len(written) and all(r[W["count"]] == 0 for r in rows)
    assert {r[W["generation"]] for r in rows} == {3}  # generation 2 is not the meters': no query reads it
