"""The ClickHouse client factory shared by processor, query and CLI.

Clients are built on demand from `Settings.clickhouse_url`, never at import time, and every
clickhouse-connect failure surfaces as `StorageError`, so callers need not know the driver.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DataError, Error

from meterline.core.errors import QueryTimeoutError, QueryTooLargeError, StorageError, StorageRejectedError
from meterline.core.schema import (
    DEDUPE_KEYS,
    SINGLE_NODE,
    TABLES,
    Topology,
    ddl,
    generation_migrations,
    mutation_target,
    storage_name,
)

# On a cluster an INSERT into a Distributed table must return only once every shard has the rows: the
# default (a local spool sent later) would let the processor ack Kafka offsets for rows that exist only
# in one node's queue.
CLUSTER_CLIENT_SETTINGS: dict[str, object] = {"distributed_foreground_insert": 1}


def connect(url: str, *, database: str | None = None, topology: Topology = SINGLE_NODE,
            **settings: object) -> Client:
    """A client for `http://user:password@host:port/database`; the database defaults to the URL path."""
    parts = urlsplit(url)
    if topology.cluster is not None:
        settings = {**CLUSTER_CLIENT_SETTINGS, **settings}
    try:
        return clickhouse_connect.get_client(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
            secure=parts.scheme == "https",
            database=database if database is not None else "default",
            autogenerate_session_id=False,
            settings=settings or None,
        )
    except (ClickHouseError, OSError) as exc:
        raise StorageError(f"cannot reach ClickHouse at {parts.hostname}:{parts.port}: {exc}") from exc


#: Server error codes that depend only on the data sent, so retrying the same rows cannot succeed:
#: CANNOT_PARSE_TEXT, CANNOT_PARSE_INPUT_ASSERTION_FAILED, CANNOT_PARSE_DATE, CANNOT_PARSE_DATETIME,
#: TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE, CANNOT_PARSE_NUMBER, INCORRECT_DATA,
#: TOO_LARGE_STRING_SIZE, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, DECIMAL_OVERFLOW. Everything else
#: (network, memory, too many parts, a missing table an operator can restore) is worth retrying.
REJECTING_CODES = frozenset({6, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 407})

#: Server error codes of the query path's guards (see `read_guards`): TOO_MANY_ROWS (GROUP BY keys),
#: TOO_MANY_ROWS_OR_BYTES (result), TIMEOUT_EXCEEDED.
_TOO_MANY_ROWS = frozenset({158, 396})
_TIMEOUT = 159


def read_guards(max_rows: int, max_seconds: float) -> dict[str, Any]:
    """Per-query settings for the query API's client: read-only, bounded rows and time.

    `readonly=2` refuses writes and DDL yet lets these settings travel with each request;
    `max_rows_to_group_by` stops an aggregation as soon as it holds more than `max_rows` windows x series
    (e.g. MINUTE windows grouped by subject over years) instead of building it in memory; every limit
    throws rather than silently truncating an answer.
    """
    return {
        "readonly": 2,
        "max_execution_time": max_seconds,
        "max_rows_to_group_by": max_rows,
        "group_by_overflow_mode": "throw",
        "max_result_rows": max_rows,
        "result_overflow_mode": "throw",
    }


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Translate driver and network errors raised inside the block into `StorageError`, or into
    `StorageRejectedError` when ClickHouse refused the data itself (see REJECTING_CODES)."""

    """Translate driver and network errors raised inside the block into `StorageError`.

    A guard of `read_guards` that fired becomes `QueryTooLargeError` (400: narrow the query) or
    `QueryTimeoutError` (503), never a generic storage failure.
    """
    try:
        yield
    except StorageError:
        raise
    except Error as exc:
        if exc.code in _TOO_MANY_ROWS:
            raise QueryTooLargeError(
                "groupBy", "the answer would exceed the query cost ceiling (windows x series): narrow from/to, "
                "use a larger windowSize, or group by fewer keys"
            ) from exc
        if exc.code == _TIMEOUT:
            raise QueryTimeoutError("the query ran past max_execution_time") from exc
        # A DataError without a server code is the driver failing to encode a value (e.g. a year-9999
        # DateTime): nothing was sent, and the same rows will fail the same way.
        if exc.code in REJECTING_CODES or (isinstance(exc, DataError) and exc.code is None):
            raise StorageRejectedError(str(exc)) from exc
        raise StorageError(str(exc)) from exc
    except (ClickHouseError, OSError) as exc:
        raise StorageError(str(exc)) from exc


@contextlib.contextmanager
def insert_errors() -> Iterator[None]:
    """`storage_errors` for inserts, where the driver serialises rows first: a value it cannot encode
    (a Python error before anything is sent) is a refusal of the data too."""
    with storage_errors():
        try:
            yield
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            raise StorageRejectedError(f"rows cannot be encoded: {type(exc).__name__}: {exc}") from exc


def mutate(client: Client, statement: str, *, topology: Topology = SINGLE_NODE,
           parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> None:
    """Run a mutation (`DELETE FROM mutation_target(...)`) wherever the rows are stored.

    One statement does it on one server, and on a cluster with distributed DDL (`ON CLUSTER`). A cluster
    without it (`topology.nodes`, the embedded test cluster) refuses `ON CLUSTER`, and a statement sent
    to one node would leave the other shards' rows, so it runs on every node's local table in turn.
    Deletes are idempotent, so a failure part-way is repaired by running the whole mutation again.
    """
    if topology.cluster is None or topology.on_cluster or not topology.nodes:
        client.command(statement, parameters=parameters, settings=settings)
        return
    for url in topology.nodes:
        node = connect(url, database=client.database)
        try:
            node.command(statement, parameters=parameters, settings=settings)
        finally:
            node.close()


def create_schema(client: Client, database: str, topology: Topology = SINGLE_NODE) -> None:
    """Create the database and tables if missing and add missing columns (every statement is idempotent).

    On a cluster nothing is sent when the connected node already has every table and column: each
    ON CLUSTER statement is a task every node executes through the keeper, too much for every worker start.
    """
    with storage_errors():
        if topology.cluster is not None and not missing_columns(client, database, topology) \
                and not missing_settings(client, database, topology):
            return
        for statement in ddl(database, topology):
            client.command(statement)
        for table, statements in generation_migrations(database, topology).items():
            has = client.query(
                "SELECT count() FROM system.columns WHERE database = {db:String} AND table = {t:String}"
                " AND name = 'generation'", parameters={"db": database, "t": storage_name(table, topology)},
            ).result_rows[0][0]
            if not has:  # a table from before live meters (docs/design.md)
                for statement in statements:
                    client.command(statement)


def keep_dedupe_keys(client: Client, database: str, days: int, topology: Topology = SINGLE_NODE) -> bool:
    """Make `dedupe_keys` keep each row at least `days` after its broker time (a TTL); True if changed.

    The table only serves dedupe (docs/design.md, "Exactly-once effect" 7), so its rows may go once no
    message still in the log can need them: the processor passes the horizon plus the maximum lag. The
    days come from settings, so the TTL is set here rather than in the table's one declaration.
    The TTL is only ever raised: workers configured with different horizons or retentions share the
    table, and the one that needs keys longest must not lose them to another's shorter TTL (a longer
    TTL only costs storage). Lowering it is an operator's `ALTER TABLE ... MODIFY TTL`.
    """
    ttl = f"toDateTime(seen_at) + toIntervalDay({int(days)})"
    with storage_errors():
        engine = client.query(
            "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": database, "t": storage_name(DEDUPE_KEYS, topology)},
        ).result_rows
        current = re.search(r"TTL toDateTime\(seen_at\) \+ toIntervalDay\((\d+)\)", str(engine[0][0]) if engine else "")
        if current is not None and int(current.group(1)) >= days:
            return False
        client.command(f"ALTER TABLE {mutation_target(database, DEDUPE_KEYS, topology)} MODIFY TTL {ttl}")
    return True


def missing_settings(client: Client, database: str, topology: Topology = SINGLE_NODE) -> list[str]:
    """`table.setting` of `Table.settings` that the connected node's table was created without."""
    wanted = {storage_name(t.name, topology): [x.split("=")[0].strip() for x in t.settings] for t in TABLES
              if t.settings}
    rows = client.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = {db:String} AND name IN {n:Array(String)}",
        parameters={"db": database, "n": sorted(wanted)},
    ).result_rows
    created: dict[str, str] = {str(name): str(query) for name, query in rows}
    return sorted(f"{table}.{name}" for table, names in wanted.items() for name in names
                  if name not in created.get(table, ""))


def missing_columns(client: Client, database: str, topology: Topology = SINGLE_NODE) -> list[str]:
    """`table.column` that `ddl` creates and the connected node lacks, sorted (a missing table lists all)."""
    names = {name for table in TABLES for name in {table.name, storage_name(table.name, topology)}}
    wanted = {f"{name}.{column}" for table in TABLES for name in {table.name, storage_name(table.name, topology)}
              for column in table.column_names()}
    present = client.query(
        "SELECT table, name FROM system.columns WHERE database = {db:String} AND table IN {names:Array(String)}",
        parameters={"db": database, "names": sorted(names)},
    ).result_rows
    return sorted(wanted - {f"{row[0]}.{row[1]}" for row in present})
