"""The ClickHouse client factory shared by processor, query and CLI.

Clients are built on demand from `Settings.clickhouse_url`, never at import time, and every
clickhouse-connect failure surfaces as `StorageError`, so callers need not know the driver.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DataError, Error

from meterline.core.errors import StorageError, StorageRejectedError
from meterline.core.schema import SINGLE_NODE, TABLES, Topology, ddl, storage_name

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
            username=parts.username or "default",
            password=parts.password or "",
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


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Translate driver and network errors raised inside the block into `StorageError`, or into
    `StorageRejectedError` when ClickHouse refused the data itself (see REJECTING_CODES)."""
    try:
        yield
    except StorageError:
        raise
    except Error as exc:
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


def create_schema(client: Client, database: str, topology: Topology = SINGLE_NODE) -> None:
    """Create the database and tables if missing and add missing columns (every statement is idempotent).

    On a cluster nothing is sent when the connected node already has every table and column: each
    ON CLUSTER statement is a task every node executes through the keeper, too much for every worker start.
    """
    with storage_errors():
        if topology.cluster is not None and not missing_columns(client, database, topology):
            return
        for statement in ddl(database, topology):
            client.command(statement)


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
