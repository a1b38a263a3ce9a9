"""P2 processor: events/s one meterline worker turns into ClickHouse windows vs. a naive Faust agent.

Besides the standard figure (3 meters), P2 measures how the rate holds with realistic meter counts
(1, 3, 10, 20 meters on one LLM event type, `bench.meters_workload`): once in-process on
`message_rows` alone (CPU time, so other load on the machine moves it less; ratio to 3 meters) and
once through a worker (ratio to the naive agent); and the scaling curve of 1, 2 and 4 workers on 8
partitions. Those runs use `p2_extra` events: enough for several batches, or a run is one batch after
the worker's start and measures the start, not the rate.

N events are produced beforehand in ingest's wire format (1000-event requests cut by
`meterline.core.events.encode_messages`, ~100 events per message) into a fresh topic; then one worker
starts and ClickHouse is polled until every event is in `events` and counted in the `prompt_count`
windows. The rate runs from the first written batch to the last, timed by ClickHouse itself (each
`events` insert's `stored_at`; worker start-up excluded, see `meterline_run`), and the run must account
for every event exactly (tokens sum included) or the figure fails. The baseline
(`bench/naive_faust.py`) consumes one message per event from another fresh topic.

Why the rate is not timed by the polls: every query costs the embedded ClickHouse ~1-2 ms of CPU
whatever it reads, so the two queries the bench used to send every 20 ms took ~0.15 of a core on a
2-core machine, as much ClickHouse CPU as the worker's inserts and merges together (README, "Where the
time goes"). Polls now only detect the end, every 0.25 s, with the windows sum asked only once every
event is in. Each run reports the CPU microseconds per event of ClickHouse, the workers and the broker
between the first batch and the last (`cpu_us_per_event`; on a shared machine the steadier figure).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from bench import meters_workload, worker_metrics
from bench.context import BenchContext
from bench.infra import produce_all, scalar_int
from bench.report import Figure
from bench.workload import CONFIG, events, wire_messages
from meterline.adapters.clickhouse import connect
from meterline.localinfra.ports import free_port
from meterline.localinfra.process import ManagedProcess

TARGET_RATIO = 5.0
POLL_SECONDS = 0.25  # only detects the end of a run: the rate comes from `stored_at`
CHUNK = 20_000  # events generated and produced at a time, so 10M never sit in memory at once


def produce(bootstrap: str, topic: str, n: int, *, wire: bool, ctx: BenchContext, label: str,
            generate: Callable[..., list[dict[str, Any]]] = events) -> int:
    """Produce n events (wire format or one per message); return the expected tokens sum."""
    # lz4 like ingest's producer, so the worker decodes what it would decode in production.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                         "partitioner": "murmur2_random", "queue.buffering.max.messages": 1_000_000})
    run = uuid.uuid4().hex[:8]
    tokens = 0
    task = ctx.task(f"{label}: producing {n:,} events", n)
    for start in range(0, n, CHUNK):
        evs = generate(min(CHUNK, n - start), subjects=100, run=run, start=start)
        tokens += sum(e["data"]["tokens"] for e in evs)
        messages = wire_messages(evs) if wire else [(e["subject"].encode(), orjson.dumps(e)) for e in evs]
        produce_all(producer, topic, messages)
        ctx.progress.advance(task, len(evs))
    if producer.flush(120):
        raise RuntimeError(f"{label}: could not produce every message")
    ctx.done(task)
    return tokens


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, from /proc (no psutil needed)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def meterline_run(ctx: BenchContext, n: int, label: str = "P2 meterline", *, meters: int | None = None,
                  workers: int = 1, partitions: int | None = None) -> dict[str, Any]:
    """Pre-produce n events, start the workers, wait for every window; return rate, RSS and checks.

    `meters` None is the standard workload (bench.workload); a number takes that many meters of
    bench.meters_workload. Runs once per arguments per bench run: P5 reads the memory of the same
    run P2 timed.
    """
    partitions = partitions or int(ctx.options.get("partitions", 4))
    key = ("meterline_run", n, meters, workers, partitions)
    if key not in ctx.shared:
        ctx.shared[key] = _meterline_run(ctx, n, label, meters, workers, partitions)
    return dict(ctx.shared[key])


def _meterline_run(ctx: BenchContext, n: int, label: str, meters: int | None, workers: int,
                   partitions: int) -> dict[str, Any]:
    text = CONFIG if meters is None else meters_workload.config_yaml(meters)
    generate = events if meters is None else meters_workload.events
    # The standard workload counts events on prompt_count; every meter count has tokens_total.
    count_meter = "prompt_count" if meters is None else "tokens_total"
    config = ctx.work_dir / f"bench-config-{uuid.uuid4().hex[:8]}.yaml"
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    stack = ctx.infra.stack(config, processors=0, partitions=partitions)
    stack.start()
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    try:
        tokens = produce(str(stack.kafka_bootstrap), str(stack.topic), n, wire=True, ctx=ctx, label=label,
                         generate=generate)
        task = ctx.task(f"{label}: {workers} worker(s) metering {n:,} events", n)
        started, started_wall = time.monotonic(), time.time()
        pool = [stack.add_processor() for _ in range(workers)]
        worker = pool[0]

        def cpu() -> dict[str, float | None]:
            readings = [worker_metrics.cpu_seconds(w.pid) for w in pool]
            return {"clickhouse": worker_metrics.cpu_seconds(ctx.infra.clickhouse_pid),
                    "workers": None if None in readings else sum(r or 0.0 for r in readings),
                    "broker": worker_metrics.cpu_seconds(ctx.infra.broker_pid)}

        first: tuple[float, int] | None = None  # first poll that saw rows: (time, events)
        first_cpu: dict[str, float | None] = {}
        idle_rss = 0
        # A stall, not a slow run, is an error: the clock restarts whenever more events land, and the
        # first rows may take minutes on a loaded machine (workers start, join and rebalance).
        stall = float(ctx.options.get("p2_timeout", 300))
        progressed, last_seen, counted = started, -1, 0
        while True:
            for w in pool:
                if not w.running:
                    raise RuntimeError(f"processor exited; see {w.log_path}")
            seen = scalar_int(client, "SELECT count() FROM events")  # a trivial count: part metadata only
            if seen >= n:  # the windows sum reads every part: only once the events are all in
                counted = scalar_int(client, f"SELECT sum(count) FROM meter_windows WHERE meter = '{count_meter}'")
            now = time.monotonic()
            ctx.progress.update(task, completed=min(seen, n) if seen < n else min(counted, n))
            if seen != last_seen:
                last_seen, progressed = seen, now
            if seen == 0:
                idle_rss = rss_bytes(int(worker.pid or 0))[0]
            elif first is None:
                first, first_cpu = (now, seen), cpu()
            if seen >= n and counted >= n:
                break
            if now - progressed > stall:
                raise TimeoutError(f"{label}: stuck at {seen:,}/{n:,} events for {stall:.0f}s")
            time.sleep(POLL_SECONDS)
        last_cpu = cpu()
        rss, peak = rss_bytes(int(worker.pid or 0))
        stage_times = [worker_metrics.stages(w) for w in pool]
        ctx.done(task)
        final_events = scalar_int(client, "SELECT count() FROM events FINAL")
        final_count = scalar_int(client,
            f"SELECT sum(count) FROM meter_windows FINAL WHERE meter = '{count_meter}'")
        final_tokens = scalar_int(client, "SELECT sum(sum) FROM meter_windows FINAL WHERE meter = 'tokens_total'")
        if (final_events, final_count, final_tokens) != (n, n, tokens):
            raise AssertionError(
                f"{label}: counted events={final_events} windows={final_count} tokens={final_tokens}, "
                f"expected {n}, {n}, {tokens}"
            )
        assert first is not None
        timeline = stored_timeline(client, started_wall)
        # From the first batch written to the last: start-up and the first batch's own time excluded.
        # When everything landed in one batch there is no such interval; then count from the worker's
        # start (start-up included), a pessimistic rate flagged in the details.
        steady = len(timeline) >= 2 and timeline[-1][0] > timeline[0][0]
        rate = ((n - timeline[0][1]) / (timeline[-1][0] - timeline[0][0]) if steady
                else n / (now - started))
        return {
            "rate": rate,
            "rate_10_90": _middle_rate(timeline, n), "workers": workers, "partitions": partitions,
            "stages": stage_times[0] if workers == 1 else stage_times,
            "meters": 3 if meters is None else meters,
            "rate_includes_startup": not steady,
            # Between the first poll that saw rows and the end: CPU per event of those events.
            "cpu_us_per_event": worker_metrics.cpu_us_per_event(first_cpu, last_cpu, n - first[1]),
            "all_counted": True, "events": n, "tokens": tokens, "wall_seconds": round(now - started, 2),
            "rss_bytes": rss, "peak_rss_bytes": peak, "idle_rss_bytes": idle_rss,
            "window_rows": scalar_int(client, "SELECT count() FROM meter_windows"),
            "database": str(stack.database),  # P6 rebuilds a meter from the events stored here
            "timeline": timeline[:: max(1, len(timeline) // 50)],
        }
    finally:
        client.close()
        stack.stop()


def stored_timeline(client: Client, since: float) -> list[tuple[float, int]]:
    """(seconds after `since` (Unix time), events stored by then) at each `events` insert, from the
    `stored_at` ClickHouse gives every row of an insert: exact batch times, no polling needed."""
    rows = client.query("SELECT toUnixTimestamp64Milli(stored_at) AS t, count() FROM events GROUP BY t ORDER BY t"
                        ).result_rows
    timeline: list[tuple[float, int]] = []
    total = 0
    for millis, count in rows:
        total += int(count)
        timeline.append((round(int(millis) / 1000 - since, 3), total))
    return timeline


def _middle_rate(timeline: list[tuple[float, int]], n: int) -> float | None:
    """Events/s between the polls that first saw 10% and 90% of the events: the steady state, without
    start-up, the first rebalances of several workers, or the tail."""
    low = next(((t, e) for t, e in timeline if e >= n * 0.1), None)
    high = next(((t, e) for t, e in timeline if e >= n * 0.9), None)
    if low is None or high is None or high[0] <= low[0]:
        return None
    return (high[1] - low[1]) / (high[0] - low[0])


def naive_run(ctx: BenchContext, n: int) -> dict[str, Any]:
    """Produce n one-event messages, run bench/naive_faust.py on them; return its rate."""
    partitions = int(ctx.options.get("partitions", 4))
    topic = ctx.infra.topic("naive", partitions)
    produce(ctx.infra.kafka_bootstrap, topic, n, wire=False, ctx=ctx, label="P2 naive")
    progress_file = ctx.work_dir / f"naive-{uuid.uuid4().hex[:8]}.json"
    env = dict(os.environ, NAIVE_BROKER=ctx.infra.kafka_bootstrap, NAIVE_TOPIC=topic, NAIVE_EXPECTED=str(n),
               NAIVE_PROGRESS=str(progress_file), NAIVE_PARTITIONS=str(partitions),
               NAIVE_DATADIR=str(ctx.work_dir / f"naive-data-{uuid.uuid4().hex[:8]}"))
    proc = ManagedProcess(
        [sys.executable, "-m", "bench.naive_faust", "worker", "-l", "warn", "--web-port", str(free_port())],
        name="naive-faust", log_path=ctx.work_dir / "logs" / f"{progress_file.stem}.log", env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    task = ctx.task(f"P2 naive Faust agent on {n:,} events", n)
    proc.start()
    try:
        deadline = time.monotonic() + 60 + n / 500
        while True:
            if not proc.running:
                raise RuntimeError(f"naive Faust worker exited:\n{proc.log_tail(2000)}")
            state = json.loads(progress_file.read_text()) if progress_file.exists() else {"count": 0}
            ctx.progress.update(task, completed=state["count"])
            if state["count"] >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"naive Faust worker: {state['count']:,}/{n:,} events")
            time.sleep(0.1)
    finally:
        proc.stop()
        ctx.done(task)
    return {"rate": (state["count"] - 1) / max(state["last"] - state["first"], 1e-3), "events": state["count"]}


def naive(ctx: BenchContext, n: int) -> dict[str, Any]:
    """The naive agent's run at n events, measured once per bench run and shared by every P2 figure."""
    key = ("naive_run", n)
    if key not in ctx.shared:
        ctx.shared[key] = naive_run(ctx, n)
    return dict(ctx.shared[key])


NAIVE_NAME = "naive Faust agent, 1 msg/event, 1 table update/event"


def run(ctx: BenchContext, size: int) -> list[Figure]:
    mine = meterline_run(ctx, size)
    base = naive(ctx, min(size, int(ctx.options.get("naive_cap", 30_000))))
    figures = [Figure(
        "P2", "processor: events -> ClickHouse windows", size, mine["rate"], "ev/s", base["rate"], NAIVE_NAME,
        target=f">= {TARGET_RATIO:g}x", passed=mine["rate"] / base["rate"] >= TARGET_RATIO,
        details={"meterline": mine, "naive": base},
    )]
    if ("p2_extra_done",) not in ctx.shared:  # once per bench run, not once per size
        ctx.shared[("p2_extra_done",)] = True
        extra = int(ctx.options.get("p2_extra", 20_000))
        figures += core_meter_figures(ctx)
        figures += worker_meter_figures(ctx, extra, base)
        figures += scaling_figures(ctx, extra, base)
    return figures


def core_rate(meter_count: int, events_count: int, rounds: int = 3) -> float:
    """Events/s of `message_rows` alone (CPU time of this process, best of `rounds`), 100 per message."""
    from datetime import UTC, datetime

    from meterline.core.meters import MeterSet
    from meterline.core.rows import MessagePosition, RowOptions, always_accept, message_rows

    evs = meters_workload.events(events_count, run="core")
    messages = [evs[i : i + 100] for i in range(0, len(evs), 100)]
    meter_set, options, now = MeterSet(meters_workload.meters(meter_count)), RowOptions(), datetime.now(UTC)
    best = float("inf")
    for _ in range(rounds):
        began = time.process_time()
        for offset, message in enumerate(messages):
            message_rows(message, MessagePosition("bench", 0, offset), meter_set, options, always_accept, now=now)
        best = min(best, time.process_time() - began)
    return len(evs) / max(best, 1e-9)


def core_meter_figures(ctx: BenchContext) -> list[Figure]:
    """`message_rows` at 1, 3, 10, 20 meters: the ratio to 3 meters is the meter-count target."""
    n = int(ctx.options.get("p2_core_events", 20_000))
    task = ctx.task(f"P2 message_rows in-process at {meters_workload.METER_COUNTS} meters", None)
    rates = {k: core_rate(k, n) for k in meters_workload.METER_COUNTS}
    ctx.done(task)
    return [
        Figure("P2", f"message_rows in-process, {k} meters", n, rates[k], "ev/s", rates[3],
               "message_rows in-process, 3 meters (CPU time)",
               target=">= 0.5x" if k == 20 else "", passed=rates[k] / rates[3] >= 0.5 if k == 20 else None,
               details={"meters": k, "rates": rates})
        for k in meters_workload.METER_COUNTS
    ]


def worker_meter_figures(ctx: BenchContext, n: int, base: dict[str, Any]) -> list[Figure]:
    """One worker at 1, 3, 10, 20 meters ÷ the naive agent; the ratio to 3 meters in the details."""
    runs = {k: meterline_run(ctx, n, f"P2 {k} meters", meters=k) for k in meters_workload.METER_COUNTS}
    return [
        Figure("P2", f"processor, {k} meters", n, runs[k]["rate"], "ev/s", base["rate"], NAIVE_NAME,
               details={"meterline": runs[k], "naive": base, "ratio_to_3_meters": runs[k]["rate"] / runs[3]["rate"]})
        for k in meters_workload.METER_COUNTS
    ]


def scaling_figures(ctx: BenchContext, n: int, base: dict[str, Any]) -> list[Figure]:
    """1, 2 and 4 workers (3 meters) on 8 partitions; steady rates (10%-90% of the events)."""
    runs = {w: meterline_run(ctx, n, f"P2 {w} workers", workers=w, partitions=8) for w in (1, 2, 4)}

    def rate(w: int) -> float:
        return float(runs[w]["rate_10_90"] or runs[w]["rate"])

    return [
        Figure("P2", f"processor, {w} workers, 8 partitions", n, rate(w), "ev/s", base["rate"], NAIVE_NAME,
               details={"meterline": runs[w], "naive": base, "ratio_to_1_worker": rate(w) / rate(1)})
        for w in (1, 2, 4)
    ]
