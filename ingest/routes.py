"""`POST /api/v1/events` — OpenMeter v1 `ingestEvents`, answering 204 once Kafka acked every event.

Content types (OpenMeter v1 semantics):
* `application/cloudevents+json`        one event object
* `application/cloudevents-batch+json`  a JSON array of events
* `application/json`                    one event object or an array
(each optionally with `charset=utf-8`). Anything else is 415.

The body is read raw and bounded while streaming (a lying or absent Content-Length cannot make us
buffer more than `max_body_bytes`), parsed with orjson, validated all-or-nothing by
`meterline.core.events`, grouped by subject into Kafka messages and published. Errors are raised, never
turned into responses here: `meterline.adapters.problems` owns every status code.

The router reads `request.app.state.settings` (`Settings`) and `request.app.state.producer` (a
`Publisher`: `ingest.producer.EventProducer` in a process, an in-memory fake in unit tests), which
`ingest.app.ingest_lifespan` sets, so a combined app can include it as is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from ingest.fastpath import fast_messages
from meterline.adapters.problems import (
    PROBLEM_MEDIA_TYPE,
    PROBLEM_SCHEMA,
    BodyTooLargeError,
    MalformedBodyError,
    UnsupportedContentTypeError,
)
from meterline.core.access import DEFAULT_NAMESPACE, Principal
from meterline.core.attributes import MAX_LENGTHS
from meterline.core.errors import BrokerUnavailableError, InvalidEventError, RateLimitedError
from meterline.core.events import CHUNK_MAX_BYTES, NAMESPACE_ATTRIBUTE, encode_messages, validate_events
from meterline.core.json_numbers import inexact_numbers
from meterline.core.times import format_time

logger = logging.getLogger(__name__)

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
PLAIN = "application/json"
#: Requests with more events than this are validated in a worker thread...
OFFLOAD_THRESHOLD = 500
#: ...unless `ingest.fastpath` takes them, which it tries on the loop up to this many events (~1-2 us an
#: event: a few ms at most). Why: 16 clients posting batches of 1000 kept up to 16 threads contending for
#: the GIL with the loop, ~40% more CPU per request than validating on the loop (bench P1, README).
FAST_OFFLOAD_THRESHOLD = 5000

EVENTS_ACCEPTED = Counter("meterline_ingest_events_accepted_total", "Events acknowledged by Kafka")
EVENTS_REJECTED = Counter(
    "meterline_ingest_events_rejected_total", "Events (or requests, if unreadable) rejected", ["reason"]
)
BATCHES = Counter("meterline_ingest_batches_total", "Accepted ingest requests")
MESSAGES = Counter("meterline_ingest_messages_total", "Kafka messages published")
IN_FLIGHT = Gauge("meterline_ingest_publishes_in_flight", "Requests between the drain check and the broker's answer")
PUBLISH_SECONDS = Histogram(
    "meterline_ingest_publish_seconds",
    "Time from first produce to the last broker ack of one request",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "CloudEvent (structured JSON mode). `time` defaults to the receive time.",
    "required": ["specversion", "id", "source", "type", "subject"],
    "properties": {
        "specversion": {"type": "string", "example": "1.0"},
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1},
        "type": {"type": "string", "minLength": 1},
        "subject": {"type": "string", "minLength": 1},
        "time": {"type": "string", "format": "date-time"},
        "datacontenttype": {"type": "string"},
        "dataschema": {"type": "string"},
        "data": {},
    },
    "additionalProperties": True,
}
_PROBLEM = {"content": {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}}}
_OPENAPI_EXTRA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            SINGLE: {"schema": _EVENT_SCHEMA},
            BATCH: {"schema": {"type": "array", "items": _EVENT_SCHEMA}},
            PLAIN: {"schema": {"anyOf": [_EVENT_SCHEMA, {"type": "array", "items": _EVENT_SCHEMA}]}},
        },
    },
    "responses": {
        "400": {"description": "Invalid events or malformed body", **_PROBLEM},
        "413": {"description": "Body or batch too large", **_PROBLEM},
        "415": {"description": "Unsupported content type", **_PROBLEM},
        "503": {"description": "Broker did not acknowledge in time; retry", **_PROBLEM},
    },
}

router = APIRouter(tags=["Events"])


class Publisher(Protocol):
    """Where a request's Kafka messages go."""

    async def publish(self, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """Send `(key, value)` messages; return once the broker acknowledged every one.

        Raises `BrokerUnavailableError` (HTTP 503) when it did not within the produce timeout; the
        request then answers 503 and the client resends (dedupe absorbs what did arrive).
        """


#: Accepted Content-Type headers already parsed (clients send one or two spellings): a dict hit instead of
#: a split per request. Bounded, and only accepted headers enter it.
_ACCEPTED_HEADERS: dict[str, str] = {}
_ACCEPTED_HEADERS_MAX = 64


def media_type(header: str | None) -> str:
    """Return the accepted media type of a Content-Type header, or raise UnsupportedContentTypeError."""
    if header is not None:
        known = _ACCEPTED_HEADERS.get(header)
        if known is not None:
            return known
    if not header:
        raise UnsupportedContentTypeError(f"Content-Type is required: one of {SINGLE}, {BATCH}, {PLAIN}")
    main, *params = (p.strip() for p in header.split(";"))
    main = main.lower()
    if main not in (SINGLE, BATCH, PLAIN):
        raise UnsupportedContentTypeError(
            f"unsupported Content-Type {main!r}; use {SINGLE}, {BATCH} or {PLAIN}"
        )
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedContentTypeError(f"unsupported charset {value.strip()!r}; only utf-8")
    if len(_ACCEPTED_HEADERS) < _ACCEPTED_HEADERS_MAX:
        _ACCEPTED_HEADERS[header] = main
    return main


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """Read the body from the ASGI `receive`, refusing (413) as soon as it is known to exceed `limit` bytes.

    What Starlette's `Request.stream()` does (ClientDisconnect when the client goes), without an async
    generator per request; a body that arrives in one message (any small request) is used as it is.
    """
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BodyTooLargeError(f"body of {declared} bytes exceeds the limit of {limit}")
        except ValueError:
            raise MalformedBodyError("Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise BodyTooLargeError(f"body exceeds the limit of {limit} bytes")
                if not more and not chunks:
                    return chunk
                chunks.append(chunk)
            if not more:
                return b"".join(chunks)
        elif kind == "http.disconnect":
            raise ClientDisconnect()


def parse_items(body: bytes, kind: str) -> list[Any]:
    """Decode the JSON body into a list of candidate events according to the content type."""
    if not body:
        raise MalformedBodyError("the body is empty")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBodyError(f"the body is not valid JSON: {exc}") from None
    if kind == SINGLE:
        if not isinstance(value, dict):
            raise MalformedBodyError(f"{SINGLE} expects one event object; send arrays as {BATCH}")
        return [value]
    if kind == BATCH:
        if not isinstance(value, list):
            raise MalformedBodyError(f"{BATCH} expects a JSON array of events")
        return value
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise MalformedBodyError(f"{PLAIN} expects an event object or an array of events")


def _prepare(body: bytes, items: list[Any], received_at: datetime, namespace: str, settings: Any,
             fast: bool) -> tuple[list[tuple[bytes, bytes]], int]:
    """The request's Kafka messages and its event count: refuse numbers orjson could not keep exactly, then
    validate, normalise and encode every event (`ingest.fastpath` first when `fast`, for the common
    request; `validate_events` and `encode_messages` for the rest, and always for refusals)."""
    inexact = inexact_numbers(body, items)
    if inexact:
        raise InvalidEventError(inexact, f"{len(inexact)} number(s) cannot be carried exactly")
    tenant = namespace if namespace != DEFAULT_NAMESPACE else None  # absent = default
    max_bytes = _chunk_bytes(settings.max_message_bytes)
    if fast:
        messages = fast_messages(items, body, lambda: format_time(received_at), tenant,
                                 max_data_bytes=settings.max_data_bytes, max_data_depth=settings.max_data_depth,
                                 max_bytes=max_bytes)
        if messages is not None:
            return messages, len(items)
    events = validate_events(items, received_at, max_data_bytes=settings.max_data_bytes,
                             max_data_depth=settings.max_data_depth)
    if tenant is not None:  # the key's tenant travels with each event
        for event in events:
            event[NAMESPACE_ATTRIBUTE] = tenant
    return (encode_messages(events, max_bytes=max_bytes) if events else []), len(events)


def _fast_prepare(body: bytes, items: list[Any], received_at: datetime, namespace: str,
                  settings: Any) -> list[tuple[bytes, bytes]] | None:
    """`_prepare`'s messages when `ingest.fastpath` takes the request (and no number is inexact), else None."""
    if inexact_numbers(body, items):
        return None  # `_prepare` refuses it, naming each number
    return fast_messages(items, body, lambda: format_time(received_at),
                         namespace if namespace != DEFAULT_NAMESPACE else None,
                         max_data_bytes=settings.max_data_bytes, max_data_depth=settings.max_data_depth,
                         max_bytes=_chunk_bytes(settings.max_message_bytes))


#: Bytes a Kafka record adds to its key and value (headers, lengths, timestamps, batch framing), rounded up.
RECORD_OVERHEAD = 512


def _chunk_bytes(max_message_bytes: int) -> int:
    """The value size ingest cuts messages at: under the broker's record limit with the longest key."""
    return min(CHUNK_MAX_BYTES, max_message_bytes - RECORD_OVERHEAD - 4 * MAX_LENGTHS["subject"])


def _refuse_oversized(messages: Sequence[tuple[bytes, bytes]], max_message_bytes: int) -> None:
    """413 before anything is produced when an event alone makes a record the broker would refuse."""
    for key, value in messages:
        size = len(key) + len(value) + RECORD_OVERHEAD
        if size > max_message_bytes:
            EVENTS_REJECTED.labels("too_large").inc()
            raise BodyTooLargeError(
                f"an event of subject {key[:100].decode(errors='replace')!r} makes a {size}-byte Kafka record; "
                f"the broker accepts at most {max_message_bytes} (max_message_bytes): nothing was published"
            )


@router.post(
    "/api/v1/events",
    status_code=204,
    response_class=Response,
    operation_id="ingestEvents",
    summary="Ingest events",
    description="Ingest one CloudEvent or a batch. 204 once the broker acknowledged every event.",
    openapi_extra=_OPENAPI_EXTRA,
)
async def ingest_events(request: Request) -> Response:
    """Validate the whole request, publish it grouped by subject, then answer 204.

    Apps built by `ingest.app` serve this path with `ingest.endpoint.IngestEndpoint` (the same `ingest`,
    without FastAPI's routing and dependency machinery); this route is what the OpenAPI document shows and
    what an app that only includes `router` serves.
    """
    headers = request.headers
    await ingest(request.app.state, request.state.principal, headers.get("content-type"),
                 headers.get("content-length"), request.receive)
    return Response(status_code=204)


async def ingest(state: Any, principal: Principal, content_type: str | None, content_length: str | None,
                 receive: Receive, *, fast: bool = False) -> None:
    """Read, validate and publish one request's events; return once Kafka acknowledged every one (then
    the caller answers 204). Raises the errors `meterline.adapters.problems` maps to statuses.

    `state` is the app's state (`settings`, `producer`, `limiter`), `principal` the request's (auth).
    `fast` tries `ingest.fastpath` before the validator (`IngestEndpoint` does; the FastAPI route keeps the
    validator alone, so tests/unit/test_ingest_endpoint.py holds the one against the other).
    """
    settings = state.settings
    received_at = datetime.now(UTC)
    try:
        kind = media_type(content_type)
        body = await read_body(receive, content_length, settings.max_body_bytes)
        items = parse_items(body, kind)
        if len(items) > settings.max_batch_events:
            raise BodyTooLargeError(
                f"{len(items)} events exceed the batch limit of {settings.max_batch_events}"
            )
    except UnsupportedContentTypeError:
        EVENTS_REJECTED.labels("unsupported_media_type").inc()
        raise
    except BodyTooLargeError:
        EVENTS_REJECTED.labels("too_large").inc()
        raise
    except MalformedBodyError:
        EVENTS_REJECTED.labels("malformed").inc()
        raise
    count = len(items)
    try:  # per-key event rate, counted before validation: validation is the CPU it protects
        state.limiter.charge_events(principal, count)
    except RateLimitedError:
        EVENTS_REJECTED.labels("rate_limited").inc(count)
        raise
    try:
        # Big batches are validated off the event loop (~20 us an event on the validator's full SDK path) so
        # small requests keep flowing, unless the fast path (~1-2 us an event) takes them on the loop.
        if count <= OFFLOAD_THRESHOLD:
            messages, accepted = _prepare(body, items, received_at, principal.namespace, settings, fast)
        else:
            tried = fast and count <= FAST_OFFLOAD_THRESHOLD
            taken = _fast_prepare(body, items, received_at, principal.namespace, settings) if tried else None
            if taken is not None:
                messages, accepted = taken, count
            else:
                messages, accepted = await asyncio.to_thread(
                    _prepare, body, items, received_at, principal.namespace, settings, fast and not tried)
    except InvalidEventError:
        EVENTS_REJECTED.labels("invalid").inc(count)
        raise
    # Only bytes are kept while Kafka acknowledges: the parsed events would otherwise stay alive across the
    # wait, and the collector would scan and promote every in-flight request's dicts again and again.
    del items, body
    if messages:
        _refuse_oversized(messages, settings.max_message_bytes)
        started = time.perf_counter()
        # Counted in flight *before* the drain check: a drain that sees the flag set and this gauge at 0
        # knows no request can still publish (meterline/localinfra/supervisor.py).
        IN_FLIGHT.inc()
        try:
            # os.access, not os.path.exists: the same answer (the file, symlinks followed, is there), without the
            # stat result and the FileNotFoundError that exists builds and drops on every request (~0.6 us).
            if settings.drain_file and os.access(settings.drain_file, os.F_OK):
                EVENTS_REJECTED.labels("draining").inc(accepted)
                raise BrokerUnavailableError("meterline is stopping: nothing of this request was published; retry")
            try:
                producer: Publisher = state.producer
                await producer.publish(messages)
            except BrokerUnavailableError:
                EVENTS_REJECTED.labels("broker_unavailable").inc(accepted)
                raise
        finally:
            IN_FLIGHT.dec()
        PUBLISH_SECONDS.observe(time.perf_counter() - started)
        MESSAGES.inc(len(messages))
        EVENTS_ACCEPTED.inc(accepted)
    BATCHES.inc()
