"""P1 ingest: events/s through `POST /api/v1/events` vs. a raw confluent-kafka producer.

The baseline sends the same event bytes to the same broker, one event per message keyed by subject,
with the ingest producer's own librdkafka settings (`ingest.producer.producer_config`: acks=all,
idempotence, lz4, linger 1 ms), timed from the first `produce` to the end of `flush`. Ingest is
driven by 16 concurrent keep-alive connections (`--clients`) posting pre-encoded bodies (batches of 1000, of
100, and single events); a request counts once it returned 204, i.e. once the broker acked it.
`--p1-processes 1,2` measures each ingest process count on its own server (`meterline serve ingest`, README,
"Scaling": about one per core), each beside its own raw-producer rounds; every row also has the server's CPU per request
(/proc, the server and its workers), the steadier figure on a shared machine.

The load generator is aiohttp, not httpx: on 2 cores the client shares the machine with the server it
measures, and httpx spent a whole core to drive 32 connections at ~300 requests/s, so the figure
measured the client. aiohttp drives the same load with ~0.2 core.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from confluent_kafka import Producer

from bench.auth import UNLIMITED_ENV, alternating, create_key, middleware_cost, ratio_summary
from bench.context import BenchContext
from bench.infra import produce_all
from bench.report import Figure
from bench.workload import events, requests, write_config
from ingest.producer import producer_config
from meterline.settings import Settings

TARGET_BATCH_RATIO = 0.30
ISSUE_TARGET_BATCH_RATIO = 0.50  # issue 15: batches of 100, one ingest process per core
AUTH_TARGET = 0.95  # authentication and limits cost under 5% of ingest throughput
BATCH = "application/cloudevents-batch+json"
SINGLE = "application/cloudevents+json"


def raw_producer_rate(bootstrap: str, topic: str, evs: list[dict[str, Any]], ctx: BenchContext) -> float:
    """Messages/s of a bare librdkafka producer, one event per message."""
    config = producer_config(Settings(kafka_bootstrap=bootstrap))
    config["client.id"] = "meterline-bench-raw"
    producer = Producer(config)
    payloads = [(e["subject"].encode(), orjson.dumps(e)) for e in evs]
    failed = 0

    def on_delivery(err: Any, _msg: Any) -> None:
        nonlocal failed
        failed += err is not None

    task = ctx.task(f"P1 raw producer ({len(evs):,} msgs)", len(payloads))
    # Connection, metadata and the idempotent producer id come first, outside the timing.
    producer.produce(topic, value=payloads[0][1], key=payloads[0][0])
    producer.flush(30)
    t0 = time.perf_counter()
    for start in range(0, len(payloads), 10_000):
        produce_all(producer, topic, payloads[start : start + 10_000], on_delivery=on_delivery)
        ctx.progress.advance(task, min(10_000, len(payloads) - start))
    remaining = producer.flush(60)
    elapsed = time.perf_counter() - t0
    ctx.done(task)
    if remaining or failed:
        raise RuntimeError(f"raw producer: {remaining} undelivered, {failed} failed")
    return len(payloads) / elapsed


async def _post_all(
    url: str, bodies: list[bytes], content_type: str, clients: int, on_done: Any, key: str | None = None
) -> float:
    """POST every body with `clients` concurrent connections (with an API key if given); return elapsed seconds."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    errors: list[str] = []
    headers = {"content-type": content_type}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"

    async def post(session: aiohttp.ClientSession, body: bytes) -> str | None:
        """None when ingest answered 204, else the status and the start of the problem body."""
        async with session.post("/api/v1/events", data=body, headers=headers) as response:
            return None if response.status == 204 else f"{response.status} {(await response.text())[:200]}"

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            error = await post(session, queue.get_nowait())
            if error is not None:
                errors.append(error)
                return
            on_done()

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        # Open every connection (and warm the server's producer) before the clock starts.
        warm = await asyncio.gather(*(post(session, bodies[0]) for _ in range(clients)))
        if any(warm):
            raise RuntimeError(f"ingest warm-up answered {warm}")
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"ingest answered {errors[0]} ({len(errors)} failed requests)")
    return elapsed


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (uvicorn's worker processes), from
    /proc: on a shared machine the server's CPU per request is steadier than its rate."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue  # exited meanwhile
    return total


def ingest_rate(
    url: str, evs: list[dict[str, Any]], batch: int, clients: int, ctx: BenchContext, key: str | None = None
) -> float:
    if batch == 1:
        bodies = [orjson.dumps(e) for e in evs]
        content_type = SINGLE
    else:
        bodies = [orjson.dumps(body) for body in requests(evs, batch)]
        content_type = BATCH
    task = ctx.task(f"P1 ingest batch={batch}{' with key' if key else ''} ({len(evs):,} events)", len(bodies))
    elapsed = asyncio.run(_post_all(url, bodies, content_type, clients, lambda: ctx.progress.advance(task), key))
    ctx.done(task)
    return len(evs) / elapsed


def process_counts(ctx: BenchContext) -> list[int]:
    """Ingest process counts P1 measures (`--p1-processes 1,2`; default `--http-workers`), each on its own server."""
    text = str(ctx.options.get("p1_processes") or "")
    counts = [int(c) for c in text.split(",") if c.strip()] or [int(ctx.options.get("http_workers", 1))]
    if any(c < 1 for c in counts):
        raise ValueError(f"--p1-processes must be positive counts, got {text!r}")
    return counts


def run(ctx: BenchContext, size: int) -> list[Figure]:
    """P1 at each process count (README, "Scaling": about one ingest process per core), the auth rows
    with the first; every count keeps its own raw-producer rounds, so each ratio is against a baseline
    measured beside it."""
    figures: list[Figure] = []
    counts = process_counts(ctx)
    for index, workers in enumerate(counts):
        figures.extend(_run_with(ctx, size, workers, auth=index == 0, named=len(counts) > 1 or workers != 1))
    return figures


def _run_with(ctx: BenchContext, size: int, workers: int, *, auth: bool, named: bool) -> list[Figure]:
    clients = int(ctx.options.get("clients", 16))
    single_cap = int(ctx.options.get("p1_single_cap", 5000))
    rounds = int(ctx.options.get("p1_rounds", 3))
    config = write_config(ctx.work_dir)
    # `meterline serve ingest`: the ingest process README "Scaling out" recommends, one per core
    stack = ctx.infra.stack(config, processors=0, partitions=int(ctx.options.get("partitions", 4)), http_workers=workers,
                            extra_env=UNLIMITED_ENV, http_app="ingest")
    suffix = f", {workers} ingest process{'es' if workers > 1 else ''}" if named else ""
    try:
        task = ctx.task(f"P1 starting HTTP server ({workers} ingest process(es))", None)
        stack.start()
        ctx.done(task)
        key = create_key(str(stack.clickhouse_url), str(stack.database), stack.auth_secret_file)
        evs = events(size, subjects=100)
        # Rounds alternate baseline and ingest so drift on a shared machine hits both; medians are reported.
        raw_rates: list[float] = []
        rates: dict[int, list[float]] = {1000: [], 100: [], 1: []}
        cpu_us: dict[int, list[float]] = {batch: [] for batch in rates}  # server CPU per request
        server_pid = stack.server.pid if stack.server is not None else None
        for _ in range(rounds):
            raw_rates.append(raw_producer_rate(str(stack.kafka_bootstrap), str(stack.topic), evs, ctx))
            for batch, got in rates.items():
                sample = evs if batch > 1 else evs[:single_cap]
                before = process_cpu_seconds(server_pid) if server_pid else 0.0
                got.append(ingest_rate(stack.url, sample, batch, clients, ctx))
                if server_pid:
                    requests_sent = -(-len(sample) // batch)
                    cpu_us[batch].append((process_cpu_seconds(server_pid) - before) / requests_sent * 1e6)
        raw = statistics.median(raw_rates)
        figures = []
        for batch, got in rates.items():
            rate = statistics.median(got)
            # Issue 15: batches of 100 at >= 0.5x the raw producer with one ingest process per core.
            goal = ISSUE_TARGET_BATCH_RATIO if batch == 100 and workers == os.cpu_count() else TARGET_BATCH_RATIO
            target = batch > 1
            figures.append(Figure(
                "P1", (f"ingest batch={batch}" if batch > 1 else "ingest single events") + suffix,
                len(evs) if batch > 1 else min(single_cap, len(evs)),
                rate, "ev/s", raw, "raw confluent-kafka producer, 1 msg/event",
                target=f">= {goal:.2f}x" if target else "(no target)",
                passed=(rate / raw >= goal) if target else None,
                details={"clients": clients, "http_workers": workers, "rounds": rounds,
                         "raw_msgs_per_s": [round(r) for r in raw_rates], "ingest_ev_per_s": [round(r) for r in got],
                         "ratio_per_round": [round(r / b, 4) for r, b in zip(got, raw_rates, strict=True)],
                         "server_cpu_us_per_request": [round(c, 1) for c in cpu_us[batch]],
                         "server_cpu_us_per_event": [round(c / batch, 2) for c in cpu_us[batch]]},
            ))
        if auth:
            figures.extend(_auth_figures(ctx, stack.url, key, evs, clients, rates, workers))
        return figures
    finally:
        stack.stop()


def _auth_figures(ctx: BenchContext, url: str, key: str, evs: list[dict[str, Any]], clients: int,
                  keyless: dict[int, list[float]], workers: int) -> list[Figure]:
    """Auth on beside off: the same ingest requests with an API key and without, in alternating rounds.

    Rounds are short (`auth_events` events in batches of 100, `auth_single` single events) and many
    (`auth_rounds`), ABBA ordered (bench/auth.py): each round's ratio compares two runs seconds apart, and
    the figure is the median ratio, its spread in `details`. Then the in-process middleware cost in µs,
    beside the server time of one keyless single-event request (1 / its rate on one ingest process).
    """
    rounds = int(ctx.options.get("auth_rounds", 6))
    figures = []
    for batch, n in ((100, int(ctx.options.get("auth_events", 20_000))), (1, int(ctx.options.get("auth_single", 2_000)))):
        sample = evs[: min(n, len(evs))]
        offs, ons = alternating(rounds, partial(ingest_rate, url, sample, batch, clients, ctx),
                                partial(ingest_rate, url, sample, batch, clients, ctx, key))
        summary = ratio_summary(offs, ons, higher_is_better=True)
        off, on = statistics.median(offs), statistics.median(ons)
        figures.append(Figure(
            "P1", f"auth on: ingest {'batch=100' if batch > 1 else 'single events'} with an API key",
            len(sample), on, "ev/s", off, "same requests without a key (local mode: no verification, no limiter)",
            ratio=summary["ratio_median"], target=f">= {AUTH_TARGET:.2f}x (median of rounds)",
            passed=summary["ratio_median"] >= AUTH_TARGET,
            details={**summary, "clients": clients, "batch": batch, "with_key_ev_per_s": [round(r) for r in ons],
                     "without_key_ev_per_s": [round(r) for r in offs],
                     "auth_cost_us_per_request": round((1 / on - 1 / off) * batch * 1e6, 1)},
        ))
    task = ctx.task("P1 auth middleware in process", None)
    cost = middleware_cost(rounds, int(ctx.options.get("auth_inprocess_requests", 20_000)))
    ctx.done(task)
    # Server time of one keyless single-event request: its rate is spread over the ingest processes.
    request_us = workers * 1e6 / statistics.median(keyless[1])
    figures.append(Figure(
        "P1", "auth on: middleware cost per request, in process", cost["rounds"] * cost["requests_per_round"],
        cost["cost_us"], "us", request_us, "server time of one keyless single-event ingest request (1/rate)",
        higher_is_better=False, target=f"< {1 - AUTH_TARGET:.0%} of it (>= {1 / (1 - AUTH_TARGET):g}x)",
        passed=cost["cost_us"] < (1 - AUTH_TARGET) * request_us,
        details={**cost, "share_of_single_event_request": round(cost["cost_us"] / request_us, 4)},
    ))
    return figures
