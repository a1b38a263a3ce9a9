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

`IngestFrontDoor` is what a server serves (`meterline.server.asgi_app`): it hands the same requests to that
same middleware chain (auth, limits, the latency histogram, this endpoint; the app's own instances) inside
a `ServerErrorMiddleware` of the app's 500 handler, skipping FastAPI's and Starlette's entry calls and
FastAPI's exception-telemetry layer, which telemetry off leaves with nothing to do (~3 us of a ~90 us
single-event request, bench P1). Everything else goes to the app as before.

Errors are answered by the app's own exception handlers (`meterline.adapters.problems`), looked up as
Starlette's ExceptionMiddleware does, so every refusal is the same RFC 7807 problem+json; an exception
without a handler propagates to the server-error handler (500), as from the route.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware
from starlette.middleware.errors import ServerErrorMiddleware
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


class IngestFrontDoor:
    """The served app: `POST /api/v1/events` into `app`'s middleware chain that ends in `IngestEndpoint`,
    everything else (lifespan included) into `rest`: `app` itself, or what the server wraps it in for the
    other requests (`meterline.server.served`: proxy headers, which nothing on the ingest path reads)."""

    def __init__(self, app: FastAPI, rest: ASGIApp | None = None) -> None:
        self.app = app
        self.rest = app if rest is None else rest
        self._chain: ASGIApp | None = None
        self._direct = True  # until the first ingest request finds the chain (or does not)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST" or not self._direct:
            await self.rest(scope, receive, send)
            return
        chain = self._chain
        if chain is None:
            chain = self._chain = self._find_chain()
            if chain is None:
                self._direct = False
                await self.rest(scope, receive, send)
                return
        scope["app"] = self.app  # what Starlette.__call__ sets; the endpoint's handlers and state hang on it
        await chain(scope, receive, send)

    def _find_chain(self) -> ASGIApp | None:
        """`ServerErrorMiddleware` (as the app has it) around the app's user middleware down to `IngestEndpoint`,
        or None (the app is not the shape this was written for: serve it all through the app)."""
        app = self.app
        if app.root_path or app.debug or any(app._telemetry.get(k) for k in ("tracing", "metrics", "logs")):
            return None  # FastAPI.__call__ would do more than route to the stack: keep it
        if app.middleware_stack is None:
            app.middleware_stack = app.build_middleware_stack()  # what Starlette.__call__ does on first use
        outer = app.middleware_stack
        if not isinstance(outer, ServerErrorMiddleware) or not isinstance(outer.app, ExceptionTelemetryMiddleware):
            return None
        user = outer.app.app
        layer: Any = user
        while not isinstance(layer, IngestEndpoint):  # it must be in the chain, each layer wrapping the next
            layer = getattr(layer, "app", None)
            if layer is None:
                return None
        return ServerErrorMiddleware(user, handler=outer.handler, debug=outer.debug)


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
