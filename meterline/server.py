"""Builds the HTTP app a process serves: ingest alone, query alone (deploy/), or both (`make run`).

This is entrypoint wiring, so it may import the process packages; domain modules never do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from starlette.types import ASGIApp

from meterline.settings import Settings

APP_ENV = "METERLINE_SERVE_APP"


def app_from_env() -> ASGIApp:
    """uvicorn factory for multi-process serving: each worker process builds its own app (and producer)."""
    import os

    return served(build_app(os.environ.get(APP_ENV, "all"), Settings()))


def served(app: FastAPI) -> ASGIApp:
    """What `meterline serve` runs, under uvicorn with `serve_options()`: the ingest requests through
    `ingest.app.front_door` (FastAPI's entry layers skipped), every other request through uvicorn's
    ProxyHeadersMiddleware as uvicorn itself would add it (its `proxy_headers` is off in `serve_options`:
    nothing on the ingest path reads the client address or scheme, so ingest skips that layer too)."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from ingest.app import front_door

    # uvicorn types its ASGI callables more narrowly than Starlette; the same protocol either way
    proxied: Any = ProxyHeadersMiddleware(cast(Any, app), trusted_hosts=forwarded_allow_ips())
    return front_door(app, proxied)


def forwarded_allow_ips() -> str:
    """The proxies trusted for X-Forwarded-For/-Proto: uvicorn's default (FORWARDED_ALLOW_IPS, else loopback;
    tests/unit/test_cli.py holds it to uvicorn's own Config)."""
    import os

    return os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")


def serve_options() -> dict[str, Any]:
    """uvicorn options every `meterline serve` runs with (besides host, port, logging and limits)."""
    from meterline.adapters.http_protocol import KeepAliveHttpToolsProtocol

    return {
        # uvicorn's httptools protocol without a keep-alive timer armed and cancelled per request
        "http": KeepAliveHttpToolsProtocol,
        # `served` adds the proxy-headers layer itself, for every request but ingest's
        "proxy_headers": False,
        # No `server: uvicorn` on every response: naming the server tells clients nothing they need, and its
        # header checks cost ~0.5 us a request (bench P1); `date` stays (RFC 9110 asks origin servers for it).
        "server_header": False,
    }


def build_app(which: str, settings: Settings) -> FastAPI:
    """`ingest`, `query`, or `all`: one app with both routers, one OpenAPI document and both lifespans."""
    if which == "ingest":
        from ingest.app import create_app as create_ingest

        return create_ingest(settings)
    if which == "query":
        from query.app import create_app as create_query

        return with_meter_controller(create_query(settings), settings)
    if which != "all":
        raise ValueError(f"unknown app {which!r}: expected ingest, query or all")
    return _combined_app(settings)


def _combined_app(settings: Settings) -> FastAPI:
    from ingest.app import broker_check, ingest_lifespan, install_ingest
    from meterline.adapters.auth import install_auth
    from meterline.adapters.health import health_router, state_details, supervisor_check
    from meterline.adapters.problems import install_problem_handlers
    from query.app import clickhouse_check, install_query, query_lifespan

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(auth.running())
            await stack.enter_async_context(ingest_lifespan(app, settings))
            await stack.enter_async_context(query_lifespan(app, settings))
            yield

    app = FastAPI(title="meterline", version="0.1.0", lifespan=lifespan,
                  # nothing here uses OpenTelemetry; on, FastAPI probes three providers per request
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    install_problem_handlers(app)
    install_ingest(app)  # before the query's latency middleware and auth: both wrap it
    install_query(app)
    auth = install_auth(app, settings)  # added last: outermost, so every route is behind it
    checks = {"broker": broker_check(app), "clickhouse": clickhouse_check(app)}
    if settings.supervisor_status_file:  # `meterline run`: the processor workers it keeps up, too
        checks["processors"] = supervisor_check(settings.supervisor_status_file)
    app.include_router(health_router(checks, details=lambda: state_details(app)))
    return with_meter_controller(app, settings)


def with_meter_controller(app: FastAPI, settings: Settings) -> FastAPI:
    """Run the meter controller (config.yaml reload, background rebuilds, switches) inside `app`'s
    lifespan, on its own ClickHouse client, once the query lifespan has loaded the catalog."""
    import asyncio

    from meterline.adapters.clickhouse import connect
    from meterline.jobs.compaction import PeriodicCompaction
    from meterline.jobs.meter_controller import MeterController

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            assert settings.clickhouse_url is not None
            compaction = None
            if settings.compaction_interval_seconds is not None:  # docs/design.md, "Windows compaction"
                compaction = PeriodicCompaction(settings, app.state.catalog, lambda: connect(
                    str(settings.clickhouse_url), database=settings.clickhouse_database,
                    topology=settings.clickhouse_topology))
            client = await asyncio.to_thread(connect, settings.clickhouse_url, database=settings.clickhouse_database,
                                             topology=settings.clickhouse_topology)
            controller = MeterController(
                app.state.catalog, client, settings.clickhouse_database, config_file=settings.config_file,
                poll_seconds=settings.meter_poll_seconds, worker_ttl_seconds=settings.meter_worker_ttl_seconds,
                window_seconds=settings.window_size_seconds, topology=settings.clickhouse_topology,
            )
            await asyncio.to_thread(controller.reload_config)
            controller.start()
            app.state.meter_controller = controller
            if compaction is not None:
                compaction.start()
            if controller.config is not None:
                config = controller.config
                # /readyz detail: is config.yaml valid (the last good meters keep running when not).
                app.state.readiness_details = lambda: {"config": config.as_dict()}
            try:
                yield
            finally:
                if compaction is not None:
                    await asyncio.to_thread(compaction.stop)
                await asyncio.to_thread(controller.stop)
                await asyncio.to_thread(client.close)

    app.router.lifespan_context = lifespan
    return app
