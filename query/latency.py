"""Request latency histogram for the API routes, as a pure ASGI middleware.

Why not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs every request through an anyio
task group and memory streams; on the combined app it wrapped ingest too and cost ~15% of the CPU of
a 100-event `POST /api/v1/events` (bench P1). This wrapper only watches the response status.
"""

from __future__ import annotations

import time

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_SECONDS = Histogram(
    "meterline_query_request_seconds",
    "Query API request latency by route template",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def measured(path: str) -> bool:
    """Route templates worth a latency series (not health, metrics or docs)."""
    return path.startswith("/api/v1/meters") or path in ("/api/v1/events", "/api/v1/dead-letters")


class RequestLatencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The router records the matched route in the scope it was handed (this one).
            path = getattr(scope.get("route"), "path", "unmatched")
            if measured(path):
                REQUEST_SECONDS.labels(scope["method"], path, str(status)).observe(time.perf_counter() - started)
