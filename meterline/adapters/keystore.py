"""The `api_keys` table: add, list and revoke keys (the `meterline keys` CLI) and load them (servers).

Rows are versioned (ReplacingMergeTree(updated_at), read FINAL): revoking writes a newer version with
`revoked_at` set, so no UPDATE is needed and every process converges on the newest row when it reloads.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from meterline.adapters.clickhouse import storage_errors
from meterline.core.access import Scope
from meterline.core.keys import ApiKey
from meterline.core.schema import API_KEY_COLUMNS, API_KEYS, qualified
from meterline.core.times import as_utc


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def _row(key: ApiKey, updated_at: datetime) -> list[Any]:
    return [
        key.key_id, key.namespace, sorted(s.value for s in key.scopes), key.key_hash, key.name,
        key.created_at, key.expires_at, key.revoked_at, updated_at,
    ]


def _key(row: dict[str, Any]) -> ApiKey:
    created = _utc(row["created_at"])
    assert created is not None
    return ApiKey(
        key_id=row["key_id"], namespace=row["namespace"], scopes=frozenset(Scope(s) for s in row["scopes"]),
        key_hash=row["key_hash"], name=row["name"], created_at=created,
        expires_at=_utc(row["expires_at"]), revoked_at=_utc(row["revoked_at"]),
    )


class KeyStore:
    """Reads and writes `api_keys` through one clickhouse-connect client."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.table = qualified(database, API_KEYS)

    def add(self, key: ApiKey) -> None:
        self._write(key, key.created_at)

    def _write(self, key: ApiKey, updated_at: datetime) -> None:
        with storage_errors():
            self.client.insert(self.table, [_row(key, updated_at)], column_names=list(API_KEY_COLUMNS))

    def all(self) -> dict[str, ApiKey]:
        """Every key's newest version, by key id (revoked and expired ones included)."""
        with storage_errors():
            result = self.client.query(f"SELECT {', '.join(API_KEY_COLUMNS)} FROM {self.table} FINAL")
        names = result.column_names
        keys = (_key(dict(zip(names, r, strict=True))) for r in result.result_rows)
        return {k.key_id: k for k in keys}

    def revoke(self, key_id: str, now: datetime) -> ApiKey | None:
        """Mark a key revoked from `now` on; None if no such key. Revoking twice keeps the first time."""
        key = self.all().get(key_id)
        if key is None:
            return None
        if key.revoked_at is None:
            key = dataclasses.replace(key, revoked_at=now)
            self._write(key, now)
        return key
