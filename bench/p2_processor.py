"""P2 processor: events/s one meterline worker turns into ClickHouse windows vs. a naive Faust agent.

N events are produced beforehand in ingest's wire format (1000-event requests cut by
`meterline.core.events.encode_messages`, ~100 events per message) into a fresh topic; then one worker
starts and ClickHouse is polled until every event is in `events` and counted in the `prompt_count`
windows. The rate runs from the first written batch to the last (polls every 20 ms; worker start-up
excluded, see `meterline_run`), and the run must account for every event exactly (tokens sum
included) or the figure fails. The baseline
(`bench/naive_faust.py`) consumes one message per event from another fresh topic.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from bench.context import BenchContext
from bench.infra import produce_all
from bench.report import Figure
from bench.workload import events, wire_messages, write_config
from meterline.adapters.clickhouse import connect
from meterline.localinfra.ports import free_port
from meterline.localinfra.process import ManagedProcess

TARGET_RATIO = 5.0
POLL_SECONDS = 0.02
CHUNK = 20_000  # events generated and produced at a time, so 10M never sit in memory at once


def produce(bootstrap: str, topic: str, n: int, *, wire: bool, ctx: BenchContext, label: str) -> int:
    """Produce n events (wire format or one per message); return the expected tokens sum."""
    # lz4 like ingest's producer, so the worker decodes what it would decode in production.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                         "partitioner": "murmur2_random", "queue.buffering.max.messages": 1_000_000})
    run = uuid.uuid4().hex[:8]
    tokens = 0
    task = ctx.task(f"{label}: producing {n:,} events", n)
    for start in range(0, n, CHUNK):
        evs = events(min(CHUNK, n - start), subjects=100, run=run, start=start)
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


def meterline_run(ctx: BenchContext, n: int, label: str = "P2 meterline") -> dict[str, Any]:
    """Pre-produce n events, start one worker, wait for every window; return rate, RSS and checks.

    Runs once per size per bench run: P5 reads the memory of the same run P2 timed.
    """
    key = ("meterline_run", n)
    if key not in ctx.shared:
        ctx.shared[key] = _meterline_run(ctx, n, label)
    return dict(ctx.shared[key])


def _meterline_run(ctx: BenchContext, n: int, label: str) -> dict[str, Any]:
    config = write_config(ctx.work_dir)
    stack = ctx.infra.stack(config, processors=0, partitions=int(ctx.options.get("partitions", 4)))
    stack.start()
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    try:
        tokens = produce(str(stack.kafka_bootstrap), str(stack.topic), n, wire=True, ctx=ctx, label=label)
        task = ctx.task(f"{label}: worker metering {n:,} events", n)
        started = time.monotonic()
        worker = stack.add_processor()
        first: tuple[float, int] | None = None  # first poll that saw rows: (time, events)
        timeline: list[tuple[float, int]] = []  # (seconds since worker start, events in ClickHouse)
        idle_rss = 0
        timeout = float(ctx.options.get("p2_timeout", 60 + n / 2000))
        while True:
            if not worker.running:
                raise RuntimeError(f"processor exited; see {worker.log_path}")
            seen = int(client.command("SELECT count() FROM events"))
            counted = int(client.command("SELECT sum(count) FROM meter_windows WHERE meter = 'prompt_count'"))
            now = time.monotonic()
            ctx.progress.update(task, completed=min(seen, counted))
            if not timeline or timeline[-1][1] != seen:
                timeline.append((round(now - started, 2), seen))
            if seen == 0:
                idle_rss = rss_bytes(int(worker.pid or 0))[0]
            elif first is None:
                first = (now, seen)
            if seen >= n and counted >= n:
                break
            if now - started > timeout:
                raise TimeoutError(f"{label}: only {seen:,}/{n:,} events after {timeout:.0f}s")
            time.sleep(POLL_SECONDS)
        rss, peak = rss_bytes(int(worker.pid or 0))
        ctx.done(task)
        final_events = int(client.command("SELECT count() FROM events FINAL"))
        final_count = int(client.command("SELECT sum(count) FROM meter_windows FINAL WHERE meter = 'prompt_count'"))
        final_tokens = int(client.command("SELECT sum(sum) FROM meter_windows FINAL WHERE meter = 'tokens_total'"))
        if (final_events, final_count, final_tokens) != (n, n, tokens):
            raise AssertionError(
                f"{label}: counted events={final_events} windows={final_count} tokens={final_tokens}, "
                f"expected {n}, {n}, {tokens}"
            )
        assert first is not None
        # From the first batch written to the last: start-up and the first batch's own time excluded.
        # When everything landed in one batch there is no such interval; then count from the worker's
        # start (start-up included), a pessimistic rate flagged in the details.
        steady = n > first[1] and now > first[0]
        return {
            "rate": (n - first[1]) / (now - first[0]) if steady else n / (now - started),
            "rate_includes_startup": not steady,
            "all_counted": True, "events": n, "tokens": tokens, "wall_seconds": round(now - started, 2),
            "rss_bytes": rss, "peak_rss_bytes": peak, "idle_rss_bytes": idle_rss,
            "window_rows": int(client.command("SELECT count() FROM meter_windows")),
            "database": str(stack.database),  # P6 rebuilds a meter from the events stored here
            "timeline": timeline[:: max(1, len(timeline) // 50)],
        }
    finally:
        client.close()
        stack.stop()


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


def run(ctx: BenchContext, size: int) -> list[Figure]:
    mine = meterline_run(ctx, size)
    naive = naive_run(ctx, min(size, int(ctx.options.get("naive_cap", 30_000))))
    return [Figure(
        "P2", "processor: events -> ClickHouse windows", size, mine["rate"], "ev/s", naive["rate"],
        "naive Faust agent, 1 msg/event, 1 table update/event",
        target=f">= {TARGET_RATIO:g}x", passed=mine["rate"] / naive["rate"] >= TARGET_RATIO,
        details={"meterline": mine, "naive": naive},
    )]
