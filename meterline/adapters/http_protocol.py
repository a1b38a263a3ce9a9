"""uvicorn's httptools protocol with one keep-alive timer per idle stretch instead of one per request.

Why: uvicorn arms a keep-alive timer (`call_later`) when each response completes and cancels it when the
next request's first bytes arrive. On uvloop a timer armed and cancelled costs ~1.8 us, of a ~90 us
single-event ingest request (bench P1, docs/performance.md). Here the timer is armed when a connection
goes idle and no timer is pending; when it fires it closes the connection only if it is still idle and
has been for `timeout_keep_alive` seconds, else re-arms for the rest of that time (or, while a request
is being served, leaves the next idle stretch to arm it). An idle connection is still closed
`timeout_keep_alive` seconds after its last response, as uvicorn does (tests/integration/test_http_protocol.py).

Everything else is uvicorn's `HttpToolsProtocol` (pinned in pyproject.toml: this overrides three of its
methods, `on_response_complete` copied but for the arming).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["KeepAliveHttpToolsProtocol"]


class KeepAliveHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose keep-alive timer is armed once per idle stretch (see the module doc)."""

    #: Loop time at which the connection last went idle (a response completed, nothing pipelined); None
    #: while a request is being received or served.
    _idle_since: float | None = None

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls this when data arrives and when a response completes or the connection is lost:
        # the connection is not idle. A pending timer stays; when it fires it finds the connection busy.
        self._idle_since = None

    def on_response_complete(self) -> None:
        # uvicorn 0.54.0's, but for arming the keep-alive timer only when none is pending.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None:  # serving a request: its response's completion arms the next timer
            return
        remaining = idle_since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:  # idle again, but not for long enough yet
            self.timeout_keep_alive_task = self.loop.call_later(remaining, self.timeout_keep_alive_handler)
            return
        super().timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:  # nothing left to time out: do not keep self alive
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
