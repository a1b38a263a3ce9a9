"""Stored data at sizes ingest cannot reach in a bench run: what the pipeline would have written for N
events, written by ClickHouse itself (`INSERT ... SELECT FROM numbers(...)`).

Why: P3's cost curve and P5's reload go to 100M events; through ingest, Kafka and a worker that is hours
on two cores. What those figures read is only the stored rows, so they are generated with the shapes
`processor/sink.py` writes: an `events` row per event (dedupe key, position, broker time, JSON `data` as
ingest normalises it), its `dedupe_keys` row (`sink.dedupe_key_rows`), and one `meter_windows` delta row
per (meter, subject, minute, group, message) for the bench's three meters (bench/workload.py), with the
counts, sums, uniques and LATEST rank `meterline.core.accumulator.MessageWindows` gives.
tests/integration/test_bench_generate.py holds generated rows against the processor's own row builder
fed the generated events (every window row equal) and every key against `dedupe_key`.

Event n: message n // message_events (events of a subject come in runs of `SUBJECT_RUN`, one subject per
run drawn heavy-tailed, as bench/p3_query.py describes), on partition message % partitions at offset
message // partitions (offsets dense per partition, as a broker assigns them), batch index
n % message_events; times spread evenly over `days` from `start`, the broker time of a message that of
its last event. The dedupe key is blake2b, which ClickHouse lacks: Python hashes the ids (in
`workers` processes) into a scratch table, and `events` and `dedupe_keys` are selected from it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from bench.infra import scalar_int
from bench.workload import EVENT_TYPE, MODELS, SUBJECT_RUN
from meterline.adapters.clickhouse import connect
from meterline.core.rows import RANK_SCALE
from meterline.core.schema import (
    DEDUPE_KEY_COLUMNS,
    DEDUPE_KEYS,
    EVENT_COLUMNS,
    EVENTS,
    METER_WINDOWS,
    WINDOW_COLUMNS,
)

SOURCE = "bench"
#: Events per INSERT: bounds ClickHouse's memory for the windows' GROUP BY, and reports progress.
CHUNK = 10_000_000
#: Ids hashed per scratch-table insert.
KEY_CHUNK = 1_000_000
KEYS_TABLE = "bench_generated_keys"
#: Read timeout of the `OPTIMIZE ... FINAL` statements: one merge of a table's every part, on one core. At 100M
#: events on the loaded machine the `events` merge outlasted clickhouse_connect's default 300 s and the run
#: failed on it (2026-12-01, P5's 100M reload, load average ~11).
MERGE_TIMEOUT = 3 * 3600
#: The tables `fill` writes, each merged to one part per partition by default.
TABLES = (EVENTS, DEDUPE_KEYS, METER_WINDOWS)

#: The events columns written (those added later keep their defaults: namespace `default`, no rejections).
FILLED_EVENT_COLUMNS = EVENT_COLUMNS[: EVENT_COLUMNS.index("validation_errors") + 1]
#: The meter_windows columns written (namespace keeps its default, `default`).
FILLED_WINDOW_COLUMNS = WINDOW_COLUMNS[: WINDOW_COLUMNS.index("generation") + 1]
#: The meters of bench/workload.py's CONFIG whose windows are generated.
METERS = ("tokens_total", "prompt_count", "active_users")


@dataclass(frozen=True)
class Layout:
    """Which events, on which log positions. `log_epoch` should differ from the live broker's when a
    worker later reads the same partitions: positions of generated rows must not be live offsets."""

    events: int
    start: datetime
    days: int = 30
    subjects: int = 100
    message_events: int = SUBJECT_RUN
    partitions: int = 1
    log_epoch: str = "bench"

    @property
    def span_ms(self) -> int:
        return self.days * 86_400_000


def zipf_rank(message: str, subjects: int) -> str:
    """SQL for a subject rank in [0, subjects) drawn per message: P(rank <= r) = ln(r + 2) / ln(subjects + 1)."""
    u = f"(intHash64({message}) % 1000000) / 1000000"
    return f"least({subjects - 1}, toUInt32(floor(exp({u} * log({subjects + 1}))) - 1))"


def _ms_after_start(layout: Layout, n: str, scale: int) -> str:
    return (f"addMilliseconds(toDateTime64('{layout.start:%Y-%m-%d %H:%M:%S}', {scale}, 'UTC'), "
            f"intDiv({n} * {layout.span_ms}, {layout.events}))")


def rows_sql(layout: Layout, source: str, extra: str = "") -> str:
    """One row per event `number` of `source` (`numbers(...)` or the keys table): every value the
    tables are filled from, so `events` and `meter_windows` describe the same usage."""
    me, parts = layout.message_events, layout.partitions
    models = "[" + ",".join(f"'{m}'" for m in MODELS) + "]"
    last = f"least(intDiv(number, {me}) * {me} + {me - 1}, {layout.events - 1})"
    return f"""
        SELECT
            number AS n,
            intDiv(number, {me}) AS message,
            toUInt32(message % {parts}) AS partition,
            intDiv(message, {parts}) AS offset,
            toUInt32(number % {me}) AS idx,
            concat('customer-', toString({zipf_rank(f"intDiv(number, {SUBJECT_RUN})", layout.subjects)})) AS subject,
            {_ms_after_start(layout, "number", 6)} AS t,
            {_ms_after_start(layout, last, 3)} AS ingested,
            intHash32(number) % 1000 + 1 AS tokens,
            arrayElement({models}, intHash64(number) % {len(MODELS)} + 1) AS model,
            concat('user-', toString(number % 997)) AS user,
            offset * {RANK_SCALE} + idx AS rank{extra}
        FROM {source}
    """


def _window_selects(layout: Layout, generation: int, gen: str) -> list[str]:
    """Per meter, the SELECT of its `meter_windows` rows (FILLED_WINDOW_COLUMNS order)."""
    epoch = _quote(layout.log_epoch)
    value = "toDecimal128(tokens, 9)"
    latest = "max(t), {value}, tupleElement(max((t, rank)), 2), " + str(generation)
    by_model = "concat('{\"model\":\"', model, '\"}'), map('model', model)"
    no_group = "'{}', map()"
    out = []
    for meter, group, group_by, measures, latest_value in (
        ("tokens_total", by_model, ", model",
         f"count(), sum({value}), min({value}), max({value}), []", f"argMax({value}, (t, rank))"),
        ("prompt_count", by_model, ", model", "count(), toDecimal128(0, 9), NULL, NULL, []", "NULL"),
        ("active_users", no_group, "", "count(), toDecimal128(0, 9), NULL, NULL, arraySort(groupUniqArray(user))",
         "NULL"),
    ):
        out.append(f"""
            SELECT '{meter}', subject, toStartOfMinute(t) AS ws, {group}, {epoch}, partition, offset,
                   {measures}, {latest.format(value=latest_value)}
            FROM ({gen})
            GROUP BY subject, ws{group_by}, partition, offset
        """)
    return out


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key_chunk(url: str, database: str, lo: int, hi: int) -> int:
    """Hash ids lo..hi-1 (as `meterline.core.positions.dedupe_key` of (SOURCE, id) in the default
    namespace) into the keys table, as RowBinary (UInt64 number, FixedString(16) key)."""
    prefix = len(SOURCE).to_bytes(4, "big") + SOURCE.encode()
    blake = hashlib.blake2b
    parts: list[bytes] = []
    for i in range(lo, hi):
        s = str(i).encode()
        parts.append(i.to_bytes(8, "little"))
        parts.append(blake(prefix + len(s).to_bytes(4, "big") + s, digest_size=16).digest())
    client = connect(url, database=database)
    try:
        client.raw_insert(KEYS_TABLE, ["number", "dedupe_key"], b"".join(parts), fmt="RowBinary")
    finally:
        client.close()
    return hi - lo


def fill(client: Client, url: str, database: str, layout: Layout, *, windows: bool = True, generation: int = 1,
         workers: int = 2, optimize: tuple[str, ...] = TABLES,
         on_progress: Callable[[str, int], None] = lambda what, n: None) -> dict[str, Any]:
    """Write `layout`'s events (and their dedupe keys, and with `windows` the three meters' windows
    under `generation`) into `database`, which must hold meterline's schema; `url` is the server's (for
    the hashing processes and the merges). The `optimize` tables get every part merged (what background
    merges reach on their own), so every run reads one layout; a figure that never reads a table leaves it
    out (its merge is minutes at 100M). Returns row counts and seconds per step."""
    n = layout.events
    timings: dict[str, float] = {}
    client.command(f"DROP TABLE IF EXISTS {KEYS_TABLE}")
    client.command(f"CREATE TABLE {KEYS_TABLE} (number UInt64, dedupe_key FixedString(16)) "
                   "ENGINE = MergeTree ORDER BY number")
    try:
        t0 = time.perf_counter()
        ranges = [(lo, min(lo + KEY_CHUNK, n)) for lo in range(0, n, KEY_CHUNK)]
        if workers > 1 and len(ranges) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for done in pool.map(_key_chunk, *zip(*[(url, database, lo, hi) for lo, hi in ranges], strict=True)):
                    on_progress("keys", done)
        else:
            for lo, hi in ranges:
                on_progress("keys", _key_chunk(url, database, lo, hi))
        timings["keys_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        epoch = _quote(layout.log_epoch)
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            keyed = rows_sql(layout, f"{KEYS_TABLE} WHERE number >= {lo} AND number < {hi}", ", dedupe_key")
            client.command(f"""
                INSERT INTO {EVENTS} ({", ".join(FILLED_EVENT_COLUMNS)})
                SELECT dedupe_key, toString(n), '{SOURCE}', '{EVENT_TYPE}', subject, t,
                       concat('{{"tokens":', toString(tokens), ',"model":"', model, '","user":"', user, '"}}'),
                       ingested, {epoch}, partition, offset, idx, []
                FROM ({keyed})
            """, settings={"max_insert_threads": 2})
            client.command(f"""
                INSERT INTO {DEDUPE_KEYS} ({", ".join(DEDUPE_KEY_COLUMNS)})
                SELECT dedupe_key, {epoch}, partition, offset, idx, ingested FROM ({keyed})
            """)
            if windows:
                gen = rows_sql(layout, f"numbers({lo}, {hi - lo})")
                for select in _window_selects(layout, generation, gen):
                    client.command(f"INSERT INTO {METER_WINDOWS} ({', '.join(FILLED_WINDOW_COLUMNS)}) {select}")
            on_progress("rows", hi - lo)
        timings["rows_seconds"] = time.perf_counter() - t0
    finally:
        client.command(f"DROP TABLE IF EXISTS {KEYS_TABLE}")
    if optimize:
        t0 = time.perf_counter()
        merger = clickhouse_connect.get_client(dsn=url, database=database, autogenerate_session_id=False,
                                               send_receive_timeout=MERGE_TIMEOUT)
        try:
            for table in optimize:
                started = time.perf_counter()
                merger.command(f"OPTIMIZE TABLE {table} FINAL")
                timings[f"optimize_{table}_seconds"] = time.perf_counter() - started
        finally:
            merger.close()
        timings["optimize_seconds"] = time.perf_counter() - t0
    counts = {table: scalar_int(client, f"SELECT count() FROM {table}")
              for table in (EVENTS, DEDUPE_KEYS, METER_WINDOWS)}
    return {"events_rows": counts[EVENTS], "dedupe_keys_rows": counts[DEDUPE_KEYS],
            "window_rows": counts[METER_WINDOWS], "message_events": layout.message_events,
            "partitions": layout.partitions, "subjects": layout.subjects,
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **{k: round(v, 2) for k, v in timings.items()}}
