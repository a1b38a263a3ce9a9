"""Meters API (OpenMeter v1 `listMeters`, `getMeter`, `createMeter`, `updateMeter`, `deleteMeter`).

Meters live in the meter store (`meterline.adapters.meter_store`); this module only maps HTTP to the
catalog and the catalog's records to OpenMeter's `Meter` object. Every call names the caller's namespace:
a tenant lists, reads and changes only its own meters, and another tenant's slug is simply not found. System state that OpenMeter has no
field for (who manages the meter, its version and generations, rebuild progress) goes into
`annotations`, which OpenMeter defines as "key-value pairs managed by the system".

Optimistic concurrency: a meter's `ETag` is its version (`"7"`, also `annotations["meterline.version"]`);
a PUT or DELETE with `If-Match` applies only if that is still the newest version, else 412 problem+json
naming both versions, also when another writer's change lands between the check and the append
(`MeterStore.append`). Without If-Match the change applies to whatever version is newest.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from meterline.adapters.auth import principal_of
from meterline.adapters.meter_store import MeterCatalog
from meterline.adapters.problems import ProblemResponse, problem
from meterline.core import meter_records as mr
from meterline.core.errors import (
    InvalidMeterChangeError,
    InvalidQueryError,
    MeterBuildingError,
    MeterConflictError,
    MeterVersionConflictError,
)
from meterline.core.meter_records import MeterCreate, MeterState, MeterUpdate
from query import openapi
from query.params import integer, one

router = APIRouter(tags=["Meters"])

ORDER_BY = ("key", "name", "aggregation", "createdAt", "updatedAt")
MAX_PAGE_SIZE = 1000


def catalog(request: Request) -> MeterCatalog:
    found: MeterCatalog = request.app.state.catalog
    return found


def namespace(request: Request) -> str:
    """The caller's namespace: the one every meter it names is looked up in."""
    return principal_of(request.state).namespace


def _time(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def meter_json(state: MeterState, cat: MeterCatalog, ns: str) -> dict[str, Any]:
    """OpenMeter's `Meter` object for the meter's newest definition (what it is becoming)."""
    r = state.latest
    m = r.meter
    body: dict[str, Any] = {
        "id": r.id,
        "slug": r.slug,
        "name": r.name,
        "description": m.description,
        "metadata": r.metadata,
        "createdAt": _time(r.created_at),
        "updatedAt": _time(r.changed_at),
        "eventType": m.event_type,
        "aggregation": m.aggregation.value,
        "groupBy": dict(m.group_by),
    }
    if m.value_property is not None:
        body["valueProperty"] = m.value_property
    if m.event_from is not None:
        body["eventFrom"] = _time(m.event_from)
    if state.deleted:
        body["deletedAt"] = _time(r.changed_at)
    annotations: dict[str, Any] = {
        "meterline.managedBy": r.managed_by,
        "meterline.version": r.version,
        "meterline.state": state.status,
        "meterline.generation": r.generation,
        "meterline.activeGeneration": r.active_generation,
    }
    if state.building is not None:
        progress = cat.progress(ns, r.slug, r.generation)
        annotations["meterline.rebuild.state"] = progress.state if progress else "waiting"
        annotations["meterline.rebuild.eventsDone"] = progress.done if progress else 0
        annotations["meterline.rebuild.eventsTotal"] = progress.total if progress else 0
    body["annotations"] = annotations
    return body


_SORT_KEYS = {
    "key": lambda s: s.slug,
    "name": lambda s: s.latest.name,
    "aggregation": lambda s: s.latest.meter.aggregation.value,
    "createdAt": lambda s: s.latest.created_at,
    "updatedAt": lambda s: s.latest.changed_at,
}
_LIST_PARAMS = frozenset({"page", "pageSize", "order", "orderBy", "includeDeleted"})


@router.get("/api/v1/meters", summary="List meters", response_model=None, operation_id="listMeters",
            responses=openapi.ERRORS, openapi_extra=openapi.LIST_METERS)
def list_meters(request: Request) -> list[dict[str, Any]]:
    for name in request.query_params:
        if name not in _LIST_PARAMS:
            raise InvalidQueryError(name, "unknown query parameter")
    page = integer(request, "page", 1, 1, None)
    size = integer(request, "pageSize", 100, 1, MAX_PAGE_SIZE)
    order = one(request, "order") or "ASC"
    if order not in ("ASC", "DESC"):
        raise InvalidQueryError("order", f"must be ASC or DESC, got {order!r}")
    order_by = one(request, "orderBy") or "key"
    if order_by not in ORDER_BY:
        raise InvalidQueryError("orderBy", f"must be one of {', '.join(ORDER_BY)}, got {order_by!r}")
    deleted = (one(request, "includeDeleted") or "false").lower()
    if deleted not in ("true", "false"):
        raise InvalidQueryError("includeDeleted", f"must be true or false, got {deleted!r}")
    cat, ns = catalog(request), namespace(request)
    states = [s for s in cat.in_namespace(ns).values() if deleted == "true" or not s.deleted]
    states.sort(key=lambda s: (_SORT_KEYS[order_by](s), s.slug), reverse=order == "DESC")
    window = states[(page - 1) * size : page * size]
    return [meter_json(s, cat, ns) for s in window]


@router.get("/api/v1/meters/{meterIdOrSlug}", summary="Get meter", response_model=None, operation_id="getMeter",
            responses=openapi.NOT_FOUND, openapi_extra=openapi.METER)
def get_meter(request: Request, meterIdOrSlug: str, response: Response) -> dict[str, Any]:
    cat, ns = catalog(request), namespace(request)
    state = cat.find(meterIdOrSlug, namespace=ns)
    response.headers["ETag"] = etag(state)
    return meter_json(state, cat, ns)


def etag(state: MeterState) -> str:
    """The meter's entity tag: its version (strong: a version is one exact record)."""
    return f'"{state.latest.version}"'


def if_match(request: Request) -> list[int] | None:
    """The versions an `If-Match` header allows (None: no header, or `*`). A weak or non-version tag can
    never match (RFC 9110 compares If-Match strongly), so it yields no version and the change gets 412."""
    header = request.headers.get("if-match")
    if header is None or header.strip() == "*":
        return None
    tags = [t.strip() for t in header.split(",")]
    return [int(t[1:-1]) for t in tags if len(t) > 2 and t[0] == t[-1] == '"' and t[1:-1].isdigit()]


def _actor(request: Request) -> str:
    return f"api:{request.client.host if request.client else 'unknown'}"


async def _body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise InvalidMeterChangeError([{"field": "body", "message": "must be a JSON object"}]) from None


@router.post("/api/v1/meters", summary="Create meter", status_code=201, response_model=None,
             operation_id="createMeter",
             responses={**openapi.ERRORS, **openapi.CONFLICT}, openapi_extra=openapi.METER_CREATE)
async def create_meter(request: Request) -> JSONResponse:
    req: MeterCreate = mr.parse_request(MeterCreate, await _body(request))
    meter = mr.build_meter({
        "slug": req.slug, "description": req.description or "", "event_type": req.event_type,
        "event_from": req.event_from, "aggregation": req.aggregation, "value_property": req.value_property,
        "group_by": req.group_by or {},
    })
    cat, ns = catalog(request), namespace(request)
    state = await asyncio.to_thread(cat.create, meter, namespace=ns, name=req.name, metadata=req.metadata,
                                    actor=_actor(request))
    return JSONResponse(meter_json(state, cat, ns), status_code=201, headers={"ETag": etag(state)})


@router.put("/api/v1/meters/{meterIdOrSlug}", summary="Update meter", response_model=None,
            operation_id="updateMeter",
            responses={**openapi.ERRORS, **openapi.NOT_FOUND, **openapi.CONFLICT, **openapi.PRECONDITION},
            openapi_extra=openapi.METER_UPDATE)
async def update_meter(request: Request, meterIdOrSlug: str, response: Response) -> dict[str, Any]:
    req: MeterUpdate = mr.parse_request(MeterUpdate, await _body(request))
    change = req.model_dump(exclude_unset=True)
    cat, ns = catalog(request), namespace(request)
    state = await asyncio.to_thread(cat.update, meterIdOrSlug, change, namespace=ns, actor=_actor(request),
                                    expected_version=if_match(request))
    response.headers["ETag"] = etag(state)
    return meter_json(state, cat, ns)


@router.delete("/api/v1/meters/{meterIdOrSlug}", summary="Delete meter", status_code=204, response_model=None,
               operation_id="deleteMeter",
               responses={**openapi.NOT_FOUND, **openapi.CONFLICT, **openapi.PRECONDITION})
async def delete_meter(request: Request, meterIdOrSlug: str) -> Response:
    cat = catalog(request)
    await asyncio.to_thread(cat.delete, meterIdOrSlug, namespace=namespace(request), actor=_actor(request),
                            expected_version=if_match(request))
    return Response(status_code=204)


# -------------------------------------------------------------------------------------------------
# Error mapping (the meter-change errors; not-found and invalid-query are mapped in query.routes)
# -------------------------------------------------------------------------------------------------


async def _invalid_change(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, InvalidMeterChangeError)
    return problem(400, "Invalid meter", str(exc), instance=request.url.path, errors=exc.errors,
                   type_="https://meterline.dev/problems/invalid-meter")


async def _conflict(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, MeterConflictError)
    errors = [{"field": "slug", "message": str(exc)}]
    return problem(409, "Meter conflict", str(exc), instance=request.url.path, errors=errors,
                   type_="https://meterline.dev/problems/meter-conflict")


async def _version_conflict(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, MeterVersionConflictError)
    return problem(412, "Meter changed", str(exc), instance=request.url.path,
                   errors=[{"field": "If-Match", "message": str(exc)}], headers={"ETag": f'"{exc.current}"'},
                   extra={"currentVersion": exc.current}, type_="https://meterline.dev/problems/meter-version-conflict")


async def _building(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, MeterBuildingError)
    return problem(503, "Meter still building", str(exc), instance=request.url.path,
                   headers={"Retry-After": "2"}, type_="https://meterline.dev/problems/meter-building")


def install_meter_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(InvalidMeterChangeError, _invalid_change)
    app.add_exception_handler(MeterConflictError, _conflict)
    app.add_exception_handler(MeterVersionConflictError, _version_conflict)
    app.add_exception_handler(MeterBuildingError, _building)
