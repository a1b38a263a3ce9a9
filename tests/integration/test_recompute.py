"""`meterline recompute` after a groupBy change, on real ClickHouse, against the oracle.

History is written the way the worker writes it (meterline.core.rows.message_rows) under the OLD meter
definition; after recompute, every group of the NEW definition must equal the oracle and no row of the
old grouping may remain.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client
from typer.testing import CliRunner

from meterline.adapters.clickhouse import connect, create_schema
from meterline.cli import app
from meterline.core.meters import Meter, MeterSet
from meterline.core.rows import MessagePosition, RowOptions, message_rows
from meterline.core.schema import EVENT_COLUMNS, EVENTS, METER_WINDOWS, WINDOW_COLUMNS
from meterline.jobs.recompute import recompute
from tests.oracle import EventFactory, OracleMeter, expected, first_sighting_decider

OLD = Meter(slug="tokens_total", eventType="prompt", aggregation="SUM", valueProperty="$.tokens",
            groupBy={"model": "$.model"})
NEW = Meter(slug="tokens_total", eventType="prompt", aggregation="SUM", valueProperty="$.tokens",
            groupBy={"type": "$.type"})


@pytest.fixture()
def database(clickhouse_url: str) -> Iterator[tuple[Client, str]]:
    name = f"recompute_{uuid.uuid4().hex[:8]}"
    client = connect(clickhouse_url)
    create_schema(client, name)
    try:
        yield client, name
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")
        client.close()


def write_history(client: Client, database: str, events: list[dict]) -> None:
    """Store events in 100-event messages exactly as a worker would, with the OLD definition."""
    first_sighting = first_sighting_decider()
    meters = MeterSet([OLD])
    for offset, start in enumerate(range(0, len(events), 100)):
        rows = message_rows(events[start : start + 100], MessagePosition("epoch-1", 0, offset), meters,
                            RowOptions(), first_sighting)
        client.insert(EVENTS, rows.events, column_names=list(EVENT_COLUMNS), database=database)
        client.insert(METER_WINDOWS, rows.windows, column_names=list(WINDOW_COLUMNS), database=database)


def totals_by(client: Client, database: str, key: str) -> dict[tuple, Decimal]:
    result = client.query(
        f"SELECT if(mapContains(group, {{k:String}}), group[{{k:String}}], NULL) AS g, sum(sum)"
        f" FROM {database}.{METER_WINDOWS} FINAL WHERE meter = 'tokens_total' GROUP BY g",
        parameters={"k": key},
    )
    return {(g,): Decimal(v) for g, v in result.result_rows if Decimal(v) != 0 or g is not None}


def test_recompute_regroups_history(database: tuple[Client, str]) -> None:
    client, name = database
    factory = EventFactory(seed=3, span=timedelta(hours=3))
    events = [factory.event(invalid_rate=0.05) for _ in range(1500)]
    events += events[:100]  # duplicates must stay excluded after recompute
    write_history(client, name, events)
    oracle_events = events[:1500]
    meter = OracleMeter("tokens_total", "prompt", "SUM", "tokens", ("type",))
    start = factory.start
    want = {
        k[2]: v
        for k, v in expected(oracle_events, meter, start=start, end=start + timedelta(days=1), window=None,
                             group_by=("type",), by_subject=False).items()
    }
    assert totals_by(client, name, "type") != want  # the old grouping cannot answer the new question

    result = recompute(client, name, NEW)

    assert result.events == sum(1 for e in oracle_events if e["type"] == "prompt")
    assert totals_by(client, name, "type") == want
    left = client.query(f"SELECT count() FROM {name}.{METER_WINDOWS} FINAL WHERE mapContains(group, 'model')")
    assert left.result_rows[0][0] == 0


def test_cli_recompute(database: tuple[Client, str], clickhouse_url: str, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    client, name = database
    factory = EventFactory(seed=5, span=timedelta(hours=1))
    events = [factory.event() for _ in range(300)]
    write_history(client, name, events)
    config = tmp_path / "config.yaml"
    config.write_text(
        "meters:\n  - slug: tokens_total\n    eventType: prompt\n    aggregation: SUM\n"
        "    valueProperty: $.tokens\n    groupBy: {type: $.type}\n"
    )
    monkeypatch.setenv("CLICKHOUSE_URL", f"{clickhouse_url.rstrip('/')}/{name}")
    result = CliRunner().invoke(app, ["recompute", "tokens_total", "--config", str(config)])
    assert result.exit_code == 0, result.output
    meter = OracleMeter("tokens_total", "prompt", "SUM", "tokens", ("type",))
    want = {
        k[2]: v
        for k, v in expected(events, meter, start=factory.start, end=factory.start + timedelta(days=1),
                             window=None, group_by=("type",), by_subject=False).items()
    }
    assert totals_by(client, name, "type") == want


@pytest.mark.parametrize("legacy", [False, True], ids=["rejections", "legacy-rows"])
def test_recompute_keeps_too_late_events_unmetered(database: tuple[Client, str], legacy: bool) -> None:
    """The worker refused the first half of the history as too late; recompute must not meter it.

    It decides from the typed `events.rejections`, never from the human text. `legacy-rows` stores the
    history the way a version without that column did (the column dropped, rows inserted without it, then
    the schema re-created), so the rejections come from the column's DEFAULT over `validation_errors`.
    """
    client, name = database
    factory = EventFactory(seed=9, span=timedelta(hours=3))
    events = [factory.event() for _ in range(400)]
    floor = factory.start + timedelta(hours=1, minutes=30)
    horizon = timedelta(days=1)
    if legacy:
        client.command(f"ALTER TABLE {name}.{EVENTS} DROP COLUMN rejections")
    columns = [c for c in EVENT_COLUMNS if not (legacy and c == "rejections")]
    meters = MeterSet([OLD])
    for offset, start in enumerate(range(0, len(events), 100)):
        rows = message_rows(events[start : start + 100], MessagePosition("epoch-1", 0, offset), meters,
                            RowOptions(late_horizon=horizon), first_sighting_decider(), now=floor + horizon)
        kept = [[v for c, v in zip(EVENT_COLUMNS, r, strict=True) if c in columns] for r in rows.events]
        client.insert(EVENTS, kept, column_names=columns, database=name)
    if legacy:
        create_schema(client, name)  # what an upgraded service does at start: ADD COLUMN IF NOT EXISTS

    recompute(client, name, NEW)

    meter = OracleMeter("tokens_total", "prompt", "SUM", "tokens", ("type",))

    def oracle(sent: list[dict]) -> dict[tuple, Decimal]:
        return {k[2]: v for k, v in expected(sent, meter, start=factory.start, end=factory.start + timedelta(days=1),
                                              window=None, group_by=("type",), by_subject=False).items()}

    in_time = [e for e in events if datetime.fromisoformat(e["time"]) >= floor]
    assert 0 < len(in_time) < len(events)
    assert totals_by(client, name, "type") == oracle(in_time) != oracle(events)
