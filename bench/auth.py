"""What the auth-on figures share: a real API key in a stack's database, and limits high enough that
the limiter runs on every request without ever refusing one (the figures measure its cost, not its effect).

How the two sides are compared (`alternating`, `ratio_summary`): several short rounds, off and on
next to each other in ABBA order, one ratio per round; the figure is the median ratio, with its spread
(min, quartiles, max) in the JSON. `middleware_cost` is the second, in-process figure: µs per request.

The auth-off side is the same server in local mode without a key: the request skips key verification and
the limiter. The auth-on side presents a key, so each request pays the Authorization parse, the HMAC and
constant-time compare, the scope check and the limiter's counters.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from meterline.adapters.clickhouse import connect
from meterline.adapters.keystore import KeyStore
from meterline.core.access import Scope
from meterline.core.keys import ApiKey, generate_key, key_hash

#: Limits no bench load reaches, so the limiter counts but never refuses.
UNLIMITED_ENV = {
    "METERLINE_RATE_LIMIT_REQUESTS": "100000000/second",
    "METERLINE_RATE_LIMIT_EVENTS": "100000000000/second",
    "METERLINE_MAX_CONCURRENT_REQUESTS": "100000",
}


def create_key(clickhouse_url: str, database: str, secret_file: Path, namespace: str = "default") -> str:
    """A key with ingest and read scopes in `namespace`, stored as the `keys create` command would."""
    secret = secret_file.read_text().strip().encode()
    key_id, key = generate_key()
    client = connect(clickhouse_url)
    try:
        KeyStore(client, database).add(ApiKey(key_id, namespace, frozenset({Scope.INGEST, Scope.READ}),
                                              key_hash(secret, key), "bench", datetime.now(UTC)))
    finally:
        client.close()
    return key


T = TypeVar("T")  #: one measurement (a rate, a latency, or a tuple of them)


def alternating(rounds: int, off: Callable[[], T], on: Callable[[], T]) -> tuple[list[T], list[T]]:
    """Measure `off` and `on` once per round, in ABBA order (off, on, on, off, ...).

    Why: on a shared 2-core machine the load of other work drifts over seconds. Pairing each `on` with
    the `off` measured next to it, and flipping which goes first every round, makes a linear drift hit
    both sides alike; the per-round ratios then carry the comparison, not the absolute numbers.
    """
    offs: list[T] = []
    ons: list[T] = []
    for i in range(rounds):
        if i % 2 == 0:
            offs.append(off())
            ons.append(on())
        else:
            ons.append(on())
            offs.append(off())
    return offs, ons


def ratio_summary(offs: list[float], ons: list[float], *, higher_is_better: bool) -> dict[str, Any]:
    """Per-round ratios (above 1 = auth on is ahead, as `Figure.ratio` reads), their median and spread."""
    ratios = [(n / f if higher_is_better else f / n) for f, n in zip(offs, ons, strict=True)]
    ordered = sorted(ratios)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {
        "round_ratios": [round(r, 4) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_spread": {"min": round(ordered[0], 4), "p25": round(quartiles[0], 4), "p75": round(quartiles[2], 4),
                         "max": round(ordered[-1], 4)},
        "rounds": len(ratios),
    }


def middleware_cost(rounds: int, requests: int) -> dict[str, Any]:
    """In-process µs per request of the auth and limit middleware on the ingest path, key beside none.

    The real `AuthMiddleware` around the real `LimitMiddleware` around an app that charges one event (what
    the ingest route does), with the key view filled in memory: no socket, no ClickHouse, so the
    difference is what authentication itself costs each request. Alternating rounds; medians.
    """
    from meterline.adapters.auth import Authenticator, AuthMiddleware
    from meterline.adapters.limits import Limiter, LimitMiddleware
    from meterline.adapters.reloading import ReloadingView
    from meterline.settings import Settings

    secret = "bench-in-process-secret-0123456789abcdef"
    settings = Settings(auth_secret=secret, auth_local_mode=True, rate_limit_requests=UNLIMITED_ENV[
        "METERLINE_RATE_LIMIT_REQUESTS"], rate_limit_events=UNLIMITED_ENV["METERLINE_RATE_LIMIT_EVENTS"],
        max_concurrent_requests=int(UNLIMITED_ENV["METERLINE_MAX_CONCURRENT_REQUESTS"]))
    key_id, key = generate_key()
    stored = ApiKey(key_id, "default", frozenset({Scope.INGEST, Scope.READ}), key_hash(secret.encode(), key),
                    "bench", datetime.now(UTC))
    authenticator = Authenticator(settings)
    authenticator.keys = ReloadingView(lambda: {key_id: stored}, interval=3600, name="bench keys")
    authenticator.keys.value = {key_id: stored}
    limiter = Limiter(settings)
    charged = 0

    async def ingest(scope: Any, receive: Any, send: Any) -> None:
        nonlocal charged
        limiter.charge_events(scope["state"]["principal"], 1)
        charged += 1

    app = AuthMiddleware(LimitMiddleware(ingest, limiter=limiter), authenticator=authenticator)
    base = [(b"host", b"127.0.0.1"), (b"content-type", b"application/cloudevents+json"), (b"content-length", b"200")]
    keyed = [*base, (b"authorization", f"Bearer {key}".encode())]

    def timed(headers: list[tuple[bytes, bytes]]) -> float:
        async def loop() -> float:
            t0 = time.perf_counter()
            for _ in range(requests):
                await app({"type": "http", "method": "POST", "path": "/api/v1/events", "headers": headers},
                          _unused_receive, _unused_send)
            return (time.perf_counter() - t0) / requests * 1e6
        return asyncio.run(loop())

    timed(keyed)  # warm: the first request verifies the key
    offs, ons = alternating(rounds, lambda: timed(base), lambda: timed(keyed))
    if charged != (2 * rounds + 1) * requests:
        raise AssertionError(f"in-process auth bench: {charged} requests reached the app of {(2 * rounds + 1) * requests}")
    costs = [n - f for f, n in zip(offs, ons, strict=True)]
    return {"cost_us": statistics.median(costs), "round_cost_us": [round(c, 3) for c in costs],
            "without_key_us": [round(x, 3) for x in offs], "with_key_us": [round(x, 3) for x in ons],
            "requests_per_round": requests, "rounds": rounds}


async def _unused_receive() -> Any:
    raise AssertionError("the auth middleware under test reads no request body")


async def _unused_send(message: Any) -> None:
    raise AssertionError("the auth middleware under test sends no response")
