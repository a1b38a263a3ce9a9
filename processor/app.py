"""Wire the processor worker: Settings -> Faust app with the agent, sink, dedupe state and web views.

Only wiring lives here (see processor/agents.py for the loop and meterline/core/rows.py for the rules).
Every knob, the worker's own included (`processor_session_timeout`, `processor_web_port`,
`processor_worker_id`, `log_level`, ...), is a `Settings` field (env `METERLINE_<FIELD>`).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meterline.adapters.compactions import replay_guard
from meterline.adapters.kafka import events_topic_config, kafka_client_config, sasl_credentials
from meterline.adapters.logs import configure_logging, logging_config
from meterline.core.errors import ConfigError
from meterline.settings import Settings
from processor import metrics  # noqa: F401  (registers the collectors served at /metrics)
from processor.agents import register_agent
from processor.batch import BatchProcessor
from processor.dedupe import DedupeState
from processor.fetching import limit_fetch_wait, stop_without_hanging
from processor.live_meters import LiveMeters
from processor.sink import ClickHouseSink
from processor.topics import ensure_events_topic

logger = logging.getLogger(__name__)

PURGE_INTERVAL_SECONDS = 6 * 3600.0
#: The cyclic GC's generation-0 threshold: tracked objects allocated, net of those freed, before it runs.
#: A batch's rows stay alive until their insert returns, while the next batch is built (processor/batch.py,
#: "Pipelining"): ~3 tracked lists an event (the `events` row, its errors and rejections), ~130k for two
#: batches of 20k events. With 100k every batch crossed it and the collection walked those rows, ~1.5-1.9 µs
#: an event (in process, CPU time); none of them is garbage. 1M is crossed by growth or cyclic garbage only
#: (docs/performance.md), which is then collected as before.
GC_THRESHOLD = 1_000_000
#: How often an idle worker looks for conflicts to repair (one `dedupe_keys` range read when nothing is new).
RECONCILE_INTERVAL_SECONDS = 2.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0); good enough for a local worker's web server."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def state_dir_for(settings: Settings, worker_id: str) -> Path:
    """`settings.state_dir`, else `<data_dir>/processor-<worker_id>`."""
    return Path(settings.state_dir) if settings.state_dir else Path(settings.data_dir) / f"processor-{worker_id}"


def rows_digest(settings: Settings) -> str:
    """A digest of every setting that shapes a message's rows besides its position: the salt of insert
    tokens, so a replay under a changed config is never dropped as a duplicate of the old rows."""
    try:
        meters: Any = [m.model_dump(mode="json", by_alias=True) for m in settings.meters()]
    except ConfigError:  # the worker runs with the stored meters; the file's text still salts the tokens
        meters = repr(settings.meters_raw)
    shape = {
        "meters": meters,
        "window": settings.window_size_seconds, "late": settings.late_horizon_days,
        "strict": settings.strict_event_types, "dedupe": settings.dedupe_horizon_days,
    }
    return hashlib.blake2b(json.dumps(shape, sort_keys=True).encode(), digest_size=8).hexdigest()


def broker_credentials(settings: Settings) -> faust.SASLCredentials | None:
    """Faust's (aiokafka's) SASL credentials: the same `kafka_sasl_*` settings the confluent-kafka clients
    get from `kafka_client_config`, so the consumer authenticates exactly like the admin calls beside it."""
    auth = sasl_credentials(settings)
    if auth is None:
        return None
    protocol, mechanism, username, password = auth
    context = None
    if protocol == "SASL_SSL":
        import ssl

        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    return faust.SASLCredentials(username=username, password=password, mechanism=mechanism, ssl_context=context)


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app: broker and ClickHouse must be reachable (both are retried for a while).

    Blocking work (topic creation, cluster id, schema) happens here, before the worker's event loop
    starts, so the agent only ever sees a ready world.
    """
    if not settings.kafka_bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP (or METERLINE_KAFKA_BOOTSTRAP) is not set")
    if not settings.clickhouse_url:
        raise ConfigError("CLICKHOUSE_URL (or METERLINE_CLICKHOUSE_URL) is not set")
    web_host = settings.processor_web_host
    web_port = settings.processor_web_port or free_port(web_host)
    worker_id = settings.processor_worker_id or f"{socket.gethostname()}-{web_port}"
    state_dir = state_dir_for(settings, worker_id)

    replication, topic_config = events_topic_config(settings)
    log_epoch = ensure_events_topic(kafka_client_config(settings), settings.events_topic, settings.topic_partitions,
                                    replication_factor=replication, config=topic_config)
    sink = ClickHouseSink(settings.clickhouse_url, settings.clickhouse_database,
                          topology=settings.clickhouse_topology, token_salt=rows_digest(settings),
                          replay_guard=replay_guard(settings, worker_id))
    max_lag_seconds = settings.topic_retention_hours * 3600
    # One day beyond what a load reads (BatchProcessor.keep_days): a TTL merge never races a load.
    sink.ensure_schema(keys_keep_days=math.ceil(settings.dedupe_horizon_days + max_lag_seconds / 86_400) + 1)
    live = LiveMeters(settings, worker_id)
    # Retried like the schema: a worker started while ClickHouse (or one shard of a cluster) is down
    # waits for it instead of crashing (tests/faults/test_cluster.py restarts one during a shard outage).
    sink.retry("start live meters", live.start, rows=0)
    state = DedupeState(str(state_dir / "dedupe"), settings.dedupe_horizon_days, max_lag_seconds=max_lag_seconds)
    if dropped := state.since_backfill(sink.keys_backfill):
        logger.info("dedupe_keys were backfilled since other partitions' keys were merged: merging them again",
                    extra={"partitions": dropped})
    processor = BatchProcessor(settings, live.catalog.meter_set(), state, sink, log_epoch, live=live)

    limit_fetch_wait(settings.processor_fetch_max_wait_ms)
    stop_without_hanging()
    app = faust.App(
        settings.consumer_group,
        broker=[f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",") if b.strip()],
        broker_credentials=broker_credentials(settings),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(state_dir / "faust"),
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.processor_session_timeout,
        broker_rebalance_timeout=settings.processor_rebalance_timeout,
        broker_heartbeat_interval=settings.processor_heartbeat,
        web_enabled=True,
        web_port=web_port,
        web_bind=web_host,
        web_host=web_host,
        # The default 4096 per partition lets a slow ClickHouse pile up minutes of events in memory.
        stream_buffer_maxsize=max(2 * settings.processor_batch_messages, 64),
    )
    app.meterline = processor  # type: ignore[attr-defined]
    app.meterline_state_dir = state_dir  # type: ignore[attr-defined]
    app.meterline_ephemeral_state = settings.processor_worker_id is None and not settings.state_dir  # type: ignore[attr-defined]
    register_agent(app, settings, processor)
    _register_views(app, processor)

    @app.timer(interval=settings.meter_poll_seconds)
    async def poll_meters() -> None:
        await processor.poll_meters()

    @app.timer(interval=RECONCILE_INTERVAL_SECONDS)
    async def reconcile_dedupe() -> None:
        try:
            await processor.reconcile()
        except Exception:  # a timer must not stop the worker; the next tick or batch does the same work
            logger.warning("dedupe reconcile failed; retried next time", exc_info=True)

    @app.timer(interval=PURGE_INTERVAL_SECONDS)
    async def purge_dedupe() -> None:
        import asyncio

        n = await asyncio.to_thread(state.purge)
        logger.info("dedupe keys past the horizon purged", extra={"keys": n})

    logger.info("processor configured", extra={"log_epoch": log_epoch, "topic": settings.events_topic,
                                               "web_port": web_port, "state_dir": str(state_dir)})
    return app


def _register_views(app: faust.App, processor: BatchProcessor) -> None:
    """`/healthz` (alive), `/readyz` (consumer assigned and the last ClickHouse write recent or none
    pending), `/metrics` (Prometheus text) on the worker's Faust web server."""

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ok = not processor.sink.failing
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "clickhouse": not processor.sink.failing,
                                "log_epoch": processor.log_epoch}
        if processor.live is not None:  # a broken config.yaml is reported, not fatal: stored meters run
            body["config"] = processor.live.config.as_dict()
        return web.json(body, status=200 if ok else 503)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])



def main(argv: list[str] | None = None) -> None:
    """`python -m processor [--web-port N]`: run one worker until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m processor", description="meterline processor worker")
    parser.add_argument("--web-port", type=int, default=None, help="web port for /healthz /readyz /metrics (0 = free)")
    args = parser.parse_args(argv)
    try:  # settings only: a broken meters list runs with the stored meters (start_meters)
        settings = Settings() if args.web_port is None else Settings(processor_web_port=args.web_port)
    except ConfigError as exc:
        sys.exit(f"meterline processor: invalid configuration\n{exc}")
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        sys.exit(f"meterline processor: invalid configuration\n{exc}")
    from faust.worker import Worker

    processor: BatchProcessor = app.meterline  # type: ignore[attr-defined]
    # The hot loop allocates ~10 dicts per event, none cyclic; CPython's default gen-0 threshold (700)
    # then runs the cyclic GC thousands of times per batch, which measured at 2-3x the cost of
    # metering. Freeze startup objects and collect rarely.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 100)
    worker = Worker(app, loglevel=settings.log_level, redirect_stdouts=False,
                    logging_config=logging_config(settings.log_level))
    try:
        worker.execute_from_commandline()
    finally:
        if processor.live is not None:
            processor.live.stop()
        processor.sink.stop()
        processor.state.close()
        if app.meterline_ephemeral_state:  # type: ignore[attr-defined]
            shutil.rmtree(app.meterline_state_dir, ignore_errors=True)  # type: ignore[attr-defined]
