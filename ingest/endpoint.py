"""`POST /api/v1/events` served as a pure ASGI app ahead of FastAPI's router.

Why: services often send one event per request, and for such a request FastAPI's machinery (route
matching over every API route, dependency solving, the request/response wrappers, exception middleware
layers, its telemetry checks) cost more CPU than reading, validating and publishing the event itself
(profiled: ~60% of the app's time for a single event; bench P1 in README). This middleware sits inside
authentication, limits and the latency histogram (so those are unchanged) and answers that one method
and path with `ingest.routes.ingest`, the code the FastAPI route runs, with its fast path on
(`ingest.fastpath`: the common request validated and encoded in one pass); every other request goes on
to the router. The FastAPI route stays declared, so the OpenAPI document is unchanged, and it validates
with `meterline.core.events` alone: tests/unit/test_ingest_endpoint.py checks every answer of the one
against the other.

Errors are answered by the app's own exception handlers (`meterline.adapters.problems`), looked up as
Starlette's ExceptionMiddleware does, so every refusal is the same RFC 7807 problem+json; an exception
without a handler propagates to the server-error handler (500), as from the route.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ingest.routes import ingest, router

PATH = "/api/v1/events"


class IngestEndpoint:
    """Pure ASGI middleware: serve `POST /api/v1/events`, pass everything else to the inner app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # The route FastAPI's router would put in `scope["route"]` (query/latency.py labels requests by it).
        self._route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        app = scope["app"]
        scope["route"] = self._route
        content_type = content_length = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if name == b"content-type":
                if content_type is None:
                    content_type = value.decode("latin-1")
            elif name == b"content-length" and content_length is None:
                content_length = value.decode("latin-1")
        try:
            await ingest(app.state, scope["state"]["principal"], content_type, content_length, receive, fast=True)
        except Exception as exc:
            handler = _handler(app.exception_handlers, exc)
            if handler is None:
                raise
            response = handler(Request(scope, receive), exc)
            if inspect.isawaitable(response):
                response = await response
            await response(scope, receive, send)
            return
        # What `Response(status_code=204)` sends: no headers (no content-length on a 204), an empty body.
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _handler(handlers: dict[Any, Any], exc: Exception) -> Any:
    """The handler Starlette's ExceptionMiddleware would pick; None for what the server-error handler
    answers (`Exception`, 500)."""
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        handler = handlers.get(cls)
        if handler is not None:
            return handler
    return None
