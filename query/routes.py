"""The query HTTP API (OpenMeter v1 shapes): meters, meter queries, subjects, events, dead letters.

Query parameters are read from `request.query_params` by hand rather than declared as typed FastAPI
parameters: `filterGroupBy[key]=value` is OpenAPI deepObject style, which FastAPI cannot declare, and
hand parsing lets every bad parameter become a 400 problem naming the field (never FastAPI's 422).
The OpenAPI document still describes every parameter and response (`query.openapi`).

This module (with `meterline.adapters.problems`) is where query errors map to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from meterline.adapters.auth import principal_of
from meterline.adapters.meter_store import MeterCatalog
from meterline.adapters.problems import ProblemResponse, UnsupportedContentTypeError, problem
from meterline.core.decimals import decimal_text
from meterline.core.errors import InvalidQueryError, MeterNotFoundError, StorageError
from meterline.core.meters import Meter
from query import openapi
from query.export import csv_text, prefers_csv
from query.params import instant, integer, one
from query.request import MeterQuery, from_body, from_query_params
from query.shapes import number
from query.store import WindowStore
from query.subject_routes import subjects_by_key
from query.time_ranges import MINUTE, bucket_end, format_instant

log = logging.getLogger(__name__)

router = APIRouter(tags=["Query"])

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
JSON_TYPES = ("application/json",)


# -------------------------------------------------------------------------------------------------
# Error mapping
# -------------------------------------------------------------------------------------------------


async def _invalid_query(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, InvalidQueryError)
    return problem(
        400, "Invalid query", str(exc), instance=request.url.path,
        errors=[{"field": exc.field, "message": str(exc).removeprefix(f"{exc.field}: ")}],
    )


async def _meter_not_found(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, MeterNotFoundError)
    return problem(404, "Meter not found", f"no meter with id or slug {exc.slug!r}", instance=request.url.path)


async def _storage(request: Request, exc: Exception) -> ProblemResponse:
    log.warning("ClickHouse failed on %s: %s", request.url.path, exc)
    return problem(
        503, "Storage unavailable", "ClickHouse did not answer; retry later",
        instance=request.url.path, headers={"Retry-After": "5"},
    )


def install_query_problem_handlers(app: FastAPI) -> None:
    """Query-specific mappings; install after `meterline.adapters.problems.install_problem_handlers` (400/404/503)."""
    app.add_exception_handler(InvalidQueryError, _invalid_query)
    app.add_exception_handler(MeterNotFoundError, _meter_not_found)
    app.add_exception_handler(StorageError, _storage)


# -------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------


def _queryable(request: Request, id_or_slug: str) -> tuple[Meter, int]:
    """The meter's answering definition and generation (404 unknown/deleted, 503 still building)."""
    catalog: MeterCatalog = request.app.state.catalog
    return catalog.queryable(id_or_slug, namespace=principal_of(request.state).namespace)


def _store(request: Request) -> WindowStore:
    store: WindowStore = request.app.state.query_store
    return store.scoped(principal_of(request.state).namespace)  # every read confined to the caller's namespace


# -------------------------------------------------------------------------------------------------
# Routes (list/get/create/update/delete of meters live in query.meter_routes)
# -------------------------------------------------------------------------------------------------


@router.get(
    "/api/v1/meters/{meterIdOrSlug}/query", summary="Query meter", response_model=None,
    operation_id="queryMeter", responses={**openapi.ERRORS, **openapi.NOT_FOUND}, openapi_extra=openapi.METER_QUERY,
)
def query_meter(request: Request, meterIdOrSlug: str) -> Response:
    meter, generation = _queryable(request, meterIdOrSlug)
    return _answer(request, meter, from_query_params(meter, request.query_params), generation)


@router.post(
    "/api/v1/meters/{meterIdOrSlug}/query", summary="Query meter (POST)", response_model=None,
    operation_id="queryMeterPost", responses={**openapi.ERRORS, **openapi.NOT_FOUND},
    openapi_extra=openapi.METER_QUERY_POST,
)
async def query_meter_post(request: Request, meterIdOrSlug: str) -> Response:
    """The same query with a JSON body (`MeterQueryRequest`), for filters too long for a URL.

    An empty body is an empty request (all defaults): the Python SDK's `query_csv_post` sends none.
    """
    meter, generation = _queryable(request, meterIdOrSlug)
    for name in request.query_params:
        raise InvalidQueryError(name, "unknown query parameter (POST takes the query in the JSON body)")
    raw = await request.body()
    body: Any = {}
    if raw.strip():
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in JSON_TYPES and not media.endswith("+json"):
            raise UnsupportedContentTypeError(f"Content-Type must be application/json, got {media or 'none'!r}")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidQueryError("body", f"not valid JSON: {exc}") from None
    query = from_body(meter, body)
    return await asyncio.to_thread(_answer, request, meter, query, generation)


def _answer(request: Request, meter: Meter, query: MeterQuery, generation: int) -> Response:
    """Run one meter query and shape it as OpenMeter does (JSON), or as CSV when the client accepts it.

    Windows carry their bucket's own bounds, as in OpenMeter (a window is identified by its bucket,
    even when `from`/`to` cut into it); without a window size each row spans `from`..`to` as given,
    or, when they are not given, the first..last minute with data.
    """
    if query.client_id is not None:
        log.info("meter query", extra={"meter": meter.slug, "client_id": query.client_id})
    # Before the data: completeUntil promises what the answer holds, so it must be read before the answer is.
    csv = prefers_csv(request.headers.get("accept"))
    complete_until = None if csv else _complete_until(request)
    rows = _store(request).meter(
        meter, meter.aggregation, start=query.start, end=query.end, window_size=query.window_size,
        tz=query.zone.key, subjects=query.subjects, group_by=query.group_by,
        group_by_subject=query.group_by_subject, filters=query.filters, generation=generation,
    )
    data: list[dict[str, Any]] = []
    exact: list[Decimal] = []
    for row in rows:
        if row.bucket is None:
            assert row.first_window is not None and row.last_window is not None
            start = query.start or row.first_window
            end = query.end or row.last_window + MINUTE
        else:
            start, end = row.bucket, bucket_end(row.bucket, query.window_size or "MINUTE", query.zone)
        data.append({
            "value": number(row.value),
            "windowStart": format_instant(start),
            "windowEnd": format_instant(end),
            "subject": row.subject,
            "groupBy": row.group,
        })
        exact.append(row.value)

    if csv:
        names: dict[str, dict[str, Any]] = {}
        if query.group_by_subject:
            keys = sorted({r["subject"] for r in data if r["subject"] is not None})
            names = subjects_by_key(_store(request), principal_of(request.state).namespace, keys)
        return _csv(meter, query, data, exact, names)
    body: dict[str, Any] = {}
    if query.start is not None:
        body["from"] = format_instant(query.start)
    if query.end is not None:
        body["to"] = format_instant(query.end)
    if query.window_size is not None:
        body["windowSize"] = query.window_size
    body["windowTimeZone"] = query.zone.key
    body["completeUntil"] = complete_until
    body["data"] = data
    return Response(orjson.dumps(body), media_type="application/json")  # orjson: number() Fragments


def _complete_until(request: Request) -> str | None:
    """meterline's addition to OpenMeter's answer: the instant before which every event the broker
    acknowledged is included (processor/progress.py); null while unknown. Windows ending before it are
    complete, later ones may still fill."""
    topic, partitions = request.app.state.events_topic
    until = _store(request).complete_until(topic, partitions)
    return None if until is None else format_instant(until)


def _csv(
    meter: Meter, query: MeterQuery, data: list[dict[str, Any]], exact: list[Decimal],
    subjects: dict[str, dict[str, Any]],
) -> Response:
    """OpenMeter's CSV layout with exact decimal values (`query.export`); `subject_display_name` when any
    subject of the answer is a stored subject entity (as OpenMeter does)."""
    header = ["window_start", "window_end"]
    if query.group_by_subject:
        header.append("subject")
        if subjects:
            header.append("subject_display_name")
    header += [*query.group_by, "value"]
    lines = []
    for row, value in zip(data, exact, strict=True):
        texts: list[str | None] = [row["subject"]] if query.group_by_subject else []
        if subjects:
            texts.append((subjects.get(row["subject"]) or {}).get("display_name"))
        texts += [row["groupBy"].get(k) for k in query.group_by]
        lines.append(((row["windowStart"], row["windowEnd"]), texts, decimal_text(value)))
    return Response(
        csv_text(header, lines), media_type="text/csv",
        headers={"Content-Disposition": f"attachment; filename={meter.slug}.csv"},
    )


@router.get(
    "/api/v1/meters/{meterIdOrSlug}/subjects", summary="List meter subjects", response_model=None,
    responses={**openapi.ERRORS, **openapi.NOT_FOUND}, openapi_extra=openapi.SUBJECTS,
)
def list_subjects(request: Request, meterIdOrSlug: str) -> list[str]:
    meter, generation = _queryable(request, meterIdOrSlug)
    _only(request, {"from", "to"})
    start, end = instant(request, "from"), instant(request, "to")
    if start is not None and end is not None and start > end:
        raise InvalidQueryError("from", "must not be after 'to'")
    return _store(request).subjects(meter.slug, start=start, end=end, generation=generation)


@router.get(
    "/api/v1/meters/{meterIdOrSlug}/group-by/{groupByKey}/values", summary="List meter group by values",
    response_model=None,
    operation_id="listMeterGroupByValues", responses={**openapi.ERRORS, **openapi.NOT_FOUND},
    openapi_extra=openapi.GROUP_BY_VALUES,
)
def list_group_by_values(request: Request, meterIdOrSlug: str, groupByKey: str) -> list[str]:
    """Distinct values of one groupBy key; `from` defaults to 24 hours ago when neither bound is given
    (OpenMeter's default). `subject` lists the meter's subjects."""
    meter, generation = _queryable(request, meterIdOrSlug)
    _only(request, {"from", "to"})
    start, end = instant(request, "from"), instant(request, "to")
    if start is not None and end is not None and start > end:
        raise InvalidQueryError("from", "must not be after 'to'")
    if start is None and end is None:
        start = datetime.now(UTC) - timedelta(hours=24)
    if groupByKey == "subject":
        return _store(request).subjects(meter.slug, start=start, end=end, generation=generation)
    if groupByKey not in meter.group_by:
        raise InvalidQueryError("groupByKey", f"meter {meter.slug!r} has no groupBy key {groupByKey!r}")
    return _store(request).group_values(meter.slug, groupByKey, start=start, end=end, generation=generation)


def _only(request: Request, allowed: set[str]) -> None:
    """Unknown query parameters are a 400, never ignored."""
    for name in request.query_params:
        if name not in allowed:
            raise InvalidQueryError(name, "unknown query parameter")


@router.get(
    "/api/v1/dead-letters", summary="List dead-lettered events", response_model=None, responses=openapi.ERRORS,
    openapi_extra=openapi.DEAD_LETTERS,
)
def list_dead_letters(request: Request) -> list[dict[str, Any]]:
    """Events (or event x meter pairs) that could not be metered; `from`/`to` bound `receivedAt`."""
    _only(request, {"from", "to", "limit", "meter", "reasonCode", "reason_code"})
    start, end = instant(request, "from"), instant(request, "to")
    if start is not None and end is not None and start > end:
        raise InvalidQueryError("from", "must not be after 'to'")
    reason = one(request, "reasonCode") or one(request, "reason_code")
    return _store(request).dead_letters(
        meter=one(request, "meter"), reason_code=reason, start=start, end=end, limit=integer(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    )


__all__ = ["install_query_problem_handlers", "router"]
