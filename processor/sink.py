"""ClickHouse writes of the processor, retried until they succeed -- unless ClickHouse refused the data.

Transient failures (network, a server restarting, too many parts, a table an operator must restore)
are retried with backoff for ever. A refusal of the data itself (`StorageRejectedError`: a value
ClickHouse cannot parse or hold) would fail identically for ever, so it is raised at once and the
processor quarantines the message (processor/agents.py) instead of stalling its partition.

Why retry forever instead of failing the batch: the Kafka offsets of a batch are acked only after its
rows are written (docs/design.md, "Exactly-once effect"). While ClickHouse is down the stream simply
stalls -- nothing is acked, nothing is lost -- and resumes where it stopped. Every row is idempotent
(ReplacingMergeTree identity), so a write that failed *after* ClickHouse applied it is harmless to repeat.
Inserts are synchronous (`async_insert=0`): an ack must mean the rows are in a part on disk.

clickhouse-connect is blocking, so `write` runs it in a thread to keep Faust's event loop (heartbeats,
fetching) alive while ClickHouse is slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from clickhouse_connect.driver import options as driver_options
from clickhouse_connect.driver.client import Client

from meterline.adapters.clickhouse import (
    connect,
    create_schema,
    insert_errors,
    keep_dedupe_keys,
    mutate,
    storage_errors,
)
from meterline.adapters.compactions import ReplayGuard
from meterline.core.cluster import MessagePosition, exact_read_settings, insert_settings, insert_token
from meterline.core.errors import StorageError, StorageRejectedError
from meterline.core.retraction import WINDOW_IDENTITY_COLUMNS, Loser
from meterline.core.rows import MessagePosition as RowsMessagePosition
from meterline.core.rows import Rows
from meterline.core.schema import (
    DEAD_LETTER_COLUMNS,
    DEAD_LETTERS,
    DEDUPE_KEY_COLUMNS,
    DEDUPE_KEYS,
    EVENT_COLUMNS,
    EVENTS,
    METER_WINDOWS,
    PARTITION_PROGRESS,
    PARTITION_PROGRESS_COLUMNS,
    SINGLE_NODE,
    STORED_EVENT_COLUMNS,
    WINDOW_COLUMNS,
    Topology,
    mutation_target,
    qualified,
    quote_identifier,
)
from meterline.core.times import as_utc
from processor import metrics
from processor.columns import fast_types, ticked
from processor.key_backfill import backfill_dedupe_keys, newest_backfill

logger = logging.getLogger(__name__)

#: `optimize_on_insert=0`: ClickHouse would otherwise run ReplacingMergeTree's merge over every inserted block
#: to collapse rows sharing a sorting key within it, ~25% of the CPU of an `events` or `dedupe_keys` insert
#: (docs/performance.md, "Where the time goes"). A batch's rows never share an identity (one row per position, window
#: or first sighting), and where they could, FINAL and merges collapse them exactly as they collapse copies
#: that arrived in two inserts: the rows a reader sees are the same.
INSERT_SETTINGS: dict[str, object] = {"async_insert": 0, "wait_for_async_insert": 1, "optimize_on_insert": 0}
# Where (log_epoch, kafka_partition, kafka_offset) start in an events row and a dead-letter row.
EVENT_EPOCH = EVENT_COLUMNS.index("log_epoch")
DEAD_EPOCH = DEAD_LETTER_COLUMNS.index("log_epoch")
#: Bytes a by-key dedupe load may sort in ClickHouse's memory before it sorts on disk: the server
#: should not have to hold a large partition's sort columns (~40 bytes a key) beside its other work.
SORT_IN_MEMORY_BYTES = 256 * 1024 * 1024

# What a `dedupe_keys` row copies from its `events` row (DEDUPE_KEY_COLUMNS order).
KEY_FROM_EVENT = tuple(EVENT_COLUMNS.index(c) for c in (
    "dedupe_key", "log_epoch", "kafka_partition", "kafka_offset", "batch_index", "ingested_at"))
# Which meter version built a row: part of the insert tokens' salt.
WINDOW_METER, WINDOW_GENERATION = WINDOW_COLUMNS.index("meter"), WINDOW_COLUMNS.index("generation")
DEAD_METER, DEAD_GENERATION = DEAD_LETTER_COLUMNS.index("meter"), DEAD_LETTER_COLUMNS.index("generation")


def dedupe_load_query(database: str, partition: int, keep_days: int,
                      since: tuple[str, int] | None, *, by_key: bool = False) -> tuple[str, dict[str, Any]]:
    """SQL + parameters loading one partition's first sightings of the last `keep_days` (broker time): the
    dedupe horizon plus the maximum lag, so what a lagging worker still compares with is loaded too.

    `since=(log_epoch, offset)` restricts to what was written after the local marker. It reads
    `dedupe_keys`, a range of its sorting key (partition, epoch, offset), never `events`, whose order serves
    queries and would be scanned whole: keys stored before `dedupe_keys` existed, or under another key
    encoding, were copied into it from `events` at schema migration (processor/key_backfill.py).

    `by_key`: sorted by key (then as the table orders a key's rows), the order of the worker's RocksDB
    keys, so its load writes sorted SST files without sorting in Python (`DedupeState.load_sorted`).
    """
    sql, params = foreign_keys_query(database, {partition: since}, keep_days)
    if by_key:
        sql += " ORDER BY dedupe_key, log_epoch, kafka_offset, batch_index"
    return sql, params


def dedupe_key_rows(events: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """The `dedupe_keys` rows of a batch's `events` rows."""
    return [[row[i] for i in KEY_FROM_EVENT] for row in events]


def dedupe_key_columns(events: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
    """The `dedupe_keys` columns of a batch's `events` columns: the same values, picked, not rebuilt
    (a row-by-row copy cost the worker ~1 µs per event, docs/performance.md)."""
    return [events[i] for i in KEY_FROM_EVENT]


def foreign_keys_query(database: str, since: dict[int, tuple[str, int] | None], keep_days: int
                       ) -> tuple[str, dict[str, Any]]:
    """SQL + parameters of the stored keys of partitions `since` names, each after its marker
    `(log_epoch, next_offset)` or, for None, all of it: a range of `dedupe_keys`' sorting key per partition."""
    ranges = []
    params: dict[str, Any] = {"days": keep_days}
    for i, (partition, marker) in enumerate(sorted(since.items())):
        params[f"p{i}"] = partition
        if marker is None:
            ranges.append(f"(kafka_partition = {{p{i}:UInt32}})")
            continue
        ranges.append(f"(kafka_partition = {{p{i}:UInt32}} AND log_epoch = {{e{i}:String}} "
                      f"AND kafka_offset >= {{o{i}:UInt64}})")
        params[f"e{i}"], params[f"o{i}"] = marker
    sql = (
        "SELECT dedupe_key, log_epoch, kafka_partition, kafka_offset, batch_index, toUnixTimestamp(seen_at) "
        f"FROM {quote_identifier(database)}.{DEDUPE_KEYS} "
        f"WHERE ({' OR '.join(ranges) or '0'}) AND seen_at >= now() - toIntervalDay({{days:UInt32}})"
    )
    return sql, params


_MESSAGES = "(log_epoch, kafka_partition, kafka_offset) IN {messages:Array(Tuple(String, UInt32, UInt64))}"
_POSITIONS = ("(log_epoch, kafka_partition, kafka_offset, batch_index) IN "
              "{positions:Array(Tuple(String, UInt32, UInt64, UInt32))}")

#: Rebuilds a loser's message's window rows: (message, its stored events that stay, its stored window
#: identities, its broker time or None) -> replacement rows (`meterline.core.retraction.replacement_windows`).
Rebuild = Callable[[RowsMessagePosition, list[Sequence[Any]], list[Sequence[Any]], datetime | None], list[list[Any]]]


def retraction_reads(database: str, losers: Sequence[Loser]) -> dict[str, tuple[str, dict[str, Any]]]:
    """SQL + parameters of what a retraction reads (no FINAL: copies of one key that share the `events`
    identity collapse into one row, whose position must not hide the loser's message's other events):

    * `events`: the stored events of the losers' messages (STORED_EVENT_COLUMNS + broker time), one per
      position, in log order;
    * `windows`: the identities of those messages' stored window rows (WINDOW_IDENTITY_COLUMNS + message);
    * `keys`: every stored position of the losers' keys (is the winner's `events` row there?);
    * `claims`: the losers' `dedupe_keys` rows (a range of its sorting key each): a loser with neither
      this row nor its `events` row was retracted already (or never stored) and needs nothing more.

    Each scans its table (nothing is ordered by position): retractions are rare, and batched.
    """
    messages = sorted({tuple(loser.message) for loser in losers})
    keys = sorted({loser.key.hex().upper() for loser in losers})
    identity = ", ".join(c for c in WINDOW_IDENTITY_COLUMNS if c not in ("group", "namespace"))
    read = ", ".join(f"any({c})" if c in ("group", "namespace") else c for c in WINDOW_IDENTITY_COLUMNS)
    positions = sorted(loser.position for loser in losers)
    return {
        "events": (
            (f"SELECT {', '.join(STORED_EVENT_COLUMNS)}, ingested_at FROM {qualified(database, EVENTS)} "
             f"WHERE {_MESSAGES} ORDER BY log_epoch, kafka_partition, kafka_offset, batch_index "
             "LIMIT 1 BY log_epoch, kafka_partition, kafka_offset, batch_index"),
            {"messages": messages}),
        "windows": (
            (f"SELECT {read}, log_epoch, kafka_partition, kafka_offset "
             f"FROM {qualified(database, METER_WINDOWS)} WHERE {_MESSAGES} "
             f"GROUP BY {identity}, log_epoch, kafka_partition, kafka_offset"),
            {"messages": messages}),
        "keys": (
            ("SELECT hex(dedupe_key), log_epoch, kafka_partition, kafka_offset, batch_index "
             f"FROM {qualified(database, EVENTS)} WHERE hex(dedupe_key) IN {{keys:Array(String)}}"),
            {"keys": keys}),
        "claims": (
            ("SELECT log_epoch, kafka_partition, kafka_offset, batch_index "
             f"FROM {qualified(database, DEDUPE_KEYS)} WHERE {_POSITIONS}"),
            {"positions": positions}),
    }


def retraction_deletes(database: str, table: str, positions: Sequence[tuple[str, int, int, int]],
                       topology: Topology = SINGLE_NODE) -> tuple[str, dict[str, Any]]:
    """The lightweight DELETE of the rows of `table` (events, dead_letters, dedupe_keys) at `positions`."""
    return (f"DELETE FROM {mutation_target(database, table, topology)} WHERE {_POSITIONS}",
            {"positions": sorted(positions)})


class ClickHouseSink:
    """Writes a batch's rows (events, then dead letters, then windows) and loads dedupe state.

    The `processor.batch.Sink` of the live worker. `connect` and `sleep` are parameters so the retry
    rules have unit tests (tests/unit/test_sink.py); the worker uses clickhouse-connect and real time.
    """

    def __init__(self, url: str, database: str, *, backoff_initial: float = 0.2, backoff_max: float = 10.0,
                 connect: Callable[..., Client] = connect, sleep: Callable[[float], None] = time.sleep,
                 topology: Topology = SINGLE_NODE, token_salt: str = "",
                 replay_guard: ReplayGuard | None = None) -> None:
        self.url = url
        self.database = database
        self.topology = topology
        #: Digest of what shapes rows besides their positions (meters, row options): see `insert_token`.
        self.token_salt = token_salt
        #: Drops replayed window rows of compacted partitions (meterline/adapters/compactions.py).
        self.replay_guard = replay_guard
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._connect = connect
        self._sleep = sleep
        self._client: Client | None = None
        self._lock = threading.Lock()
        #: `tail_keys` has a client of its own: it runs before each batch is decided, while the previous
        #: batch is being written on `_client` (processor/batch.py, "Pipelining").
        self._tail_client: Client | None = None
        self._tail_lock = threading.Lock()
        self._stopping = False
        #: table -> (clickhouse-connect insert context, DateTime64 column index -> precision), made once
        self._types: dict[str, tuple[Any, dict[int, int]]] = {}
        #: True while the last ClickHouse operation failed (drives /readyz).
        self.failing = False
        #: `key_backfill.newest_backfill`, read by `ensure_schema` (for `DedupeState.since_backfill`).
        self.keys_backfill = ""

    # ------------------------------------------------------------------ connection
    def _connected(self) -> Client:
        if self._client is None:
            self._client = self._connect(self.url, database=self.database, topology=self.topology)
        return self._client

    def _reset(self) -> None:
        self._types.clear()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken client must not mask the real error
                client.close()

    def _reset_tail(self) -> None:
        client, self._tail_client = self._tail_client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def ensure_schema(self, keys_keep_days: int | None = None) -> None:
        """Create database and tables (idempotent), retrying like writes: startup waits for ClickHouse.
        `keys_keep_days`: how long `dedupe_keys` rows are kept (a TTL; see `keep_dedupe_keys`), and how far
        back they are filled from `events` if that was never done (`key_backfill`)."""
        def op() -> None:
            client = self._connect(self.url, database="default", topology=self.topology)
            try:
                create_schema(client, self.database, self.topology)
                if keys_keep_days is not None:
                    keep_dedupe_keys(client, self.database, keys_keep_days, self.topology)
                    backfill_dedupe_keys(client, self.database, keys_keep_days)
                    self.keys_backfill = newest_backfill(client, self.database)
            finally:
                client.close()
        self.retry("create_schema", op, rows=0)
        # clickhouse-connect imports pandas (if installed) on the first insert to test for DataFrames:
        # about a second, which would otherwise delay the first batch after every start or takeover.
        _ = driver_options.pd

    def stop(self) -> None:
        """Make a retry loop give up (on shutdown); the batch stays unacked and is replayed later."""
        self._stopping = True

    # ------------------------------------------------------------------ writes
    def write_sync(self, rows: Rows) -> None:
        """Insert the rows in design order; returns only once all three inserts succeeded.

        Raises `StorageRejectedError` (with `table` set to the refused table) when ClickHouse refuses
        the data itself: retrying those rows could never succeed (the caller quarantines them).
        """
        with self._lock:
            started = time.perf_counter()
            batch = self._batch_identity(rows)
            if rows.events:
                events = list(zip(*rows.events, strict=True))
                self.retry("insert events", lambda: self._insert_columns(EVENTS, events, EVENT_COLUMNS, batch),
                            rows=len(rows.events))
                # After events: a key row is never there without its event. (A crash in between leaves
                # the batch unacked; its replay writes the key rows.)
                keys = dedupe_key_columns(events)
                self.retry("insert dedupe_keys",
                           lambda: self._insert_columns(DEDUPE_KEYS, keys, DEDUPE_KEY_COLUMNS, batch),
                           rows=len(rows.events))
            if rows.dead_letters:
                self.retry("insert dead_letters",
                            lambda: self._insert(DEAD_LETTERS, rows.dead_letters, DEAD_LETTER_COLUMNS, batch),
                            rows=len(rows.dead_letters))
            if rows.windows:
                self.retry("insert meter_windows",
                            lambda: self._insert_windows(rows.windows, batch),
                            rows=len(rows.windows))
            metrics.WRITE_SECONDS.observe(time.perf_counter() - started)
            metrics.LAST_WRITE.set(time.time())

    def write_progress(self, rows: Sequence[Sequence[Any]]) -> None:
        """One attempt at storing `partition_progress` rows (they are refreshed every few seconds anyway)."""
        if rows:
            with self._lock, insert_errors():
                self._connected().insert(PARTITION_PROGRESS, rows, column_names=list(PARTITION_PROGRESS_COLUMNS),
                                         settings=INSERT_SETTINGS)

    async def write(self, rows: Rows) -> None:
        """`write_sync` off the event loop."""
        await asyncio.to_thread(self.write_sync, rows)

    def _batch_identity(self, rows: Rows) -> tuple[list[MessagePosition], str] | None:
        """(message positions, salt) of the batch's insert tokens; only on a cluster (a single server has
        no use for them). Events and dead-letter rows cover every message with rows (windows come from
        events). The salt adds the (meter, generation) pairs the rows were built with: live meters change
        definitions at run time, and a replay under a new generation must not reuse the old token."""
        if self.topology.cluster is None:
            return None
        positions = [(r[EVENT_EPOCH], r[EVENT_EPOCH + 1], r[EVENT_EPOCH + 2]) for r in rows.events] + [
            (r[DEAD_EPOCH], r[DEAD_EPOCH + 1], r[DEAD_EPOCH + 2]) for r in rows.dead_letters]
        versions = {(r[WINDOW_METER], r[WINDOW_GENERATION]) for r in rows.windows}
        versions |= {(r[DEAD_METER], r[DEAD_GENERATION]) for r in rows.dead_letters}
        salt = self.token_salt + "|" + ",".join(f"{m}@{g}" for m, g in sorted(versions))
        return positions, salt

    def _insert_windows(self, rows: Sequence[Sequence[Any]], batch: tuple[list[MessagePosition], str] | None) -> None:
        if self.replay_guard is None:
            self._insert(METER_WINDOWS, rows, WINDOW_COLUMNS, batch)
            return
        with self.replay_guard.admit(self._connected(), rows) as kept:
            if kept:
                self._insert(METER_WINDOWS, kept, WINDOW_COLUMNS, batch)

    def _insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str],
                batch: tuple[list[MessagePosition], str] | None = None) -> None:
        self._insert_columns(table, list(zip(*rows, strict=True)), columns, batch)

    def _insert_columns(self, table: str, data: Sequence[Sequence[Any]], columns: Sequence[str],
                        batch: tuple[list[MessagePosition], str] | None = None) -> None:
        token = None if batch is None else insert_token(table, batch[0], batch[1])
        settings = {**INSERT_SETTINGS, **insert_settings(self.topology, token)}
        try:
            with insert_errors():
                client = self._connected()
                context, datetime64 = self._insert_context(client, table, columns)
                context.settings = settings
                # One Native block per insert: clickhouse-connect would cut an `events` batch into ~2 MB
                # blocks (3 for 20k events), costing the worker ~7 ms per batch in slicing and per-block
                # encoding, and ClickHouse squashes them back into one part anyway.
                context.req_block_size = max(1, len(data[0]) if data else 1)
                payload = ticked(data, datetime64)
                try:
                    client.insert(data=payload, context=context)
                finally:
                    # The context keeps what it was handed until its next insert: emptied, the batch's columns
                    # (~2 lists an event) go when the write returns.
                    context.data = None
                    payload.clear()
        except StorageRejectedError as exc:
            exc.table = table  # type: ignore[attr-defined]
            raise

    def _insert_context(self, client: Client, table: str, columns: Sequence[str]) -> tuple[Any, dict[int, int]]:
        """The table's insert context (and its DateTime64 columns: index -> precision), made once per
        connection instead of once per insert: its column types are asked once, not by a `DESCRIBE` per
        insert, and reused (clickhouse-connect's documented use of a context). A context refers to itself
        (a bound method it keeps), so one made per insert was cyclic garbage, ~5 objects an insert, left for
        the worker's GC, which runs rarely (processor/app.py)."""
        if table not in self._types:
            types = fast_types(client.create_insert_context(table, list(columns)).column_types)
            datetime64 = {i: int(getattr(t, "scale")) for i, t in enumerate(types)  # noqa: B009 - DateTime64 only
                          if type(t).__name__ == "DateTime64" and not t.nullable}
            context = client.create_insert_context(table, list(columns), column_types=types, column_oriented=True)
            self._types[table] = (context, datetime64)
        return self._types[table]

    def retry(self, what: str, op: Callable[[], Any], *, rows: int, reset: Callable[[], None] | None = None) -> Any:
        """Run `op` until it succeeds: exponential backoff with jitter (a wait in [d/2, d], d doubling
        from `backoff_initial` up to `backoff_max`). Only storage and socket errors are retried;
        after `stop()` the next failure is raised instead. `reset` drops the client `op` used (default:
        the writes' client)."""
        attempt = 0
        delay = self.backoff_initial
        while True:
            try:
                result = op()
                self.failing = False
                return result
            except StorageRejectedError:
                self.failing = False  # ClickHouse answered; the data is at fault, not the connection
                raise
            except (StorageError, OSError) as exc:
                attempt += 1
                self.failing = True
                metrics.WRITE_RETRIES.labels(operation=what.split()[0]).inc()
                (reset or self._reset)()
                if self._stopping:
                    raise
                sleep = random.uniform(delay / 2, delay)
                logger.warning(
                    "clickhouse %s failed; retrying", what,
                    extra={"operation": what, "attempt": attempt, "rows": rows,
                           "retry_in_seconds": round(sleep, 3), "error": str(exc)[:500]},
                )
                self._sleep(sleep)
                delay = min(delay * 2, self.backoff_max)

    # ------------------------------------------------------------------ dedupe loading
    def load_dedupe(self, partition: int, keep_days: int, since: tuple[str, int] | None,
                    merge: Callable[[Iterable[Sequence[Any]]], int]) -> int:
        """Stream the `(dedupe_key, log_epoch, partition, offset, index, seen_at)` rows `dedupe_keys` holds for
        one partition into `merge` (blocking; run it in a thread). Streaming keeps memory flat for millions of keys;
        on failure the whole load is retried, which is harmless because merging is idempotent.
        """
        sql, params = dedupe_load_query(self.database, partition, keep_days, since)

        def op() -> int:
            with storage_errors(), self._connected().query_row_block_stream(
                    sql, parameters=params, settings=exact_read_settings(self.topology) or None) as stream:
                return merge(row for block in stream for row in block)

        with self._lock:
            return int(self.retry(f"load dedupe partition {partition}", op, rows=0))

    def load_dedupe_by_key(self, partition: int, keep_days: int,
                           merge: Callable[[Iterable[Sequence[Sequence[Any]]]], int], *, foreign: bool = False) -> int:
        """`load_dedupe` of a whole partition sorted by key, streamed as column blocks (the same six
        columns): what `DedupeState.load_sorted` writes as SST files without a Python step per row.
        ClickHouse sorts on disk past `SORT_IN_MEMORY_BYTES` (a 25M-key partition is ~1 GB to sort).
        `foreign`: another worker's partition, read on the tail's client (`tail_keys`), which a write in
        flight does not hold."""
        sql, params = dedupe_load_query(self.database, partition, keep_days, None, by_key=True)
        settings = {**exact_read_settings(self.topology), "max_bytes_before_external_sort": SORT_IN_MEMORY_BYTES}

        def op() -> int:
            if foreign and self._tail_client is None:
                self._tail_client = self._connect(self.url, database=self.database, topology=self.topology)
            client = self._tail_client if foreign and self._tail_client is not None else self._connected()
            with storage_errors(), client.query_column_block_stream(sql, parameters=params, settings=settings) as stream:
                return merge(stream)

        with self._tail_lock if foreign else self._lock:
            return int(self.retry(f"load dedupe partition {partition} by key", op, rows=0,
                                  reset=self._reset_tail if foreign else None))

    def tail_keys(self, since: dict[int, tuple[str, int] | None], keep_days: int,
                  merge: Callable[[int, Iterable[Sequence[Any]]], int]) -> int:
        """Feed the keys stored for each partition of `since` after its marker (None: all of it) to
        `merge(partition, rows)` (blocking; rows as in `load_dedupe`). One query, one range of
        `dedupe_keys` per partition."""
        if not since:
            return 0
        sql, params = foreign_keys_query(self.database, since, keep_days)

        def op() -> int:
            with storage_errors():
                if self._tail_client is None:
                    self._tail_client = self._connect(self.url, database=self.database, topology=self.topology)
                found = self._tail_client.query(sql, parameters=params,
                                                settings=exact_read_settings(self.topology) or None).result_rows
            by_partition: dict[int, list[Sequence[Any]]] = {p: [] for p in since}
            for row in found:
                by_partition[int(row[2])].append(row)
            return sum(merge(p, rows) for p, rows in by_partition.items())

        with self._tail_lock:
            return int(self.retry("tail dedupe keys", op, rows=0, reset=self._reset_tail))

    # ------------------------------------------------------------------ retractions
    def retract(self, losers: Sequence[Loser], rebuild: Rebuild) -> list[tuple[Loser, bool]]:
        """Make stored copies that lost (`meterline.core.retraction`) stop counting; blocking, retried
        like writes. Returns each loser with whether it is undone (False: its month's windows were
        compacted before the retraction, which can no longer replace its rows; it stays counted).

        Order, so that a crash anywhere leaves the conflict to be found again: the windows of each
        loser's message are replaced first; then its dead letters are deleted; then its `events` row --
        only where the winner's `events` row is stored: copies with the same subject and time share the
        row's identity, and when ClickHouse has already collapsed the two into the loser's, deleting it
        would lose the event from the raw reads (that row then stays; it counts once anyway); its
        `dedupe_keys` row goes last, since that is what a worker's reload of the partition reads (a lost
        cache meets the conflict there again). Every step is idempotent: the rows are rebuilt from what
        is stored.
        """
        if not losers:
            return []
        reads = retraction_reads(self.database, losers)

        def read(name: str) -> list[Sequence[Any]]:
            sql, params = reads[name]
            with storage_errors():
                return list(self._connected().query(
                    sql, parameters=params, settings=exact_read_settings(self.topology) or None).result_rows)

        def op() -> list[tuple[Loser, bool]]:
            keys, claims = read("keys"), read("claims")
            in_events = {(str(e), int(p), int(o), int(i)) for _, e, p, o, i in keys}
            stored = in_events | {(str(e), int(p), int(o), int(i)) for e, p, o, i in claims}
            todo = [loser for loser in losers if loser.position in stored]
            if not todo:
                return [(loser, True) for loser in losers]
            events, windows = read("events"), read("windows")
            lost = {loser.position for loser in losers}
            rows: list[list[Any]] = []
            for message in sorted({loser.message for loser in todo}):
                mine = [r for r in events if tuple(r[:3]) == tuple(message)]
                received = as_utc(mine[0][len(STORED_EVENT_COLUMNS)]) if mine else None
                kept = [r[:len(STORED_EVENT_COLUMNS)] for r in mine if tuple(r[:4]) not in lost]
                identities = [r[:len(WINDOW_IDENTITY_COLUMNS)] for r in windows if tuple(r[-3:]) == tuple(message)]
                rows += rebuild(message, kept, identities, received)
            undone = set(self._replace_windows(rows, todo))
            done = [loser for loser in todo if loser.message in undone]
            positions = [loser.position for loser in done]
            if positions:
                self._delete(DEAD_LETTERS, positions)
                safe = [loser.position for loser in done
                        if loser.winner_position in in_events]
                if safe:
                    self._delete(EVENTS, safe)
                self._delete(DEDUPE_KEYS, positions)  # last: what a lost cache's reload finds again
            return [(loser, loser not in todo or loser.message in undone) for loser in losers]

        with self._lock:
            return list(self.retry("retract losing copies", op, rows=len(losers)))

    def _replace_windows(self, rows: list[list[Any]], losers: Sequence[Loser]) -> list[RowsMessagePosition]:
        """Insert the replacement window rows; returns the messages whose rows all got in (a compacted
        month's fence drops rows at or below its watermark: those messages cannot be undone any more)."""
        messages = sorted({loser.message for loser in losers})
        if not rows:
            return messages
        batch = None
        if self.topology.cluster is not None:
            salt = "retract|" + self.token_salt + "|" + ",".join(
                f"{e}:{p}:{o}:{i}" for e, p, o, i in sorted(x.position for x in losers))
            batch = ([tuple(m) for m in messages], salt)
        if self.replay_guard is None:
            self._insert(METER_WINDOWS, rows, WINDOW_COLUMNS, batch)  # type: ignore[arg-type]
            return messages
        with self.replay_guard.admit(self._connected(), rows) as kept:
            if kept:
                self._insert(METER_WINDOWS, kept, WINDOW_COLUMNS, batch)  # type: ignore[arg-type]
            identities = {id(r) for r in kept}
            dropped = {(r[5], r[6], r[7]) for r in rows if id(r) not in identities}
        return [m for m in messages if tuple(m) not in dropped]

    def _delete(self, table: str, positions: Sequence[tuple[str, int, int, int]]) -> None:
        sql, params = retraction_deletes(self.database, table, positions, self.topology)
        with storage_errors():
            mutate(self._connected(), sql, topology=self.topology, parameters=params,
                   settings={"mutations_sync": 2})
