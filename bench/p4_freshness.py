"""P4 freshness: time from ingest's 204 to the event being visible in a meter query, at a steady rate.

Requests of 100 events leave on a fixed schedule (rate / 100 per second, each on its own task so a
slow answer never delays the next); every request has its own subject, so a query grouped by subject
tells exactly when each one became visible. A poller runs the real query path
(`query.store.WindowStore.meter`, FINAL included) every 50 ms for the subjects still pending, and a
request is visible once its subject's COUNT equals its size; the time taken is the query's end.

The baseline is the transport floor any Kafka-based pipeline pays: the same messages produced at the
same rate with ingest's producer settings, timed from the broker's ack to a plain consumer reading them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from confluent_kafka import Consumer, Producer

from bench import worker_metrics
from bench.context import BenchContext
from bench.report import Figure
from bench.workload import event, percentile, write_config
from ingest.producer import producer_config
from meterline.adapters.clickhouse import connect
from meterline.settings import Settings
from query.store import WindowStore

BATCH = 100
POLL_SECONDS = 0.05
TARGET_P99_MS = 500.0  # issue 15 (was 3 s)


def _bodies(n_requests: int, run: str) -> list[tuple[str, bytes]]:
    out = []
    for k in range(n_requests):
        subject = f"fresh-{run}-{k}"
        evs = [event(k * BATCH + j, run=run, subjects=1, subject=subject) for j in range(BATCH)]
        out.append((subject, orjson.dumps(evs)))
    return out


async def _send(url: str, bodies: list[tuple[str, bytes]], rate: float, acked: dict[str, float], ctx: BenchContext) -> None:
    interval = BATCH / rate
    errors: list[str] = []
    task = ctx.task(f"P4 sending {len(bodies) * BATCH:,} events at {rate:,.0f} ev/s", len(bodies))

    async def one(client: httpx.AsyncClient, subject: str, body: bytes) -> None:
        r = await client.post("/api/v1/events", content=body,
                              headers={"content-type": "application/cloudevents-batch+json"})
        if r.status_code == 204:
            acked[subject] = time.monotonic()
        else:
            errors.append(f"{r.status_code} {r.text[:200]}")
        ctx.progress.advance(task)

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        t0 = time.monotonic()
        pending = []
        for k, (subject, body) in enumerate(bodies):
            delay = t0 + k * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one(client, subject, body)))
        await asyncio.gather(*pending)
    ctx.done(task)
    if errors:
        raise RuntimeError(f"ingest answered {errors[0]} ({len(errors)} failed requests)")


def _poll(store: WindowStore, subjects: list[str], visible: dict[str, float], stop: threading.Event,
          query_ms: list[float] | None = None) -> None:
    """Until `stop`, record when each subject's COUNT first reaches BATCH (and each query's time)."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)  # whole minutes: windows only, no raw edges
    while not stop.is_set():
        pending = [s for s in subjects if s not in visible]
        if not pending:
            return
        began = time.monotonic()
        rows = store.meter("prompt_count", "COUNT", start=now - timedelta(hours=1), end=now + timedelta(hours=1),
                           subjects=pending, group_by_subject=True)
        t = time.monotonic()
        if query_ms is not None:
            query_ms.append((t - began) * 1000)
        for row in rows:
            if row.subject is not None and row.value >= BATCH:
                visible.setdefault(row.subject, t)
        time.sleep(POLL_SECONDS)


def _wait_ready(store: WindowStore, url: str, run: str) -> None:
    """Send one request and wait until it is visible: the worker owns its partitions, caches are warm."""
    body = orjson.dumps([event(i, run=f"warmup-{run}", subjects=1, subject=f"warmup-{run}") for i in range(BATCH)])
    r = httpx.post(url + "/api/v1/events", content=body, headers={"content-type": "application/cloudevents-batch+json"})
    r.raise_for_status()
    visible: dict[str, float] = {}
    stop = threading.Event()
    timer = threading.Timer(300, stop.set)  # worker start-up on a loaded machine can take minutes
    timer.start()
    _poll(store, [f"warmup-{run}"], visible, stop)
    timer.cancel()
    if not visible:
        raise TimeoutError("P4: the warm-up request never became visible (is the processor running?)")


def meterline_latencies(ctx: BenchContext, rate: float, seconds: float) -> tuple[list[float], dict[str, Any]]:
    """Latencies (ms) of every request, and where they went: the worker's stage histograms and the
    poller's query times."""
    config = write_config(ctx.work_dir)
    stack = ctx.infra.stack(config, processors=1, partitions=int(ctx.options.get("partitions", 4)))
    task = ctx.task("P4 starting pipeline (server + worker)", None)
    stack.start()
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    store = WindowStore(client, str(stack.database))
    run = uuid.uuid4().hex[:8]
    try:
        _wait_ready(store, stack.url, run)
        ctx.done(task)
        bodies = _bodies(max(1, int(rate * seconds / BATCH)), run)
        subjects = [s for s, _ in bodies]
        acked: dict[str, float] = {}
        visible: dict[str, float] = {}
        stop = threading.Event()
        query_ms: list[float] = []
        poller = threading.Thread(target=_poll, args=(store, subjects, visible, stop, query_ms), daemon=True)
        poller.start()
        asyncio.run(_send(stack.url, bodies, rate, acked, ctx))
        poller.join(timeout=60)
        stop.set()
        poller.join()
        missing = [s for s in subjects if s not in visible]
        if missing:
            raise AssertionError(f"P4: {len(missing)} of {len(subjects)} requests never became visible")
        where = {"worker": worker_metrics.stages(stack.workers[0]),
                 "query_ms": {"count": len(query_ms), "p50": percentile(query_ms, 50), "p99": percentile(query_ms, 99)},
                 "poll_interval_ms": POLL_SECONDS * 1000}
        return [max(0.0, visible[s] - acked[s]) * 1000 for s in subjects], where
    finally:
        client.close()
        stack.stop()


def kafka_latencies(ctx: BenchContext, rate: float, seconds: float) -> list[float]:
    """Broker ack -> plain consumer receipt, same message sizes and rate, ingest's producer settings."""
    topic = ctx.infra.topic("floor", int(ctx.options.get("partitions", 4)))
    bootstrap = ctx.infra.kafka_bootstrap
    run = uuid.uuid4().hex[:8]
    bodies = _bodies(max(1, int(rate * seconds / BATCH)), run)
    acked: dict[str, float] = {}
    received: dict[str, float] = {}
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"floor-{run}", "auto.offset.reset": "earliest",
                         "fetch.wait.max.ms": 10})
    assigned = threading.Event()
    consumer.subscribe([topic], on_assign=lambda c, parts: assigned.set())
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set() and len(received) < len(bodies):
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None and msg.key() != b"warmup":
                received.setdefault((msg.key() or b"").decode(), time.monotonic())

    producer = Producer(producer_config(Settings(kafka_bootstrap=bootstrap)))
    # Like the worker's warm-up request: time only once the consumer owns the partitions and has read.
    deadline = time.monotonic() + 60
    while not (assigned.is_set() and received) and time.monotonic() < deadline:
        producer.produce(topic, key=b"warmup", value=b"[]")
        producer.flush(5)
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            received["warmup"] = time.monotonic()
    received.clear()
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    task = ctx.task(f"P4 baseline: Kafka ack -> consumer at {rate:,.0f} ev/s", len(bodies))
    sending = threading.Event()
    sending.set()

    def poll_acks() -> None:  # as ingest does: delivery reports are taken the moment they arrive
        while sending.is_set():
            producer.poll(0.001)

    def record_ack(err: Any, msg: Any) -> None:
        if err is None:
            acked.setdefault((msg.key() or b"").decode(), time.monotonic())

    acks = threading.Thread(target=poll_acks, daemon=True)
    acks.start()
    t0 = time.monotonic()
    for k, (subject, body) in enumerate(bodies):
        delay = t0 + k * BATCH / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, key=subject.encode(), value=body, on_delivery=record_ack)
        ctx.progress.advance(task)
    while len(acked) < len(bodies) and time.monotonic() < t0 + seconds + 30:
        time.sleep(0.01)
    sending.clear()
    acks.join()
    producer.flush(30)
    thread.join(timeout=60)
    stop.set()
    thread.join()
    consumer.close()
    ctx.done(task)
    both = [s for s, _ in bodies if s in acked and s in received]
    if len(both) != len(bodies):
        raise AssertionError(f"P4 baseline: {len(bodies) - len(both)} messages not acked or not consumed")
    return [max(0.0, received[s] - acked[s]) * 1000 for s in both]


def run(ctx: BenchContext, size: int) -> list[Figure]:
    seconds = float(ctx.options.get("p4_seconds", 15.0))
    mine, where = meterline_latencies(ctx, size, seconds)
    floor = kafka_latencies(ctx, size, seconds)
    details: dict[str, Any] = {"rate": size, "seconds": seconds, "requests": len(mine), "batch": BATCH,
                               "all_visible": True, "poll_seconds": POLL_SECONDS, "where": where}
    figures = []
    for q in (50, 99):
        value, baseline = percentile(mine, q), percentile(floor, q)
        figures.append(Figure(
            "P4", f"freshness p{q} at {size:,} ev/s", len(mine) * BATCH, value, "ms", baseline,
            "Kafka floor: broker ack -> plain consumer", higher_is_better=False,
            target=f"<= {TARGET_P99_MS:g} ms" if q == 99 else "",
            passed=value <= TARGET_P99_MS if q == 99 else None, details=details,
        ))
    return figures
