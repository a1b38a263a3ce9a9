"""The `portal_tokens` table: record minted portal tokens, list them, invalidate them by id or subject.

Tokens verify by signature alone; this table exists for `listPortalTokens` and for invalidation, whose
ids every process reloads every few seconds (only those not yet expired: an expired token is refused
by its signature's `exp` anyway). Rows are versioned (ReplacingMergeTree(updated_at), read FINAL).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from clickhouse_connect.driver.client import Client

from meterline.adapters.clickhouse import storage_errors
from meterline.core.portal import PortalClaims
from meterline.core.schema import PORTAL_TOKEN_COLUMNS, PORTAL_TOKENS, bind_if, qualified
from meterline.core.times import as_utc


class PortalRecord(NamedTuple):
    claims: PortalClaims
    invalidated_at: datetime | None


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def _row(c: PortalClaims, invalidated_at: datetime | None, updated_at: datetime) -> list[Any]:
    return [c.id, c.namespace, c.subject, list(c.meters), c.created_at, c.expires_at, invalidated_at, updated_at]


def _record(row: dict[str, Any]) -> PortalRecord:
    created, expires = _utc(row["created_at"]), _utc(row["expires_at"])
    assert created is not None and expires is not None
    claims = PortalClaims(row["id"], row["namespace"], row["subject"], tuple(row["allowed_meters"]), created, expires)
    return PortalRecord(claims, _utc(row["invalidated_at"]))


class PortalTokenStore:
    """Reads and writes `portal_tokens` through one clickhouse-connect client."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.table = qualified(database, PORTAL_TOKENS)

    def add(self, claims: PortalClaims) -> None:
        self._write([_row(claims, None, claims.created_at)])

    def _write(self, rows: list[list[Any]]) -> None:
        if rows:
            with storage_errors():
                self.client.insert(self.table, rows, column_names=list(PORTAL_TOKEN_COLUMNS))

    def _select(self, where: str, params: dict[str, Any], suffix: str = "") -> list[PortalRecord]:
        sql = f"SELECT {', '.join(PORTAL_TOKEN_COLUMNS)} FROM {self.table} FINAL WHERE {where} {suffix}"
        with storage_errors():
            result = self.client.query(sql, parameters=params)
        names = result.column_names
        return [_record(dict(zip(names, r, strict=True))) for r in result.result_rows]

    def recent(self, namespace: str, limit: int) -> list[PortalRecord]:
        """A namespace's tokens, newest first."""
        return self._select("namespace = {ns:String}", {"ns": namespace, "limit": limit},
                            "ORDER BY created_at DESC, id DESC LIMIT {limit:UInt32}")

    def invalidate(self, namespace: str, now: datetime, *, token_id: str | None = None,
                   subject: str | None = None) -> int:
        """Invalidate the namespace's live tokens with this id and/or subject; returns how many."""
        where, params = ["namespace = {ns:String}", "invalidated_at IS NULL"], {"ns": namespace}
        bind_if(params, where, "id", token_id, "id = {id:String}")
        bind_if(params, where, "subject", subject, "subject = {subject:String}")
        found = self._select(" AND ".join(where), params)
        self._write([_row(r.claims, now, now) for r in found])
        return len(found)

    def invalidated_ids(self) -> frozenset[str]:
        """Ids of invalidated tokens that have not expired yet (what verification must still refuse)."""
        where = "invalidated_at IS NOT NULL AND expires_at > now64(3)"
        return frozenset(r.claims.id for r in self._select(where, {}))
