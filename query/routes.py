"""The query HTTP API (OpenMeter v1 shapes): meters, meter queries, subjects, events, dead letters.

Query parameters are read from `request.query_params` by hand rather than declared as typed FastAPI
parameters: `filterGroupBy[key]=value` is OpenAPI deepObject style, which FastAPI cannot declare, and
hand parsing lets every bad parameter become a 400 problem naming the field (never FastAPI's 422).

Values are exact Decimals internally. JSON carries them as numbers (OpenMeter's float64 field): an
integer when integral (exact at any size), otherwise the float parsed from the exact decimal text
(shortest repr, so 0.1 stays 0.1). `Accept: text/csv` returns the exact decimal strings.

This module (with `meterline.adapters.problems`) is where query errors map to HTTP statuses.
"""

from __future__ import annotations

import csv
import io
import logging
from datetime import datetime
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from meterline.adapters.problems import ProblemResponse, problem
from meterline.core.errors import InvalidQueryError, MeterNotFoundError, StorageError
from meterline.core.meters import Meter, MeterSet
from meterline.core.times import format_instant
from query import openapi
from query.store import WindowStore
from query.windowing import (
    WINDOW_SIZES,
    bucket_end,
    clip,
    parse_instant,
    parse_zone,
    resolve_range,
)

log = logging.getLogger(__name__)

router = APIRouter(tags=["Query"])

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_FILTER_PREFIX = "filterGroupBy["


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
    return problem(404, "Meter not found", f"no meter with slug {exc.slug!r}", instance=request.url.path)


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


def _meters(request: Request) -> MeterSet:
    meters: MeterSet = request.app.state.meters
    return meters


def _store(request: Request) -> WindowStore:
    store: WindowStore = request.app.state.query_store
    return store


def _one(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidQueryError(name, "must be given at most once")
    return values[0] if values else None


def _instant(request: Request, name: str) -> datetime | None:
    value = _one(request, name)
    return None if value is None else parse_instant(value, name)


def _limit(request: Request) -> int:
    value = _one(request, "limit")
    if value is None:
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        raise InvalidQueryError("limit", f"must be an integer, got {value!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQueryError("limit", f"must be between 1 and {MAX_LIMIT}")
    return limit


def number(value: Decimal) -> int | float:
    """JSON number for an exact Decimal: int when integral, else the float of its exact decimal text."""
    if value == value.to_integral_value():
        return int(value)
    return float(decimal_text(value))


def decimal_text(value: Decimal) -> str:
    """Plain exact decimal text without trailing zeros or exponent: 1.500000000 -> '1.5', 1E+2 -> '100'."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def meter_json(meter: Meter) -> dict[str, Any]:
    """OpenMeter's meter shape; `id` is the slug (meters live in config.yaml, not a database)."""
    return {
        "id": meter.slug,
        "slug": meter.slug,
        "description": meter.description,
        "eventType": meter.event_type,
        "aggregation": meter.aggregation.value,
        "valueProperty": meter.value_property,
        "groupBy": dict(meter.group_by),
        "windowSize": "MINUTE",
    }


# -------------------------------------------------------------------------------------------------
# Routes
# -------------------------------------------------------------------------------------------------


@router.get("/api/v1/meters", summary="List meters")
def list_meters(request: Request) -> list[dict[str, Any]]:
    return [meter_json(m) for m in _meters(request).meters]


@router.get("/api/v1/meters/{meterIdOrSlug}", summary="Get meter", responses=openapi.NOT_FOUND)
def get_meter(request: Request, meterIdOrSlug: str) -> dict[str, Any]:
    return meter_json(_meters(request).get(meterIdOrSlug))


@router.get(
    "/api/v1/meters/{meterIdOrSlug}/query", summary="Query meter", response_model=None,
    responses={**openapi.ERRORS, **openapi.NOT_FOUND}, openapi_extra=openapi.METER_QUERY,
)
def query_meter(request: Request, meterIdOrSlug: str) -> Response:
    meter = _meters(request).get(meterIdOrSlug)
    params = request.query_params

    size = _one(request, "windowSize")
    if size is not None and size not in WINDOW_SIZES:
        raise InvalidQueryError("windowSize", f"must be one of {', '.join(WINDOW_SIZES)}, got {size!r}")
    zone_name = _one(request, "windowTimeZone") or "UTC"
    zone = parse_zone(zone_name)
    bounds = resolve_range(_instant(request, "from"), _instant(request, "to"))

    subjects = list(dict.fromkeys(params.getlist("subject")))
    group_by_subject = False
    group_by: list[str] = []
    for key in dict.fromkeys(params.getlist("groupBy")):
        if key == "subject":
            group_by_subject = True
        elif key in meter.group_by:
            group_by.append(key)
        else:
            raise InvalidQueryError("groupBy", f"meter {meter.slug!r} has no groupBy key {key!r}")

    filters: dict[str, str] = {}
    no_match = False
    for name in params:
        if name.startswith("filterGroupBy"):
            if not (name.startswith(_FILTER_PREFIX) and name.endswith("]")):
                raise InvalidQueryError(name, "use filterGroupBy[key]=value")
            key = name[len(_FILTER_PREFIX):-1]
            values = params.getlist(name)
            if len(values) > 1:
                raise InvalidQueryError(name, "must be given at most once")
            if key == "subject":
                # Same meaning as subject=value, intersected with any subject= filter given.
                subjects = [values[0]] if not subjects or values[0] in subjects else []
                no_match = no_match or not subjects
            elif key in meter.group_by:
                filters[key] = values[0]
            else:
                raise InvalidQueryError(name, f"meter {meter.slug!r} has no groupBy key {key!r}")
        elif name not in _QUERY_PARAMS:
            raise InvalidQueryError(name, "unknown query parameter")

    rows = [] if no_match else _store(request).meter(
        meter.slug, meter.aggregation, start=bounds.start, end=bounds.end, window_size=size,
        tz=zone.key, subjects=subjects, group_by=group_by, group_by_subject=group_by_subject,
        filter_group_by=filters,
    )
    data: list[dict[str, Any]] = []
    exact: list[Decimal] = []
    for row in rows:
        if row.bucket is None:
            first = bounds.start or row.first_window
            assert first is not None, "the store returns first_window when no window size was asked"
            start, end = first, bounds.end
        else:
            start, end = clip(row.bucket, bucket_end(row.bucket, size or "MINUTE", zone), bounds)
        data.append({
            "value": number(row.value),
            "windowStart": format_instant(start),
            "windowEnd": format_instant(end),
            "subject": row.subject,
            "groupBy": row.group,
        })
        exact.append(row.value)

    if "text/csv" in request.headers.get("accept", ""):
        return _csv(data, exact, group_by)
    body: dict[str, Any] = {}
    if bounds.start is not None:
        body["from"] = format_instant(bounds.start)
    body["to"] = format_instant(bounds.end)
    if size is not None:
        body["windowSize"] = size
    body["windowTimeZone"] = zone.key
    body["data"] = data
    return JSONResponse(body)


_QUERY_PARAMS = frozenset({"from", "to", "windowSize", "windowTimeZone", "subject", "groupBy"})


def _csv(data: list[dict[str, Any]], exact: list[Decimal], group_by: list[str]) -> Response:
    """CSV with exact decimal values (no float rounding), for spreadsheets and billing exports."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["windowStart", "windowEnd", "subject", *group_by, "value"])
    for row, value in zip(data, exact, strict=True):
        groups = [row["groupBy"].get(k) or "" for k in group_by]
        writer.writerow([row["windowStart"], row["windowEnd"], row["subject"] or "", *groups, decimal_text(value)])
    return Response(out.getvalue(), media_type="text/csv")


@router.get(
    "/api/v1/meters/{meterIdOrSlug}/subjects", summary="List meter subjects",
    responses={**openapi.ERRORS, **openapi.NOT_FOUND}, openapi_extra=openapi.SUBJECTS,
)
def list_subjects(request: Request, meterIdOrSlug: str) -> list[str]:
    meter = _meters(request).get(meterIdOrSlug)
    start, end = _instant(request, "from"), _instant(request, "to")
    if start is not None and end is not None and start >= end:
        raise InvalidQueryError("from", "must be before 'to'")
    return _store(request).subjects(meter.slug, start=start, end=end)


@router.get(
    "/api/v1/events", summary="List ingested events", responses=openapi.ERRORS, openapi_extra=openapi.EVENTS
)
def list_events(request: Request) -> list[dict[str, Any]]:
    """Newest first; `from`/`to` are inclusive event times and need not be minute-aligned."""
    start, end = _instant(request, "from"), _instant(request, "to")
    if start is not None and end is not None and start > end:
        raise InvalidQueryError("from", "must not be after 'to'")
    return _store(request).events(start=start, end=end, subject=_one(request, "subject"), limit=_limit(request))


@router.get(
    "/api/v1/dead-letters", summary="List dead-lettered events", responses=openapi.ERRORS,
    openapi_extra=openapi.DEAD_LETTERS,
)
def list_dead_letters(request: Request) -> list[dict[str, Any]]:
    """Events (or event x meter pairs) that could not be metered; `from`/`to` bound `receivedAt`."""
    start, end = _instant(request, "from"), _instant(request, "to")
    if start is not None and end is not None and start > end:
        raise InvalidQueryError("from", "must not be after 'to'")
    reason = _one(request, "reasonCode") or _one(request, "reason_code")
    return _store(request).dead_letters(
        meter=_one(request, "meter"), reason_code=reason, start=start, end=end, limit=_limit(request)
    )


__all__ = ["install_query_problem_handlers", "router"]
