"""Per-key limits that keep one tenant from starving the others: request rate, ingest event rate and
requests in flight, each answered with 429 and `Retry-After`.

Rates are sliding-window counters (`meterline.core.ratelimit`, O(1) per hit, well under a microsecond;
the `limits` library only parses the settings' rate text), kept in process memory: with N ingest or query processes a key may reach N times a limit. That is deliberate: the
limits exist to stop a runaway client from exhausting a process, and a shared counter would put a
network round trip (and a single point of failure) on every request. The concurrency limit bounds how
many of a key's requests one process serves at once, so a client that opens hundreds of connections of
slow queries still leaves room for everyone else. Keyless requests of local mode (`make run`: one
tenant, loopback only) are not limited; a key presented there is.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from starlette.types import ASGIApp, Receive, Scope, Send

from meterline.adapters.problems import problem
from meterline.core.access import Principal
from meterline.core.errors import ConfigError, RateLimitedError
from meterline.core.ratelimit import SlidingWindow
from meterline.settings import Settings


def _rate(setting: str, text: str) -> RateLimitItem:
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {text!r} is not a rate such as '100/second' or '6000/minute'") from exc


class Limiter:
    """Counts requests, events and requests in flight per principal (`Principal.rate_key`)."""

    def __init__(self, settings: Settings) -> None:
        self.requests = _rate("rate_limit_requests", settings.rate_limit_requests)
        self.events = _rate("rate_limit_events", settings.rate_limit_events)
        self.max_in_flight = settings.max_concurrent_requests
        self._request_window = _window(self.requests)
        self._event_window = _window(self.events)
        self.in_flight: dict[str, int] = {}  # key -> requests being served; absent when none

    def charge_request(self, principal: Principal) -> None:
        """Count one request; RateLimitedError if the key is over its request rate."""
        key = principal.rate_key
        now = time.monotonic()
        if not self._request_window.hit(key, now):
            raise RateLimitedError(f"request rate limit of {self.requests} exceeded for this key",
                                   _seconds(self._request_window.retry_after(key, now)))

    def charge_events(self, principal: Principal, count: int) -> None:
        """Count `count` ingested events; RateLimitedError (nothing counted) if they would pass the rate.

        Keyless local mode (one tenant on a developer's loopback server) is not limited.
        """
        if principal.key_id is None:
            return
        key = principal.rate_key
        now = time.monotonic()
        if count > self.events.amount:
            raise RateLimitedError(f"{count} events exceed the event rate limit of {self.events} in one request; "
                                   "send smaller batches", _seconds(self._event_window.retry_after(key, now)))
        if not self._event_window.hit(key, now, cost=count):
            raise RateLimitedError(f"event rate limit of {self.events} exceeded for this key",
                                   _seconds(self._event_window.retry_after(key, now, cost=count)))


def _window(item: RateLimitItem) -> SlidingWindow:
    return SlidingWindow(item.amount, float(item.get_expiry()))


def _seconds(wait: float) -> int:
    """A Retry-After value: whole seconds, at least 1 (a refused client must not retry at once)."""
    return max(1, math.ceil(wait))


class LimitMiddleware:
    """Pure ASGI: request rate and concurrency per principal (set by AuthMiddleware, which wraps this)."""

    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get("state", {}).get("principal") if scope["type"] == "http" else None
        if principal is None or principal.key_id is None:  # lifespan, public paths, keyless local mode
            await self.app(scope, receive, send)
            return
        key = principal.rate_key
        in_flight = self.limiter.in_flight
        try:
            if in_flight.get(key, 0) >= self.limiter.max_in_flight:
                raise RateLimitedError(f"more than {self.limiter.max_in_flight} requests of this key in flight", 1)
            self.limiter.charge_request(principal)
        except RateLimitedError as exc:
            response = problem(429, "Too many requests", str(exc), instance=scope["path"],
                               headers={"Retry-After": str(exc.retry_after)})
            await response(scope, receive, send)
            return
        in_flight[key] = in_flight.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = in_flight[key] - 1
            if left:
                in_flight[key] = left
            else:
                del in_flight[key]
