"""The query HTTP service: wiring only (router + problem handlers + health + ClickHouse client lifecycle).

The ClickHouse client is built in the lifespan, never at import, so importing this module (tests,
the combined `make run` app, OpenAPI generation) needs no server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from meterline.adapters.auth import install_auth
from meterline.adapters.clickhouse import connect, create_schema, read_guards
from meterline.adapters.health import ReadinessCheck, health_router, state_details
from meterline.adapters.meter_store import MeterCatalog, MeterStore
from meterline.adapters.problems import install_problem_handlers
from meterline.core.errors import ConfigError
from meterline.settings import Settings
from query.coarse import CoarseMonths
from query.event_routes import router as events_router
from query.latency import RequestLatencyMiddleware
from query.meter_routes import install_meter_problem_handlers
from query.meter_routes import router as meter_router
from query.openapi import drop_unreachable_422
from query.portal import router as portal_router
from query.routes import install_query_problem_handlers, router
from query.store import WindowStore
from query.subject_routes import router as subjects_router

log = logging.getLogger(__name__)

__all__ = ["clickhouse_check", "create_app", "install_query", "query_lifespan", "router"]

@asynccontextmanager
async def query_lifespan(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """Connect to ClickHouse and publish `catalog` (the meter store, kept fresh) and `query_store` on
    `app.state` for `query.routes`. Meters change only through the store: `meterline.server` runs the meter
    controller beside this (config.yaml reload, rebuilds, switches); without it new meters stay building.

    A combined app enters this inside its own lifespan (e.g. with an AsyncExitStack).
    """
    if settings.clickhouse_url is None:
        raise ConfigError("clickhouse_url (CLICKHOUSE_URL) is required by the query API")
    guards = read_guards(settings.query_max_rows, settings.query_timeout_seconds)
    reader = settings.clickhouse_reader_url or settings.clickhouse_url
    client = await asyncio.to_thread(
        functools.partial(connect, reader, topology=settings.clickhouse_topology, **guards)
    )
    # The subjects API writes; reads stay on the read-only client.
    writer = await asyncio.to_thread(connect, settings.clickhouse_url, topology=settings.clickhouse_topology)
    # Unscoped: routes read through `query_store.scoped(namespace)`, and an unscoped read raises.
    # Coarse rows exist only where compaction runs: on a cluster it is refused, and so is reading them.
    coarse = CoarseMonths(enabled=settings.clickhouse_topology.cluster is None)
    app.state.query_store = WindowStore(client, settings.clickhouse_database, max_windows=settings.query_max_windows,
                                        writer=writer, namespace=None, coarse=coarse)
    catalog = await asyncio.to_thread(open_catalog, settings)
    app.state.catalog = catalog
    app.state.events_topic = (settings.events_topic, settings.topic_partitions)  # for completeUntil
    poller = asyncio.create_task(_poll(catalog, settings.meter_poll_seconds))
    # The compaction records, read off the requests' path (query/coarse.py).
    coarse_reader = asyncio.create_task(coarse.keep_fresh(client, settings.clickhouse_database))
    try:
        yield
    finally:
        poller.cancel()
        coarse_reader.cancel()
        await asyncio.to_thread(catalog.store.client.close)
        await asyncio.to_thread(client.close)
        await asyncio.to_thread(writer.close)


def open_catalog(settings: Settings) -> MeterCatalog:
    """The meter catalog on its own client (tables created if missing), loaded once."""
    assert settings.clickhouse_url is not None
    topology = settings.clickhouse_topology
    admin = connect(settings.clickhouse_url, database="default", topology=topology)
    try:
        create_schema(admin, settings.clickhouse_database, topology)
    finally:
        admin.close()
    client = connect(settings.clickhouse_url, database=settings.clickhouse_database, topology=topology)
    catalog = MeterCatalog(MeterStore(client, settings.clickhouse_database, topology=settings.clickhouse_topology))
    try:
        for problem in catalog.sync_settings(settings, actor="query"):
            log.warning("config meter not applied: %s", problem)
    except ConfigError as exc:
        log.error("config.yaml is invalid; serving the meters in the store: %s", exc)
    catalog.refresh(force=True)
    catalog.refresh_progress()
    return catalog


async def _poll(catalog: MeterCatalog, seconds: float) -> None:
    """Keep the catalog (and rebuild progress) fresh: other processes change meters too."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(catalog.refresh)
            await asyncio.to_thread(catalog.refresh_progress)
        except Exception:
            log.warning("meter catalog refresh failed", exc_info=True)


def clickhouse_check(app: FastAPI) -> ReadinessCheck:
    """Readiness probe: ClickHouse answers a ping."""

    async def check() -> bool:
        store: WindowStore | None = getattr(app.state, "query_store", None)
        return store is not None and await asyncio.to_thread(store.ping)

    return check


def install_query(app: FastAPI) -> None:
    """Router, query error mappings and the latency histogram, for this app or a combined one."""
    install_query_problem_handlers(app)
    install_meter_problem_handlers(app)
    app.include_router(meter_router)
    app.include_router(router)
    app.include_router(events_router)
    app.include_router(subjects_router)
    app.include_router(portal_router)
    generate = app.openapi
    app.openapi = lambda: drop_unreachable_422(generate())  # type: ignore[method-assign]
    app.add_middleware(RequestLatencyMiddleware)


def create_app(settings: Settings) -> FastAPI:
    """Query-only app (deploy/): /api/v1/meters..., GET /api/v1/events, dead letters, health, metrics."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with auth.running(), query_lifespan(app, settings):
            yield

    app = FastAPI(title="meterline query", version="0.1.0", lifespan=lifespan,
                  # nothing here uses OpenTelemetry; on, FastAPI probes three providers per request
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    install_problem_handlers(app)
    install_query(app)
    auth = install_auth(app, settings)  # added last: outermost, before latency and every route
    app.include_router(health_router({"clickhouse": clickhouse_check(app)}, details=lambda: state_details(app)))
    return app
