"""Rows under several generations of one meter, and eventFrom (docs/design.md, "Live meters")."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from meterline.core.meters import Meter, MeterSet
from meterline.core.rows import MessagePosition, RowOptions, always_accept, message_rows
from meterline.core.schema import DEAD_LETTER_COLUMNS, EVENT_COLUMNS, WINDOW_COLUMNS

OLD = Meter(slug="t", eventType="p", aggregation="SUM", valueProperty="$.n", groupBy={"m": "$.m"})
NEW = Meter(slug="t", eventType="p", aggregation="SUM", valueProperty="$.n", groupBy={"k": "$.k"},
            eventFrom=datetime(2024, 1, 1, 0, 30, tzinfo=UTC))


def ev(i: int, minute: int, n: object) -> dict[str, object]:
    return {"id": f"e{i}", "source": "s", "type": "p", "subject": "c", "time": f"2024-01-01T00:{minute:02d}:00.000000Z",
            "data": {"n": n, "m": "a", "k": "b"}}


def rows(meters: MeterSet, events: list[dict[str, object]]):  # type: ignore[no-untyped-def]
    return message_rows(events, MessagePosition("e", 0, 7), meters, RowOptions(), always_accept)


def col(row: list[object], name: str, columns: tuple[str, ...] = WINDOW_COLUMNS) -> object:
    return row[columns.index(name)]


def test_each_generation_gets_its_own_rows_and_eventfrom_skips_earlier_events() -> None:
    out = rows(MeterSet([OLD, NEW], [3, 5]), [ev(1, 10, 2), ev(2, 40, 3), ev(3, 41, "x")])
    by_gen: dict[object, dict[object, Decimal]] = {}
    for r in out.windows:
        group = by_gen.setdefault(col(r, "generation"), {})
        group[col(r, "group_key")] = group.get(col(r, "group_key"), Decimal(0)) + col(r, "sum")  # type: ignore[operator]
    assert by_gen == {3: {'{"m":"a"}': Decimal(5)}, 5: {'{"k":"b"}': Decimal(3)}}  # 00:10 is before eventFrom
    dead = {(col(d, "generation", DEAD_LETTER_COLUMNS), col(d, "batch_index", DEAD_LETTER_COLUMNS))
            for d in out.dead_letters}
    assert dead == {(3, 2), (5, 2)}
    errors = out.events[2][EVENT_COLUMNS.index("validation_errors")]
    assert len(errors) == 1  # both generations reject the same way: one validation error on the event


def test_same_slug_same_generation_is_refused() -> None:
    try:
        MeterSet([OLD, NEW], [1, 1])
    except Exception as exc:  # noqa: BLE001
        assert "duplicate" in str(exc)
    else:
        raise AssertionError("a slug may appear once per generation")
