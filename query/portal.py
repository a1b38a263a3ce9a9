"""OpenMeter's consumer portal API: mint, list and invalidate portal tokens (admin keys), and the
portal meter query (a portal token, or a read key).

A portal token is bound to one subject and a list of meters (`meterline.core.portal`); the query here
refuses any other meter or subject with 403 *before* looking anything up, then runs the ordinary meter
query (`query.routes.query_meter`) with the subject filter forced to the token's subject, so the
portal answer is exactly the answer a read key would get for that subject and nothing more.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request, Response

from meterline.adapters.auth import principal_of
from meterline.adapters.portalstore import PortalRecord, PortalTokenStore
from meterline.adapters.problems import ProblemResponse, problem
from meterline.core.errors import InvalidQueryError, MeterNotFoundError
from meterline.core.portal import PortalClaims, new_token_id, sign
from query import openapi
from query.params import integer
from query.routes import query_meter

router = APIRouter(tags=["Portal"])

DEFAULT_LIMIT = 25
MAX_LIMIT = 100
_READ_ONLY = ("id", "expiresAt", "expired", "createdAt", "token")
_SUBJECT_PARAMS = ("subject", "filterGroupBy[subject]")


def _time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def token_json(record: PortalRecord, now: datetime, token: str | None = None) -> dict[str, Any]:
    """OpenMeter's PortalToken shape; `token` only at creation."""
    c = record.claims
    out: dict[str, Any] = {
        "id": c.id, "subject": c.subject, "expiresAt": _time(c.expires_at),
        "expired": record.invalidated_at is not None or now >= c.expires_at, "createdAt": _time(c.created_at),
    }
    if c.meters:
        out["allowedMeterSlugs"] = list(c.meters)
    if token is not None:
        out["token"] = token
    return out


def _portal_store(request: Request) -> PortalTokenStore | ProblemResponse:
    store: PortalTokenStore | None = request.app.state.authenticator.portal_store
    if store is None:
        return problem(503, "Portal tokens unavailable", "portal tokens need the server secret "
                       "(METERLINE_AUTH_SECRET_FILE) and ClickHouse", instance=request.url.path)
    return store


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body() or b"null")
    except orjson.JSONDecodeError as exc:
        raise InvalidQueryError("body", f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidQueryError("body", "must be a JSON object")
    return body


@router.post("/api/v1/portal/tokens", summary="Create consumer portal token", operation_id="createPortalToken",
             responses=openapi.ERRORS, response_model=None, openapi_extra=openapi.PORTAL_TOKEN_CREATE)
async def create_portal_token(request: Request) -> Response:
    store = _portal_store(request)
    if isinstance(store, ProblemResponse):
        return store
    principal = principal_of(request.state)
    body = await _json_object(request)
    for name in body:
        if name in _READ_ONLY:
            if body[name] is not None:
                raise InvalidQueryError(name, "is read-only: set by the server")
        elif name not in ("subject", "allowedMeterSlugs"):
            raise InvalidQueryError(name, "unknown field")
    subject = body.get("subject")
    if not isinstance(subject, str) or not subject:
        raise InvalidQueryError("subject", "is required: a non-empty string")
    slugs = body.get("allowedMeterSlugs") or []
    if not isinstance(slugs, list):
        raise InvalidQueryError("allowedMeterSlugs", "must be an array of meter slugs")
    for i, slug in enumerate(slugs):
        if not isinstance(slug, str):
            raise InvalidQueryError(f"allowedMeterSlugs[{i}]", "must be a string")
        try:
            request.app.state.catalog.find(slug, namespace=principal.namespace)
        except MeterNotFoundError:
            raise InvalidQueryError(f"allowedMeterSlugs[{i}]", f"no meter {slug!r}") from None
    now = datetime.now(UTC).replace(microsecond=0)
    ttl = request.app.state.authenticator.settings.portal_token_ttl_seconds
    claims = PortalClaims(new_token_id(datetime.now(UTC)), principal.namespace, subject, tuple(dict.fromkeys(slugs)), now,
                          now + timedelta(seconds=ttl))
    key = request.app.state.authenticator.portal_key
    store.add(claims)
    return Response(orjson.dumps(token_json(PortalRecord(claims, None), now, sign(claims, key))),
                    media_type="application/json")


@router.get("/api/v1/portal/tokens", summary="List consumer portal tokens", operation_id="listPortalTokens",
            responses=openapi.ERRORS, response_model=None, openapi_extra=openapi.PORTAL_TOKEN_LIST)
def list_portal_tokens(request: Request) -> Response:
    store = _portal_store(request)
    if isinstance(store, ProblemResponse):
        return store
    for name in request.query_params:
        if name != "limit":
            raise InvalidQueryError(name, "unknown query parameter")
    limit = integer(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    now = datetime.now(UTC)
    records = store.recent(principal_of(request.state).namespace, limit)
    return Response(orjson.dumps([token_json(r, now) for r in records]), media_type="application/json")


@router.post("/api/v1/portal/tokens/invalidate", summary="Invalidate portal tokens", status_code=204,
             operation_id="invalidatePortalTokens", responses=openapi.ERRORS, response_class=Response,
             openapi_extra=openapi.PORTAL_TOKEN_INVALIDATE)
async def invalidate_portal_tokens(request: Request) -> Response:
    """By id and/or subject, within the caller's namespace; 204 whether or not anything matched, so the
    answer never tells whether a token id exists (in this namespace or another)."""
    store = _portal_store(request)
    if isinstance(store, ProblemResponse):
        return store
    body = await _json_object(request)
    for name in body:
        if name not in ("id", "subject"):
            raise InvalidQueryError(name, "unknown field")
    token_id, subject = body.get("id"), body.get("subject")
    for name, value in (("id", token_id), ("subject", subject)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidQueryError(name, "must be a non-empty string")
    if token_id is None and subject is None:
        raise InvalidQueryError("id", "give `id` or `subject` (or both)")
    store.invalidate(principal_of(request.state).namespace, datetime.now(UTC), token_id=token_id, subject=subject)
    return Response(status_code=204)


@router.get("/api/v1/portal/meters/{meterSlug}/query", summary="Query meter (consumer portal)",
            operation_id="queryPortalMeter", response_model=None,
            responses={**openapi.ERRORS, **openapi.NOT_FOUND}, openapi_extra=openapi.METER_QUERY)
def query_portal_meter(request: Request, meterSlug: str) -> Response:
    principal = principal_of(request.state)
    if principal.subject is None:  # a read key: the ordinary query
        return query_meter(request, meterSlug)
    if principal.meters and meterSlug not in principal.meters:
        return problem(403, "Forbidden", "this portal token does not allow that meter", instance=request.url.path)
    pairs = []
    for name, value in request.query_params.multi_items():
        if name in _SUBJECT_PARAMS:
            if value != principal.subject:
                return problem(403, "Forbidden", "this portal token only reads its own subject",
                               instance=request.url.path)
            continue
        pairs.append((name, value))
    pairs.append(("subject", principal.subject))
    scoped = Request({**request.scope, "query_string": urlencode(pairs).encode()}, request.receive)
    return query_meter(scoped, meterSlug)
