"""`GET /api/v1/events` and `GET /api/v2/events`: the stored raw events, as OpenMeter lists them.

v1 (`listEvents`): `from`/`to` (event time, inclusive; `from` defaults to 72 hours ago, as the spec
says), `ingestedAtFrom`/`ingestedAtTo` (inclusive), `id` and `subject` (partial matches, as the spec
says), `limit` 1..100 (default 100), `clientId` (accepted and logged). `customerId` is a 400: meterline
has no customers. Unlike OpenMeter, `from` may be older than 32 days: meterline keeps raw events.

v2 (`listEventsV2`): `filter` is a JSON object of FilterString (`id`, `source`, `subject`, `type`) and
FilterTime (`time`, `ingestedAt`), `cursor`/`limit` paginate newest first. `nextCursor` is the cursor
of the last item; the next page starts after it.

Every unknown parameter is a 400, never ignored.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi import APIRouter, Request

from meterline.adapters.auth import principal_of
from meterline.core.errors import InvalidQueryError
from meterline.core.times import as_utc
from query import openapi
from query.filters import FilterString, FilterTime, parse_filter, parse_time_filter
from query.params import instant, integer, one
from query.request import CUSTOMER_REASON
from query.shapes import ingested_event
from query.sql import events_query, events_v2_query
from query.store import WindowStore

log = logging.getLogger(__name__)

router = APIRouter(tags=["Events"])

MAX_LIMIT = 100
DEFAULT_FROM = timedelta(hours=72)
_V1_PARAMS = frozenset({"clientId", "ingestedAtFrom", "ingestedAtTo", "id", "subject", "customerId", "from", "to",
                        "limit"})
_V2_PARAMS = frozenset({"cursor", "limit", "clientId", "filter"})
_STRING_FILTERS = ("id", "source", "subject", "type")
_TIME_FILTERS = ("time", "ingestedAt")


def _store(request: Request) -> WindowStore:
    store: WindowStore = request.app.state.query_store
    return store.scoped(principal_of(request.state).namespace)  # every read confined to the caller's namespace


def _check(request: Request, allowed: frozenset[str]) -> None:
    for name in request.query_params:
        if name not in allowed:
            raise InvalidQueryError(name, "unknown query parameter")
        if name == "customerId":
            raise InvalidQueryError(name, CUSTOMER_REASON)
    client_id = one(request, "clientId")
    if client_id is not None:
        if not 1 <= len(client_id) <= 36:
            raise InvalidQueryError("clientId", "must be 1 to 36 characters")
        log.info("event list", extra={"client_id": client_id})


def _text(request: Request, name: str) -> str | None:
    value = one(request, name)
    if value == "":
        raise InvalidQueryError(name, "must not be empty")
    return value


@router.get(
    "/api/v1/events", summary="List ingested events", operation_id="listEvents", response_model=None,
    responses=openapi.ERRORS, openapi_extra=openapi.EVENTS,
)
def list_events(request: Request) -> list[dict[str, Any]]:
    """Newest first; times need not be minute-aligned."""
    _check(request, _V1_PARAMS)
    start, end = instant(request, "from"), instant(request, "to")
    if start is None:
        start = datetime.now(UTC) - DEFAULT_FROM
    if end is not None and start > end:
        raise InvalidQueryError("from", "must not be after 'to'")
    ingested_from, ingested_to = instant(request, "ingestedAtFrom"), instant(request, "ingestedAtTo")
    if ingested_from is not None and ingested_to is not None and ingested_from > ingested_to:
        raise InvalidQueryError("ingestedAtFrom", "must not be after 'ingestedAtTo'")
    query = events_query(
        _store(request).database, start=start, end=end, ingested_from=ingested_from, ingested_to=ingested_to,
        id_contains=_text(request, "id"), subject_contains=_text(request, "subject"), limit=integer(request, "limit", MAX_LIMIT, 1, MAX_LIMIT),
    )
    return [ingested_event(r) for r in _store(request).rows(query)]


def encode_cursor(time: datetime, key: bytes) -> str:
    """Opaque to clients: the (time, dedupe key) of the last event of a page."""
    text = orjson.dumps({"t": time.astimezone(UTC).isoformat(), "k": key.hex()})
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, bytes]:
    try:
        raw = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return datetime.fromisoformat(raw["t"]).astimezone(UTC), bytes.fromhex(raw["k"])
    except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidQueryError("cursor", "not a cursor this API returned (use nextCursor as it is)") from None


def parse_event_filter(text: str) -> dict[str, FilterString | FilterTime]:
    """The v2 `filter` parameter: a JSON object (the SDKs send it JSON-encoded)."""
    if text == "[object Object]":
        raise InvalidQueryError("filter", "send the filter as a JSON string, e.g. JSON.stringify({...})")
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise InvalidQueryError("filter", 'must be a JSON object, e.g. {"subject":{"$eq":"customer-1"}}') from None
    if not isinstance(raw, dict):
        raise InvalidQueryError("filter", "must be a JSON object")
    out: dict[str, FilterString | FilterTime] = {}
    for name, value in raw.items():
        if value is None:
            continue
        if name in _STRING_FILTERS:
            out[name] = parse_filter(value, f"filter.{name}")
        elif name in _TIME_FILTERS:
            out[name] = parse_time_filter(value, f"filter.{name}")
        elif name == "customerId":
            raise InvalidQueryError("filter.customerId", CUSTOMER_REASON)
        else:
            raise InvalidQueryError(f"filter.{name}", "unknown filter field; use id, source, subject, type, time, "
                                                      "ingestedAt")
    return out


@router.get(
    "/api/v2/events", summary="List ingested events (cursor pagination)", operation_id="listEventsV2",
    response_model=None, responses=openapi.ERRORS, openapi_extra=openapi.EVENTS_V2,
)
def list_events_v2(request: Request) -> dict[str, Any]:
    for name in request.query_params:
        if name.startswith("filter["):
            raise InvalidQueryError(name, "send `filter` as one JSON string, e.g. filter={\"subject\":{...}}")
    _check(request, _V2_PARAMS)
    filter_text = one(request, "filter")
    filters = {} if filter_text is None else parse_event_filter(filter_text)
    cursor_text = one(request, "cursor")
    cursor = None if cursor_text is None else decode_cursor(cursor_text)
    query = events_v2_query(_store(request).database, filters=filters, cursor=cursor, limit=integer(request, "limit", MAX_LIMIT, 1, MAX_LIMIT))
    rows = _store(request).rows(query)
    body: dict[str, Any] = {"items": [ingested_event(r) for r in rows]}
    if rows:
        last = rows[-1]
        key = last["dedupe_key"]
        body["nextCursor"] = encode_cursor(as_utc(last["time"]), key.encode("latin-1") if isinstance(key, str) else key)
    return body


__all__ = ["decode_cursor", "encode_cursor", "router"]
