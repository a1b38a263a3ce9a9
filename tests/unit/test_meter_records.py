"""The pure rules of the meter store: versions, generations, activation, deletion, row round trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meterline.core import meter_records as mr
from meterline.core.errors import InvalidMeterChangeError, MeterConflictError, MeterNotFoundError
from meterline.core.meter_records import MeterAction, MeterCreate, derive_states, live_meters
from meterline.core.meters import Meter

NOW = datetime(2026, 1, 1, tzinfo=UTC)
A = Meter(slug="t", eventType="prompt", aggregation="SUM", valueProperty="$.tokens", groupBy={"m": "$.model"})
B = Meter(slug="t", eventType="prompt", aggregation="MAX", valueProperty="$.tokens", groupBy={"k": "$.type"})


def state(*records: mr.MeterRecord) -> mr.MeterState:
    return derive_states(records)[("default", "t")]


def created() -> list[mr.MeterRecord]:
    return [mr.create(None, A, id="01", name=None, metadata=None, managed_by="api", actor="me", now=NOW)]


def test_create_is_version_1_building_generation_1() -> None:
    (r,) = created()
    assert (r.version, r.generation, r.active_generation, r.name) == (1, 1, 0, "t")
    s = state(r)
    assert s.status == "building" and s.active is None and s.building is r
    assert live_meters([s]) == [(A, 1)]
    with pytest.raises(MeterConflictError):
        mr.create(s, A, id="02", name=None, metadata=None, managed_by="api", actor="me", now=NOW)


def test_activate_then_redefine_keeps_old_generation_live() -> None:
    history = created()
    history.append(mr.activate(state(*history), 1, actor="c", now=NOW))  # type: ignore[arg-type]
    assert state(*history).status == "ready"
    assert mr.activate(state(*history), 1, actor="c", now=NOW) is None  # already active
    renamed = mr.update(state(*history), A, name="Tokens", metadata={"x": "y"}, actor="me", now=NOW)
    assert renamed is not None and renamed.generation == 1  # not a definition change
    history.append(renamed)
    assert mr.update(state(*history), A, name="Tokens", metadata={"x": "y"}, actor="me", now=NOW) is None
    redefined = mr.update(state(*history), B, name=None, metadata={"x": "y"}, actor="me", now=NOW)
    assert redefined is not None and redefined.generation == redefined.version == 4
    history.append(redefined)
    s = state(*history)
    assert s.status == "building" and s.active is not None and s.active.meter == A
    assert live_meters([s]) == [(A, 1), (B, 4)]
    assert mr.activate(s, 1, actor="c", now=NOW) is None  # a stale generation is never activated
    # Going back to the active definition cancels the rebuild instead of starting another.
    back = mr.update(s, A, name=None, metadata=None, actor="me", now=NOW)
    assert back is not None and back.generation == 1 and state(*history, back).status == "ready"


def test_delete_and_recreate_use_higher_generations() -> None:
    history = created()
    history.append(mr.delete(state(*history), actor="me", now=NOW))
    s = state(*history)
    assert s.deleted and live_meters([s]) == []
    with pytest.raises(MeterNotFoundError):
        mr.delete(s, actor="me", now=NOW)
    again = mr.create(s, B, id="03", name=None, metadata=None, managed_by="api", actor="me", now=NOW)
    assert again.version == 3 and again.generation == 3 and again.action is MeterAction.CREATE


def test_file_ids_are_deterministic_ulids() -> None:
    a = mr.file_id("default", "t", 1)
    assert a == mr.file_id("default", "t", 1) != mr.file_id("default", "t", 2)
    assert len(a) == 26 and a[0] in "01234567"


def test_row_round_trip() -> None:
    r = mr.create(None, B.model_copy(update={"event_from": NOW - timedelta(days=1)}), id="01", name="n",
                  metadata={"a": "b"}, managed_by="file:/x.yaml", actor="me", now=NOW, file_mtime=12.5)
    row = dict(zip(mr.RECORD_COLUMNS, mr.to_row(r), strict=True))
    assert mr.from_row(row) == r


def test_requests_name_the_bad_field() -> None:
    with pytest.raises(InvalidMeterChangeError) as info:
        mr.parse_request(MeterCreate, {"slug": "t", "aggregation": "SUM", "colour": 1})
    assert {e["field"] for e in info.value.errors} == {"eventType", "colour"}
    with pytest.raises(InvalidMeterChangeError) as info:
        mr.build_meter({"slug": "t", "event_type": "e", "aggregation": "SUM", "value_property": None})
    assert [e["field"] for e in info.value.errors] == ["valueProperty"]
