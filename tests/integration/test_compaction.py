"""Windows compaction on real ClickHouse: every answer identical before and after, replays not counted twice.

History crosses a month boundary (two partitions), has two namespaces sharing meters, subjects and minutes
(the merged rows' identity must keep them apart), a building generation and a dead-letter replay row (both
copied, not merged) and a key whose total does not fit one Decimal128(9) row (kept as delta rows). Answers
come from the query API for every aggregation and window size, and are checked against the oracle.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from meterline.adapters.compactions import (
    ReplayGuard,
    fenced_writes,
    read_claims,
    write_claim,
)
from meterline.cli import app
from meterline.core.compaction import RUNNING, SWAPPING, in_progress
from meterline.core.errors import ConfigError, StorageError
from meterline.core.schema import COARSE_WINDOWS, METER_WINDOWS, WINDOW_COLUMNS, Topology
from meterline.jobs import compaction
from meterline.jobs.compaction import ClaimLease, compact
from processor.sink import ClickHouseSink
from tests import windows_history as history
from tests.oracle import EventFactory, OracleMeter, config_yaml, expected, first_sightings, response_windows

METERS = [
    OracleMeter("tokens_total", "prompt", "SUM", "tokens", ("model", "type")),
    OracleMeter("tokens_avg", "prompt", "AVG", "tokens", ("model",)),
    OracleMeter("tokens_min", "prompt", "MIN", "tokens"),
    OracleMeter("tokens_max", "prompt", "MAX", "tokens", ("type",)),
    OracleMeter("prompt_count", "prompt", "COUNT", None, ("model",)),
    OracleMeter("active_users", "activity", "UNIQUE_COUNT", "user_id"),
    OracleMeter("storage_latest", "storage", "LATEST", "bytes", ("tier",)),
]
SIZES = (None, "MINUTE", "HOUR", "DAY", "MONTH")
START = datetime(2024, 1, 31, 21, tzinfo=UTC)  # six hours across the end of January
FROM, TO = START - timedelta(days=1), START + timedelta(days=2)
MARGIN = timedelta(hours=1)


def compact_all(client: Client, database: str, **options: Any) -> Any:
    active = {(ns, m.slug): history.GENERATION for m in METERS for ns in ("default", "other")}
    return compact(client, database, active, late_horizon_days=1,
                   margin=MARGIN, topic=history.TOPIC, topic_partitions=history.PARTITIONS, **options)


@pytest.fixture()
def env(clickhouse_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Client, str]]:
    with history.query_api(clickhouse_url, tmp_path, METERS, prefix="compaction", month="202401") as env:
        yield env


def answers(http: TestClient) -> dict[tuple[str, str | None], Any]:
    """Every meter x window size, grouped by subject and the meter's keys: the raw JSON answers."""
    out = {}
    for m in METERS:
        for size in SIZES:
            params: dict[str, Any] = {"from": FROM.isoformat(), "to": TO.isoformat(),
                                      "groupBy": ["subject", *m.group_fields]}
            if size:
                params["windowSize"] = size
            res = http.get(f"/api/v1/meters/{m.slug}/query", params=params)
            assert res.status_code == 200, res.text
            body = json.loads(res.text, parse_float=Decimal)
            out[(m.slug, size)] = sorted(body["data"], key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return out


def check_oracle(http: TestClient, counted: list[dict[str, Any]]) -> None:
    for m in METERS:
        params = {"from": FROM.isoformat(), "to": TO.isoformat(), "windowSize": "HOUR",
                  "groupBy": ["subject", *m.group_fields]}
        body = json.loads(http.get(f"/api/v1/meters/{m.slug}/query", params=params).text, parse_float=Decimal)
        assert response_windows(body, m.group_fields) == expected(
            counted, m, start=FROM, end=TO, window="HOUR", group_by=m.group_fields), m.slug


def big_events() -> list[dict[str, Any]]:
    """Two events of one subject, minute and group whose sum (1.2 * 10^29) does not fit Decimal128(9)."""
    base = {"specversion": "1.0", "source": "big", "type": "prompt", "subject": "big-customer",
            "time": "2024-01-31T22:00:01.000Z"}
    return [{**base, "id": f"big-{i}", "data": {"tokens": "60000000000000000000000000000", "model": "m",
                                                    "type": "input"}} for i in range(2)]


def test_compaction_keeps_every_answer(env: tuple[TestClient, Client, str]) -> None:
    http, client, database = env
    factory = EventFactory(seed=15, start=START, span=timedelta(hours=6))
    events = [factory.event() for _ in range(3000)]
    events += events[:200]  # resent events: duplicates, never counted
    counted = first_sightings(events) + big_events()
    batch = history.messages(events) + [(history.MessagePosition(history.EPOCH, 1, 10_000 + i), [e])
                                        for i, e in enumerate(big_events())]  # one message each: each fits
    history.write(client, database, history.rows_of(batch, METERS))
    # Another tenant meters the same subjects and minutes at other positions.
    other = [{**e, "meterline_namespace": "other"} for e in first_sightings(events)[:500]]
    other_batch = [(history.MessagePosition("other-epoch", p.partition, p.offset), es)
                   for p, es in history.messages(other)]
    history.write(client, database, history.rows_of(other_batch, METERS))
    history.mark_complete(client, database)
    check_oracle(http, counted)
    # A building generation of one meter and a dead-letter replay row are copied, never merged.
    building = history.rows_of(batch[:20], METERS[:1], generation=7).windows
    replay_row = list(history.rows_of(batch[:1], METERS[:1]).windows[0])
    replay_row[WINDOW_COLUMNS.index("log_epoch")] = "replay:value_missing:tokens_total:" + history.EPOCH
    client.insert(METER_WINDOWS, [*building, replay_row], column_names=list(WINDOW_COLUMNS), database=database)

    before = answers(http)
    rows_before = history.window_rows(client, database)
    copied = "SELECT count() FROM {db}.meter_windows FINAL WHERE generation = 7 OR startsWith(log_epoch, 'replay:')"

    parts: dict[tuple[str, str], int] = {}

    def count_parts(partition: str, name: str) -> None:
        """Right after each swap: the partition's active parts in the table just swapped."""
        table = {"swapped": METER_WINDOWS, "coarse-swapped": COARSE_WINDOWS}.get(name)
        if table is not None:
            parts[(partition, table)] = int(client.query(
                "SELECT count() FROM system.parts WHERE database = {db:String} AND table = {t:String} AND active"
                " AND partition_id = {p:String}", parameters={"db": database, "t": table, "p": partition},
            ).result_rows[0][0])

    report = compact_all(client, database, step=count_parts)

    assert [(r.partition, r.outcome) for r in report.partitions] == [("202401", "compacted"), ("202402", "compacted")]
    # Merged before the swap: one part each, not the overlapping parts of the INSERTs that every FINAL read
    # would merge again until a background merge caught up.
    assert parts == {(p, t): 1 for p in ("202401", "202402") for t in (METER_WINDOWS, COARSE_WINDOWS)}
    assert answers(http) == before
    assert history.window_rows(client, database) < rows_before
    assert int(client.query(copied.format(db=database)).result_rows[0][0]) == len(building) + 1
    keys = client.query(
        f"SELECT count(), uniqExact(meter, subject, window_start, group_key, generation, namespace)"
        f" FROM {database}.meter_windows FINAL WHERE generation = 1 AND subject != 'big-customer'"
        " AND NOT startsWith(log_epoch, 'replay:')").result_rows[0]
    assert keys[0] == keys[1]  # one row per key
    # The overflowing key keeps its two delta rows (and its exact 1.2e29 total).
    big = client.query(f"SELECT count() FROM {database}.meter_windows FINAL WHERE subject = 'big-customer'"
                       " AND meter = 'tokens_total'").result_rows[0][0]
    assert big == 2
    # Running again finds nothing to merge.
    assert {r.outcome for r in compact_all(client, database).partitions} == {"nothing to merge"}
    assert answers(http) == before


def test_replay_after_compaction_is_not_counted_twice(env: tuple[TestClient, Client, str], clickhouse_url: str) -> None:
    http, client, database = env
    factory = EventFactory(seed=16, start=START, span=timedelta(hours=6))
    events = [factory.event() for _ in range(1500)]
    batch = history.messages(events)
    history.write(client, database, history.rows_of(batch, METERS))
    history.mark_complete(client, database)
    check_oracle(http, events)
    compact_all(client, database)
    check_oracle(http, events)

    guard = ReplayGuard(database, timedelta(days=1), MARGIN, "test-worker")
    sink = ClickHouseSink(f"{clickhouse_url}/{database}", database, replay_guard=guard)
    try:
        # A worker replays the first ten messages (a crash before its ack): every row is dropped.
        sink.write_sync(history.rows_of(batch[:10], METERS))
        assert guard.dropped > 0
        check_oracle(http, events)
        # A message never written before (beyond the watermark) in the compacted month counts once.
        late = [factory.event() for _ in range(30)]
        for e in late:
            e["subject"] = events[0]["subject"]
        p = history.kafka_partition(events[0]["subject"])
        new = [(history.MessagePosition(history.EPOCH, p, 50_000), late)]
        dropped = guard.dropped
        sink.write_sync(history.rows_of(new, METERS))
        assert guard.dropped == dropped
        check_oracle(http, events + late)
        # ... and is merged by the next run without changing any answer.
        assert {r.outcome for r in compact_all(client, database).partitions} == {"compacted"}
        check_oracle(http, events + late)
    finally:
        sink.stop()


def test_fence_aborts_and_waits(env: tuple[TestClient, Client, str]) -> None:
    _, client, database = env
    factory = EventFactory(seed=17, start=START)
    events = [factory.event() for _ in range(300)]
    history.write(client, database, history.rows_of(history.messages(events), METERS))
    history.mark_complete(client, database)
    # An announced writer makes the compaction abort, untouched ...
    with fenced_writes(client, database, "test-writer"):
        report = compact_all(client, database)
    assert all(r.outcome.startswith("aborted: writer test-writer") for r in report.partitions)
    # ... and a compaction in progress makes the processor's rows wait (a retryable StorageError).
    for partition in ("202401", "202402"):
        write_claim(client, database, partition, "someone", RUNNING)
    guard = ReplayGuard(database, timedelta(days=1), MARGIN, "w", lease_seconds=60)
    rows = history.rows_of(history.messages(events)[:1], METERS).windows
    with pytest.raises(Exception, match="being compacted"), guard.admit(client, rows):
        pass
    # A dead compactor's record goes stale after the lease: writers go on.
    stale = ReplayGuard(database, timedelta(days=1), MARGIN, "w", lease_seconds=0.001)
    with stale.admit(client, rows) as kept:
        assert len(kept) == len(rows)
    assert {c.state for c in read_claims(client, database) if c.compaction_id == "someone"} == {RUNNING}


def test_claim_stays_fresh_through_a_long_statement(env: tuple[TestClient, Client, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement longer than the lease (a merge of a big month) keeps the claim fresh for writers, and a
    renewal that fails makes the compaction refuse its next step instead of swapping after the fence lapsed."""
    _, client, database = env
    lease_seconds = 4.0
    lease = ClaimLease(client, database, "202401", "long-merge", owner="test", lease_seconds=lease_seconds)
    lease.record(RUNNING)
    seen = []
    with lease.renewed():
        deadline = time.monotonic() + 1.5 * lease_seconds
        while time.monotonic() < deadline:  # what a writer sees while the statement runs
            seen.append([c.compaction_id for c in in_progress(read_claims(client, database), lease_seconds)])
            time.sleep(0.25)
    assert seen and all(ids == ["long-merge"] for ids in seen)
    lease.record(SWAPPING)  # still within the lease: the compaction goes on

    failing = ClaimLease(client, database, "202402", "lost-lease", owner="test", lease_seconds=lease_seconds)
    failing.record(RUNNING)
    def down(*args: Any, **kwargs: Any) -> None:
        raise StorageError("ClickHouse is down")

    monkeypatch.setattr(compaction, "write_claim", down)
    with failing.renewed():
        time.sleep(0.6 * lease_seconds)
    monkeypatch.undo()
    with pytest.raises(Exception, match=SWAPPING):
        failing.record(SWAPPING)
    assert failing.lapsed


def test_refused_without_horizon_or_on_cluster(env: tuple[TestClient, Client, str]) -> None:
    _, client, database = env
    with pytest.raises(ConfigError, match="late_horizon_days"):
        compact(client, database, {}, late_horizon_days=None, margin=MARGIN, topic="t", topic_partitions=1)
    with pytest.raises(ConfigError, match="cluster"):
        compact(client, database, {}, late_horizon_days=1, margin=MARGIN, topic="t", topic_partitions=1,
                topology=Topology(cluster="c"))


def test_merged_rows_equal_a_python_rollup(env: tuple[TestClient, Client, str]) -> None:
    """Random delta rows (NULL minima and latest values, empty uniques, equal latest times) against the
    roll-up computed here: one merged row per key, every column as a query would roll it up."""
    _, client, database = env
    rng = random.Random(99)
    rows = []
    for offset in range(2000):
        value = rng.choice([None, Decimal(rng.randrange(-10**6, 10**6)) / 1000])
        latest_time = datetime(2024, 1, 10, 3, rng.randrange(3), rng.randrange(2), tzinfo=UTC)
        rows.append([
            "tokens_total", rng.choice(["s1", "s2"]), datetime(2024, 1, 10, 3, rng.randrange(3)), "g", {},
            history.EPOCH, 0, offset, rng.randrange(1, 5), value or Decimal(0), value, value,
            sorted(rng.sample(["a", "b", "c", "d"], rng.randrange(3))), latest_time, value,
            offset * 100000 + rng.randrange(3), history.GENERATION, "default",
        ])
    client.insert(METER_WINDOWS, rows, column_names=list(WINDOW_COLUMNS), database=database)
    history.mark_complete(client, database)
    compact_all(client, database)

    want: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:
        key = (r[1], r[2])
        acc = want.setdefault(key, [0, Decimal(0), None, None, set(), None])
        acc[0] += r[8]
        acc[1] += r[9]
        if r[10] is not None:
            acc[2] = r[10] if acc[2] is None else min(acc[2], r[10])
            acc[3] = r[11] if acc[3] is None else max(acc[3], r[11])
            if acc[5] is None or (r[13], r[15]) > acc[5][:2]:
                acc[5] = (r[13], r[15], r[14])
        acc[4] |= set(r[12])
    got = client.query(
        f"SELECT subject, window_start, log_epoch, count, sum, min, max, uniques, latest_time, latest_rank,"
        f" latest_value FROM `{database}`.meter_windows FINAL").result_rows
    assert len(got) == len(want)
    for subject, ws, epoch, count, total, low, high, uniques, lt, rank, latest in got:
        acc = want[(subject, ws)]
        assert epoch == "compacted:default"
        assert (count, total, low, high, uniques) == (acc[0], acc[1], acc[2], acc[3], sorted(acc[4]))
        assert (lt.replace(tzinfo=UTC), rank, latest) == acc[5] if acc[5] else latest is None


def test_cli_compact(env: tuple[TestClient, Client, str], clickhouse_url: str, tmp_path: Any,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    http, client, database = env
    factory = EventFactory(seed=18, start=START)
    events = [factory.event() for _ in range(500)]
    history.write(client, database, history.rows_of(history.messages(events), METERS))
    history.mark_complete(client, database)
    config = tmp_path / "cli-config.yaml"
    config.write_text(config_yaml(METERS))
    monkeypatch.setenv("CLICKHOUSE_URL", f"{clickhouse_url.rstrip('/')}/{database}")
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    monkeypatch.setenv("METERLINE_EVENTS_TOPIC", history.TOPIC)
    monkeypatch.setenv("METERLINE_TOPIC_PARTITIONS", str(history.PARTITIONS))
    runner = CliRunner()
    refused = runner.invoke(app, ["compact"])  # no late horizon: nothing ever closes
    assert isinstance(refused.exception, ConfigError) and "late_horizon_days" in str(refused.exception)
    monkeypatch.setenv("METERLINE_LATE_HORIZON_DAYS", "1")
    done = runner.invoke(app, ["compact", "--partition", "202401"])
    assert done.exit_code == 0, done.output
    assert "202401: compacted" in done.output and "202402" not in done.output
    check_oracle(http, events)
