"""The ClickHouse client factory shared by processor, query and CLI.

Clients are built on demand from `Settings.clickhouse_url`, never at import time, and every
clickhouse-connect failure surfaces as `StorageError`, so callers need not know the driver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from meterline.core.errors import StorageError
from meterline.core.schema import ddl


def connect(url: str, *, database: str | None = None, **settings: object) -> Client:
    """A client for `http://user:password@host:port/database`; the database defaults to the URL path."""
    parts = urlsplit(url)
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


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Translate driver and network errors raised inside the block into `StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except (ClickHouseError, OSError) as exc:
        raise StorageError(str(exc)) from exc


def create_schema(client: Client, database: str) -> None:
    """Create the database and tables if missing (every statement is idempotent)."""
    with storage_errors():
        for statement in ddl(database):
            client.command(statement)
