"""OpenMeter's subjects API (`/api/v1/subjects`) and `GET /api/v1/debug/metrics`.

A subject entity enriches a subject key with a display name and metadata (OpenMeter deprecates it in
favour of customers, but both SDKs still expose it and the CSV export shows `subject_display_name`).
Usage does not depend on it: events of a key without an entity are metered all the same.

Storage: the `subjects` ClickHouse table, ReplacingMergeTree on (namespace, key) with `updated_at` as
version, so every upsert or delete writes a new version and reads (FINAL) see the newest. An upsert
creates a missing key (new ULID id) or partially updates an existing one: fields absent from the body
keep their value, fields present (even `null`) are set. Deleting writes a version with `deleted_at`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest
from ulid import ULID

from meterline.adapters.auth import principal_of
from meterline.adapters.clickhouse import storage_errors
from meterline.adapters.problems import problem
from meterline.core.errors import InvalidQueryError
from meterline.core.schema import SUBJECT_COLUMNS, SUBJECTS
from meterline.core.times import as_utc, format_time
from query import openapi
from query.sql import ingested_counts_query, subject_entities_query
from query.store import WindowStore
from query.time_ranges import parse_instant

router = APIRouter(tags=["Subjects"])

MAX_UPSERT = 100
_FIELDS = ("key", "displayName", "metadata", "currentPeriodStart", "currentPeriodEnd", "stripeCustomerId")


def _store(request: Request) -> WindowStore:
    store: WindowStore = request.app.state.query_store
    return store.scoped(principal_of(request.state).namespace)  # every read confined to the caller's namespace


def _namespace(request: Request) -> str:
    return principal_of(request.state).namespace


def _now() -> datetime:
    """Milliseconds, the stored precision, so an answer and a later read agree."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _time(value: datetime | None) -> str | None:
    return None if value is None else format_time(as_utc(value))


def subject_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A `subjects` row in OpenMeter's Subject shape."""
    out: dict[str, Any] = {
        "id": row["id"], "key": row["key"], "displayName": row["display_name"],
        "metadata": orjson.loads(row["metadata"]) if row["metadata"] else None,
        "createdAt": _time(row["created_at"]), "updatedAt": _time(row["updated_at"]),
    }
    for name, column in (("currentPeriodStart", "current_period_start"), ("currentPeriodEnd", "current_period_end"),
                         ("stripeCustomerId", "stripe_customer_id")):
        if row[column] is not None:
            out[name] = _time(row[column]) if isinstance(row[column], datetime) else row[column]
    return out


def subjects_by_key(store: WindowStore, namespace: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Stored subjects among `keys` (the CSV export's display names)."""
    if not keys:
        return {}
    return {r["key"]: r for r in store.rows(subject_entities_query(store.database, namespace, keys=list(keys)))}


def _check_item(index: int, item: Any) -> dict[str, Any]:
    where = f"[{index}]"
    if not isinstance(item, dict):
        raise InvalidQueryError(where, "must be a SubjectUpsert object")
    for name in item:
        if name not in _FIELDS:
            raise InvalidQueryError(f"{where}.{name}", "unknown field of SubjectUpsert")
    key = item.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidQueryError(f"{where}.key", "is required: a non-empty string")
    for name in ("displayName", "stripeCustomerId"):
        if name in item and item[name] is not None and not isinstance(item[name], str):
            raise InvalidQueryError(f"{where}.{name}", "must be a string or null")
    if "metadata" in item and item["metadata"] is not None and not isinstance(item["metadata"], dict):
        raise InvalidQueryError(f"{where}.metadata", "must be an object or null")
    out = dict(item)
    for name in ("currentPeriodStart", "currentPeriodEnd"):
        if item.get(name) is not None:
            if not isinstance(item[name], str):
                raise InvalidQueryError(f"{where}.{name}", "must be an RFC 3339 date-time")
            out[name] = parse_instant(item[name], f"{where}.{name}")
    return out


def _row(namespace: str, item: Mapping[str, Any], old: Mapping[str, Any] | None, now: datetime) -> list[Any]:
    def pick(name: str, column: str) -> Any:
        if name in item:
            return item[name]
        return None if old is None else old[column]

    metadata = pick("metadata", "metadata")
    if "metadata" in item:
        metadata = "" if metadata is None else orjson.dumps(metadata).decode()
    values = {
        "namespace": namespace, "key": item["key"], "id": old["id"] if old else str(ULID()),
        "display_name": pick("displayName", "display_name"), "metadata": metadata or "",
        "current_period_start": pick("currentPeriodStart", "current_period_start"),
        "current_period_end": pick("currentPeriodEnd", "current_period_end"),
        "stripe_customer_id": pick("stripeCustomerId", "stripe_customer_id"),
        "created_at": old["created_at"] if old else now, "updated_at": now, "deleted_at": None,
    }
    return [values[c] for c in SUBJECT_COLUMNS]


@router.post(
    "/api/v1/subjects", summary="Upsert subjects", operation_id="upsertSubject", response_model=None,
    responses=openapi.ERRORS, openapi_extra=openapi.SUBJECT_UPSERT,
)
async def upsert_subjects(request: Request) -> list[dict[str, Any]]:
    body = await request.body()
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidQueryError("body", f"not valid JSON: {exc}") from None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_UPSERT:
        raise InvalidQueryError("body", f"must be an array of 1 to {MAX_UPSERT} SubjectUpsert objects")
    checked = [_check_item(i, item) for i, item in enumerate(items)]
    return await asyncio.to_thread(_upsert, request, checked)


def _upsert(request: Request, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    store, namespace = _store(request), _namespace(request)
    merged: dict[str, dict[str, Any]] = {}
    for item in items:  # the same key twice in one request: later fields win, like two requests
        merged.setdefault(item["key"], {}).update(item)
    old = subjects_by_key(store, namespace, list(merged))
    now = _now()
    rows = [_row(namespace, item, old.get(key), now) for key, item in merged.items()]
    with storage_errors():
        store.writer.insert(SUBJECTS, rows, column_names=list(SUBJECT_COLUMNS), database=store.database)
    return [subject_json(dict(zip(SUBJECT_COLUMNS, r, strict=True))) for r in rows]


@router.get(
    "/api/v1/subjects", summary="List subjects", operation_id="listSubjects", response_model=None,
    responses=openapi.ERRORS, openapi_extra=openapi.SUBJECT_LIST,
)
def list_subjects(request: Request) -> list[dict[str, Any]]:
    for name in request.query_params:
        raise InvalidQueryError(name, "unknown query parameter")
    store = _store(request)
    return [subject_json(r) for r in store.rows(subject_entities_query(store.database, _namespace(request)))]


def _find(request: Request, id_or_key: str) -> dict[str, Any] | None:
    store = _store(request)
    rows = store.rows(subject_entities_query(store.database, _namespace(request), id_or_key=id_or_key))
    exact = [r for r in rows if r["key"] == id_or_key] or rows
    return exact[0] if exact else None


def _named(request: Request, id_or_key: str) -> dict[str, Any] | Response:
    """The subject a get/delete names, or its 404; these routes take no query parameters at all."""
    for name in request.query_params:
        raise InvalidQueryError(name, "unknown query parameter")
    row = _find(request, id_or_key)
    if row is None:
        return problem(404, "Subject not found", f"no subject with id or key {id_or_key!r}",
                       instance=request.url.path)
    return row


@router.get(
    "/api/v1/subjects/{subjectIdOrKey}", summary="Get subject", operation_id="getSubject", response_model=None,
    responses={**openapi.ERRORS, **openapi.SUBJECT_NOT_FOUND}, openapi_extra=openapi.SUBJECT_GET,
)
def get_subject(request: Request, subjectIdOrKey: str) -> Response | dict[str, Any]:
    row = _named(request, subjectIdOrKey)
    if isinstance(row, Response):
        return row
    return subject_json(row)


@router.delete(
    "/api/v1/subjects/{subjectIdOrKey}", summary="Delete subject", operation_id="deleteSubject",
    status_code=204, response_model=None, responses={**openapi.ERRORS, **openapi.SUBJECT_NOT_FOUND},
)
def delete_subject(request: Request, subjectIdOrKey: str) -> Response:
    row = _named(request, subjectIdOrKey)
    if isinstance(row, Response):
        return row
    now = _now()
    row = {**row, "updated_at": now, "deleted_at": now}
    store = _store(request)
    with storage_errors():
        store.writer.insert(SUBJECTS, [[row[c] for c in SUBJECT_COLUMNS]], column_names=list(SUBJECT_COLUMNS),
                            database=store.database)
    return Response(status_code=204)


@router.get(
    "/api/v1/debug/metrics", summary="Event metrics (OpenMetrics)", operation_id="getDebugMetrics",
    response_class=PlainTextResponse, responses=openapi.ERRORS, tags=["Debug"],
)
def debug_metrics(request: Request) -> PlainTextResponse:
    """`openmeter_events_total{subject}`: events ingested since midnight UTC (OpenMeter's counters reset daily)."""
    for name in request.query_params:
        raise InvalidQueryError(name, "unknown query parameter")
    store = _store(request)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    family = CounterMetricFamily("openmeter_events", "Number of ingested events", labels=["subject"])
    for row in store.rows(ingested_counts_query(store.database, midnight)):
        family.add_metric([row["subject"]], float(row["events"]))

    class _Once:
        def collect(self) -> list[CounterMetricFamily]:
            return [family]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once())  # type: ignore[arg-type]
    return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain")


__all__ = ["router", "subject_json", "subjects_by_key"]
