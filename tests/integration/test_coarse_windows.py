"""Coarse (15-minute) rows of compacted months on real ClickHouse: every answer equals the oracle computed
here from the raw events, before compaction, after it, and after later writes into a compacted month.

History: two weeks across the end of February 2024 (two closed months) with the DST change of 10 March
inside (America/New_York, America/St_Johns), metered for every aggregation; another tenant meters the same
subjects and minutes. Queries cut into minutes at both ends (raw-event edges, minute rows) around the
coarse interior, for every window size, in UTC and zones at +05:45, +08:45 and -03:30, grouped by subject
and the meters' keys, and with subject and groupBy filters.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from meterline.adapters.compactions import ReplayGuard, fenced_writes
from meterline.core.schema import COARSE_WINDOWS, METER_WINDOWS, WINDOW_COLUMNS
from meterline.jobs.compaction import compact
from meterline.localinfra.ports import wait_for
from processor.sink import ClickHouseSink
from tests import windows_history as history
from tests.oracle import EventFactory, OracleMeter, expected, first_sightings, response_windows

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
ZONES = ("UTC", "Asia/Kathmandu", "Australia/Eucla", "America/St_Johns", "America/New_York")
START = datetime(2024, 2, 27, 20, tzinfo=UTC)
SPAN = timedelta(days=13)  # into 12 March: the DST change of 10 March is inside
# Edges cut into minutes (raw events) and quarters (minute rows) on both sides of the coarse interior.
FROM, TO = START + timedelta(minutes=7, seconds=30), START + SPAN - timedelta(minutes=21, seconds=15)


@pytest.fixture()
def env(clickhouse_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Client, str]]:
    with history.query_api(clickhouse_url, tmp_path, METERS, prefix="coarse", month="202402") as env:
        yield env


def compact_all(client: Client, database: str) -> Any:
    active = {(ns, m.slug): history.GENERATION for m in METERS for ns in ("default", "other")}
    return compact(client, database, active, late_horizon_days=1, margin=timedelta(hours=1),
                   topic=history.TOPIC, topic_partitions=history.PARTITIONS)


def ask(http: TestClient, m: OracleMeter, size: str | None, zone: str, **extra: Any) -> dict[Any, Decimal]:
    params: dict[str, Any] = {"from": FROM.isoformat(), "to": TO.isoformat(), "windowTimeZone": zone,
                              "groupBy": ["subject", *m.group_fields], **extra}
    if size:
        params["windowSize"] = size
    res = http.get(f"/api/v1/meters/{m.slug}/query", params=params)
    assert res.status_code == 200, res.text
    return response_windows(json.loads(res.text, parse_float=Decimal), m.group_fields)


def check_all(http: TestClient, counted: list[dict[str, Any]], when: str) -> int:
    """Every meter x window size x zone, and filtered queries, against the oracle; returns windows checked."""
    checked = 0
    for m in METERS:
        for size in SIZES:
            for zone in ZONES if size != "MINUTE" else ZONES[:2]:  # MINUTE buckets are UTC minutes in any zone
                want = expected(counted, m, start=FROM, end=TO, window=size, tz=zone, group_by=m.group_fields)
                got = ask(http, m, size, zone)
                assert got == want, f"{when}: {m.slug} {size} {zone}: {sorted(set(got.items()) ^ set(want.items()))[:6]}"
                checked += len(want)
    m = METERS[0]
    subjects = ("customer-1", "customer-3")
    for zone in ("Asia/Kathmandu", "America/St_Johns"):
        want = expected(counted, m, start=FROM, end=TO, window="HOUR", tz=zone, group_by=m.group_fields,
                        where=lambda e: e["subject"] in subjects and (e["data"] or {}).get("model") == "claude")
        got = ask(http, m, "HOUR", zone, subject=list(subjects), **{"filterGroupBy[model]": "claude"})
        assert want and got == want, f"{when}: filtered {zone}"
        checked += len(want)
    return checked


def test_coarse_rows_answer_exactly(env: tuple[TestClient, Client, str], clickhouse_url: str) -> None:
    http, client, database = env
    factory = EventFactory(seed=16, start=START, span=SPAN)
    events = [factory.event() for _ in range(3000)]
    events += events[:200]  # resent: duplicates, never counted
    counted = first_sightings(events)
    batch = history.messages(events)
    history.write(client, database, history.rows_of(batch, METERS))
    other = [{**e, "meterline_namespace": "other"} for e in counted[:800]]  # another tenant, same keys
    history.write(client, database, history.rows_of(
        [(history.MessagePosition("other-epoch", p.partition, p.offset), es) for p, es in history.messages(other)],
        METERS))
    history.mark_complete(client, database)
    store = http.app.state.query_store  # type: ignore[attr-defined]

    check_all(http, counted, "before compaction")
    report = compact_all(client, database)
    assert [(r.partition, r.outcome) for r in report.partitions] == [("202402", "compacted"), ("202403", "compacted")]
    store.coarse.reload()
    assert set(store.coarse.fingerprints(client, database)) == {"202402", "202403"}
    coarse_rows = int(client.query(f"SELECT count() FROM `{database}`.{COARSE_WINDOWS}").result_rows[0][0])
    assert 0 < coarse_rows < history.window_rows(client, database)
    assert check_all(http, counted, "after compaction") > 1000

    # The coarse rows are what answers: a row planted in March's (never done for real) shows in UTC hours...
    rows = history.rows_of(batch, METERS[:1]).windows
    start_at, subject_at = WINDOW_COLUMNS.index("window_start"), WINDOW_COLUMNS.index("subject")
    planted = list(next(r for r in rows if datetime(2024, 3, 2, tzinfo=UTC) <= r[start_at].replace(tzinfo=UTC)))
    minute = planted[start_at]
    planted[start_at] = minute.replace(minute=minute.minute - minute.minute % 15)
    planted[WINDOW_COLUMNS.index("log_epoch")] = "planted"
    client.insert(COARSE_WINDOWS, [planted], column_names=list(WINDOW_COLUMNS), database=database)
    m = METERS[0]

    def split_by_month(answer: dict[Any, Decimal]) -> tuple[dict[Any, Decimal], dict[Any, Decimal]]:
        march = datetime(2024, 3, 1, tzinfo=UTC)
        return {k: v for k, v in answer.items() if k[0] < march}, {k: v for k, v in answer.items() if k[0] >= march}

    hours = expected(counted, m, start=FROM, end=TO, window="HOUR", group_by=m.group_fields)
    assert split_by_month(ask(http, m, "HOUR", "UTC"))[1] != split_by_month(hours)[1]
    # One ClickHouse request answers from coarse rows, the months' validity checked inside it (and one reads
    # the raw events of the range's partial edge minutes).
    assert requests(store, lambda: ask(http, m, "HOUR", "Asia/Kathmandu")) == ["edges", "coarse rows"]
    # ...but never in minutes, and not once the month's minute rows change: late events written into
    # compacted February after compaction (new messages) by the processor's sink, through the fence, count
    # at once, from February's minute rows. The first query asks only for a subject February's coarse rows
    # never had: the check must fail the query although no coarse row matches it.
    assert ask(http, m, "MINUTE", "UTC") == expected(counted, m, start=FROM, end=TO, window="MINUTE",
                                                     group_by=m.group_fields)
    late = [{**factory.event(when=datetime(2024, 2, 29, 12, 0, 1, tzinfo=UTC)), "type": "prompt",
             "subject": subject, "data": {"tokens": 7, "model": "claude", "type": "input"}}
            for subject in (planted[subject_at], "late-subject")]
    sink_write(clickhouse_url, database, [(history.MessagePosition(history.EPOCH, 0, 900_000), late[:1]),
                                          (history.MessagePosition(history.EPOCH, 1, 900_000), late[1:])])
    counted += late
    new_subject = expected(counted, m, start=FROM, end=TO, window="HOUR", group_by=m.group_fields,
                           where=lambda e: e["subject"] == "late-subject")
    assert new_subject and ask(http, m, "HOUR", "UTC", subject=["late-subject"]) == new_subject
    february, march = split_by_month(ask(http, m, "HOUR", "UTC"))
    want_february, want_march = split_by_month(expected(counted, m, start=FROM, end=TO, window="HOUR",
                                                        group_by=m.group_fields))
    assert february == want_february and february != split_by_month(hours)[0]  # the late events, at once
    assert march != want_march  # March's coarse rows still answer (the planted row)
    assert requests(store, lambda: ask(http, m, "HOUR", "UTC")) == ["edges", "coarse rows"]  # Feb's stale pair: known
    client.command(f"ALTER TABLE `{database}`.{COARSE_WINDOWS} DELETE WHERE log_epoch = 'planted'"
                   " SETTINGS mutations_sync = 2")
    check_all(http, counted, "after a write into a compacted month")

    # The next run rebuilds the month whose minute rows changed; the other has nothing to do.
    report = compact_all(client, database)
    assert sorted((r.partition, r.outcome) for r in report.partitions) == [("202402", "compacted"),
                                                                           ("202403", "nothing to merge")]
    store.coarse.reload()
    check_all(http, counted, "after compacting again")

    # A job's writes (recompute, dead-letter replay, rebuilds: `fenced_writes`) count at once too.
    job = {**factory.event(when=datetime(2024, 3, 3, 8, 30, 5, tzinfo=UTC)), "type": "prompt", "subject": "job-subject",
           "data": {"tokens": 11, "model": "claude", "type": "output"}}
    with fenced_writes(client, database, "test-job"):
        history.write(client, database, history.rows_of([(history.MessagePosition("job-epoch", 0, 0), [job])], METERS))
    counted.append(job)
    for size, zone in (("HOUR", "UTC"), ("DAY", "Asia/Kathmandu"), ("MONTH", "America/St_Johns")):
        want = expected(counted, m, start=FROM, end=TO, window=size, tz=zone, group_by=m.group_fields)
        assert ask(http, m, size, zone) == want, f"after a job's write: {size} {zone}"
    report = compact_all(client, database)  # the job marked every compacted month: both are rebuilt
    assert sorted((r.partition, r.outcome) for r in report.partitions) == [("202402", "compacted"),
                                                                           ("202403", "compacted")]
    store.coarse.reload()
    check_all(http, counted, "after a job's write and compacting again")

    # A write that bypasses the fence (no writer does) is counted once the done records are read again:
    # they are read with the months' fingerprints, and February's moved.
    stray = {**job, "id": "stray", "subject": "stray-subject", "time": "2024-02-28T10:00:00+00:00"}
    history.write(client, database, history.rows_of([(history.MessagePosition("stray-epoch", 0, 0), [stray])], METERS))
    counted.append(stray)
    store.coarse.reload()
    assert ask(http, m, "HOUR", "UTC") == expected(counted, m, start=FROM, end=TO, window="HOUR", group_by=m.group_fields)


def sink_write(clickhouse_url: str, database: str,
               batch: list[tuple[history.MessagePosition, list[dict[str, Any]]]]) -> None:
    """Write as a worker does: the processor's sink, its rows of old months through the compaction fence."""
    guard = ReplayGuard(database, timedelta(days=1), timedelta(hours=1), "late-writer")
    sink = ClickHouseSink(clickhouse_url, database, replay_guard=guard, backoff_max=1.0)
    try:
        sink.write_sync(history.rows_of(batch, METERS))
    finally:
        sink.stop()
    assert guard.dropped == 0


def requests(store: Any, run: Callable[[], object]) -> list[str]:
    """What the query API's store asks ClickHouse during `run`, with completeUntil and the compaction
    records already read (each is read at most once a second / every 5 s, not per query)."""
    sent: list[str] = []
    client = store.client
    original = client.query
    ages = store.progress.max_age_seconds, store.coarse.refresh_seconds
    store.progress.max_age_seconds = store.coarse.refresh_seconds = 3600.0
    run()  # fills both caches

    def counting(sql: str, *args: Any, **kwargs: Any) -> Any:
        sent.append("coarse rows" if COARSE_WINDOWS in sql else "edges" if "FROM `" in sql and ".events " in sql
                    else sql)
        return original(sql, *args, **kwargs)

    client.query = counting
    try:
        run()
    finally:
        del client.query
        store.progress.max_age_seconds, store.coarse.refresh_seconds = ages
    return sent


def test_compaction_records_are_read_off_the_request_path(env: tuple[TestClient, Client, str]) -> None:
    """The query API reads the done records in the background: a compaction's months answer from coarse
    rows without any request reading `window_compactions` or `system.parts`, and the answers are exact."""
    http, client, database = env
    factory = EventFactory(seed=21, start=START, span=SPAN)
    counted = first_sightings([factory.event() for _ in range(600)])
    history.write(client, database, history.rows_of(history.messages(counted), METERS))
    history.mark_complete(client, database)
    store = http.app.state.query_store  # type: ignore[attr-defined]
    m = METERS[0]
    want = expected(counted, m, start=FROM, end=TO, window="HOUR", group_by=m.group_fields)
    assert ask(http, m, "HOUR", "UTC") == want  # the first query read the records: none done yet
    assert store.coarse.background

    sent: list[tuple[bool, str]] = []
    reader = store.client  # the API's own client: requests and the refresher share it
    original = reader.query

    def counting(sql: str, *args: Any, **kwargs: Any) -> Any:
        background = threading.current_thread().name.startswith("asyncio")  # asyncio.to_thread's pool
        sent.append((background, "coarse rows" if COARSE_WINDOWS in sql else "records"
                     if "window_compactions" in sql or "system.parts" in sql else "other"))
        return original(sql, *args, **kwargs)

    reader.query = counting
    try:
        store.coarse.refresh_seconds = 0.5  # from the refresher's next wait on (the first is 5 s)
        wait_for(lambda: (True, "records") in sent, 10, "the refresher's next read")
        sent.clear()
        compact_all(client, database)  # no reload(): the refresher must find the new done records
        deadline = time.monotonic() + 15
        while not any(kind == "coarse rows" for _, kind in sent) and time.monotonic() < deadline:
            assert ask(http, m, "HOUR", "UTC") == want
            time.sleep(0.1)
        for _ in range(5):
            assert ask(http, m, "HOUR", "UTC") == want
    finally:
        del reader.query
    assert any(kind == "coarse rows" for background, kind in sent if not background)
    assert any(kind == "records" for background, kind in sent if background)
    assert not [kind for background, kind in sent if not background and kind == "records"]


def test_kept_answers_are_exact_and_die_with_their_month(env: tuple[TestClient, Client, str],
                                                         clickhouse_url: str) -> None:
    """Answers read wholly from coarse rows are kept in the query process and returned after the validity
    check alone: equal to the oracle every time, per tenant, and never once a write made a month invalid."""
    http, client, database = env
    factory = EventFactory(seed=22, start=START, span=SPAN)
    counted = first_sightings([factory.event() for _ in range(1500)])
    history.write(client, database, history.rows_of(history.messages(counted), METERS))
    # Another tenant with the same keys: the rows of the first 400 events again, in namespace `other`.
    other = counted[:400]
    theirs = [list(r) for r in history.rows_of(history.messages(other), METERS).windows]
    for r in theirs:
        r[WINDOW_COLUMNS.index("namespace")], r[WINDOW_COLUMNS.index("log_epoch")] = "other", "other-epoch"
    client.insert(METER_WINDOWS, theirs, column_names=list(WINDOW_COLUMNS), database=database)
    history.mark_complete(client, database)
    store = http.app.state.query_store  # type: ignore[attr-defined]
    assert [r.outcome for r in compact_all(client, database).partitions] == ["compacted", "compacted"]
    store.coarse.reload()
    months = (datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC))  # both compacted months, whole

    def ask_months(m: OracleMeter, size: str, zone: str) -> dict[Any, Decimal]:
        params = {"from": months[0].isoformat(), "to": months[1].isoformat(), "windowSize": size,
                  "windowTimeZone": zone, "groupBy": ["subject", *m.group_fields]}
        res = http.get(f"/api/v1/meters/{m.slug}/query", params=params)
        assert res.status_code == 200, res.text
        return response_windows(json.loads(res.text, parse_float=Decimal), m.group_fields)

    def check(when: str, *, kept: bool) -> None:
        """Each shape twice: the second is a kept answer (only the check sent) when `kept`."""
        for m in METERS:
            for size, zone in (("HOUR", "UTC"), ("DAY", "Asia/Kathmandu"), ("MONTH", "America/St_Johns")):
                want = expected(counted, m, start=months[0], end=months[1], window=size, tz=zone,
                                group_by=m.group_fields)
                assert ask_months(m, size, zone) == want, f"{when}: {m.slug} {size} {zone}"
                hits = store.answers.hits
                assert ask_months(m, size, zone) == want, f"{when}, again: {m.slug} {size} {zone}"
                assert store.answers.hits == hits + (1 if kept else 0), f"{when}: {m.slug} {size} {zone}"

    check("after compaction", kept=True)
    assert store.answers.rows > 0
    # The other tenant's answer of the same shape is its own (the namespace is part of what is kept).
    m = METERS[0]
    tenant = store.scoped("other")
    ours = store.scoped("default").meter(m.slug, "SUM", start=months[0], end=months[1], window_size="DAY",
                                         group_by=m.group_fields)
    for kept in (False, True):
        hits = store.answers.hits
        got = {(r.bucket, r.group.get("model"), r.group.get("type")): r.value for r in tenant.meter(
            m.slug, "SUM", start=months[0], end=months[1], window_size="DAY", group_by=m.group_fields)}
        assert store.answers.hits == hits + kept
        want_other: dict[Any, Decimal] = {}
        for (bucket, _, groups), value in expected(other, m, start=months[0], end=months[1], window="DAY",
                                                   group_by=m.group_fields).items():
            want_other[(bucket, *groups)] = want_other.get((bucket, *groups), Decimal(0)) + value
        assert got == want_other and len(got) < len(ours)

    # A late message written into compacted February through the fence: every kept answer of February is
    # dead at once (the check fails, February is read from minute rows), and the answers count it.
    late = {**factory.event(when=datetime(2024, 2, 28, 9, 0, 3, tzinfo=UTC)), "type": "prompt",
            "subject": counted[0]["subject"], "data": {"tokens": 5, "model": "claude", "type": "input"},
            "id": "late-into-kept"}
    sink_write(clickhouse_url, database, [(history.MessagePosition(history.EPOCH, 0, 950_000), [late])])
    counted.append(late)
    check("after a write into a kept month", kept=False)

    # Compacted again: a new fingerprint, so new answers are kept (and equal the oracle with the write).
    assert sorted(r.outcome for r in compact_all(client, database).partitions) == ["compacted", "nothing to merge"]
    store.coarse.reload()
    check("after compacting again", kept=True)
