"""P5 at sizes metering cannot reach: a worker taking over partitions that hold N stored dedupe ids.

What a cold worker pays when it takes over partitions (a restart on a new disk, a replacement worker, a
rebalance onto a worker that never owned them): its RocksDB cache is empty, so before it decides any
message it loads every first sighting of the dedupe horizon of those partitions from ClickHouse
(`BatchProcessor.ensure_loaded` -> `ClickHouseSink.load_dedupe_by_key` -> `DedupeState.load_sorted`; with
`--p5-per-key` also `load_dedupe` -> `load_rows`, the key-by-key way). With 100M
ids that is the processor's largest memory and time cost, and a worker does not meter meanwhile.

N events spread over the last 30 days are generated in ClickHouse (bench/generate.py: `events` and
`dedupe_keys` rows as the sink writes them, under an older log epoch so their positions are not live
offsets), then one message per partition is produced, each with a copy of a stored event and a fresh
one, and a real worker (`python -m processor`, empty state dir) is started on them. The figure is read
from the worker itself: its peak RSS (VmHWM) once every partition is loaded and the fresh events are
stored, and the seconds of each partition's load from its own log. The copies must be dropped and the
fresh events stored, or the figure fails: a reload that loaded nothing would be fast too.

Baselines, measured in the same run: for memory, a Python `set` of the N keys (P5's, bench/p5_memory.py);
for time, the same loads through the sink with a merge that only counts the rows (ClickHouse's read
and the sink's decoding, without RocksDB; once, after the runs). Each run starts a new worker on a new
empty state dir. `--p5-per-key` adds as many runs of the per-key load (`dedupe_bulk_load=false`, what
takeovers did before SST ingestion), alternating ABBA with the others: the figures stay the default
load's, the details hold both and their ratio.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.context import BenchContext
from bench.generate import Layout
from bench.generate import fill as generate_rows
from bench.p2_processor import rss_bytes
from bench.p5_memory import MB, TARGET_BYTES, naive_set_rss
from bench.report import Figure
from bench.workload import SUBJECT_RUN, event, write_config
from meterline.adapters.clickhouse import connect
from meterline.core.events import encode_messages
from meterline.core.schema import DEDUPE_KEYS
from meterline.settings import Settings
from processor.sink import ClickHouseSink

EPOCH = "bench-generated"
FRESH_SUBJECT = "p5-fresh"
#: Bytes per key of the naive set, measured at 10M (883 MB): used to decide whether the machine can hold it.
NAIVE_BYTES_PER_KEY = 100
LOADED = "dedupe state loaded"


def run(ctx: BenchContext, size: int) -> list[Figure]:
    partitions = int(ctx.options.get("partitions", 4))
    runs = max(1, int(ctx.options.get("p5_runs", 1)))
    config = write_config(ctx.work_dir / f"p5-reload-{uuid.uuid4().hex[:8]}")
    stack = ctx.infra.stack(config, processors=0, partitions=partitions)
    stack.start()
    url, database = str(stack.clickhouse_url), str(stack.database)
    client = connect(url, database=database)
    try:
        _first_start(ctx, stack)
        # Broker times of the last 30 days, an hour back: all inside the horizon a worker loads.
        start = (datetime.now(UTC) - timedelta(days=30, hours=1)).replace(microsecond=0)
        layout = Layout(events=size, start=start, days=30, partitions=partitions, log_epoch=EPOCH)
        task = ctx.task(f"P5 reload: generating {size:,} stored ids", 2 * size)
        # Only `dedupe_keys` is merged: the loads read it; `events` is read for the fresh subject only.
        info = generate_rows(client, url, database, layout, windows=False, optimize=(DEDUPE_KEYS,),
                             on_progress=lambda _, k: ctx.progress.advance(task, k))
        ctx.done(task)
        if info["events_rows"] != size or info["dedupe_keys_rows"] != size:
            raise AssertionError(f"P5 reload: generated {info}, expected {size} rows")
        # ABBA: the per-key load (False) alternates with the default one, so drift hits both alike.
        modes = [True] * runs if not ctx.options.get("p5_per_key") else \
            [(r % 4) in (1, 2) for r in range(2 * runs)]
        both = [_worker_reload(ctx, stack, client, size, partitions, r, bulk) for r, bulk in enumerate(modes)]
        measured = [m for m, bulk in zip(both, modes) if bulk]
        per_key = [m for m, bulk in zip(both, modes) if not bulk]
        # Every stored id now: the generated ones and each run's fresh events.
        stored = size + len(modes) * partitions
        floor = _sink_read(ctx, url, database, partitions, stored)
    finally:
        client.close()
        stack.stop()
    naive = _naive_baseline(ctx, size)
    peaks = [m["peak_rss_bytes"] for m in measured]
    seconds = [m["load_seconds"] for m in measured]
    details: dict[str, Any] = {
        **info, "runs": measured, "sink_read_seconds": floor, "partitions": partitions, "ids_per_partition":
        size // partitions, **naive, "all_counted": all(m["all_counted"] for m in measured),
        "peak_rss_spread_mb": [round(min(peaks) / MB), round(max(peaks) / MB)],
        "load_seconds_spread": [min(seconds), max(seconds)],
    }
    if per_key:
        slow = [m["load_seconds"] for m in per_key]
        details.update(per_key_runs=per_key, per_key_load_seconds=slow,
                       per_key_peak_rss_mb=[round(m["peak_rss_bytes"] / MB) for m in per_key],
                       per_key_over_bulk=round(statistics.median(slow) / statistics.median(seconds), 2))
        print(f"P5 reload {size:,} ids: default load {seconds} s, peak {[round(p / MB) for p in peaks]} MB; "
              f"per-key load {slow} s, peak {details['per_key_peak_rss_mb']} MB; "
              f"median ratio {details['per_key_over_bulk']}x")
    peak, load = statistics.median(peaks), statistics.median(seconds)
    return [
        Figure("P5", "processor reload: peak RSS, N stored ids loaded into an empty worker", size, peak / MB, "MB",
               naive["naive_set_rss_bytes"] / MB, "Python set of N 16-byte dedupe keys (in-memory dedupe)",
               higher_is_better=False, target="<= 1024 MB", passed=max(peaks) <= TARGET_BYTES, details=details),
        Figure("P5", f"processor reload: seconds to load N stored ids ({partitions} partitions)", size, load, "s",
               floor, "the sink's load queries streamed, rows counted, no RocksDB merge",
               higher_is_better=False, target="(no target)", passed=None, details=details),
    ]


def _first_start(ctx: BenchContext, stack: Any) -> None:
    """Start and stop one worker on the still empty database, as a deployment has run before the ids were
    stored: what a worker does once per database at its first start (schema, a migration's one-time work)
    is then done, and the measured workers pay only what every takeover pays."""
    task = ctx.task("P5 reload: a first worker prepares the empty database", None)
    worker = stack.add_processor(0)
    try:
        deadline = time.monotonic() + 180
        while '"assigned"' not in worker.log_path.read_text(errors="replace"):
            if not worker.running or time.monotonic() > deadline:
                raise RuntimeError(f"P5 reload: the first worker did not take partitions; see {worker.log_path}")
            time.sleep(0.5)
    finally:
        worker.stop()
        ctx.done(task)


def _messages(run: int, partitions: int, size: int, message_events: int) -> list[tuple[int, bytes, bytes]]:
    """Per partition one message: a copy of an event stored on that partition (a duplicate) and a fresh
    event. (A copy of another partition's event is dropped only once that partition is loaded too.)"""
    out = []
    for p in range(partitions):
        copy = event(0, run="copy", subjects=1, subject=FRESH_SUBJECT)
        stored = (p + partitions * run) * message_events + 7  # on partition p (bench/generate.py's layout)
        if stored >= size:
            raise ValueError(f"P5 reload: {size} ids are too few for {partitions} partitions")
        copy["id"] = str(stored)  # source "bench", as generated
        fresh = event(p, run=f"fresh{run}", subjects=1, subject=FRESH_SUBJECT)
        ((key, value),) = encode_messages([copy, fresh])
        out.append((p, key, value))
    return out


def _worker_reload(ctx: BenchContext, stack: Any, client: Any, size: int, partitions: int, run: int,
                   bulk: bool = True) -> dict[str, Any]:
    """Start an empty worker on one new message per partition; wait until it stored the fresh events.
    `bulk=False`: the worker loads key by key (`dedupe_bulk_load=false`)."""
    producer = Producer({"bootstrap.servers": str(stack.kafka_bootstrap)})
    for p, key, value in _messages(run, partitions, size, SUBJECT_RUN):
        producer.produce(str(stack.topic), value=value, key=key, partition=p)
    if producer.flush(30):
        raise RuntimeError("P5 reload: could not produce the takeover messages")
    task = ctx.task(f"P5 reload: worker {run + 1} loading {size:,} ids{'' if bulk else ' key by key'}", None)
    stack.extra_env["METERLINE_DEDUPE_BULK_LOAD"] = "true" if bulk else "false"
    started = time.monotonic()
    worker = stack.add_processor(run + 1)  # a new index: a new, empty state dir
    pid = int(worker.pid or 0)
    fresh = {f"fresh{run}-{p}" for p in range(partitions)}
    samples: list[tuple[float, int]] = []
    stall = _timeout(ctx, size)
    try:
        while True:
            if not worker.running:
                raise RuntimeError(f"P5 reload: worker exited; see {worker.log_path}")
            now = time.monotonic()
            samples.append((round(now - started, 1), rss_bytes(pid)[0]))
            # `events` is sorted by subject first: this reads the fresh subject's rows only.
            stored = {r[0] for r in client.query(
                "SELECT id FROM events WHERE subject = {s:String}", parameters={"s": FRESH_SUBJECT}).result_rows}
            if fresh <= stored:
                break
            if now - started > stall:
                break
            time.sleep(1.0)
        wall = time.monotonic() - started
        rss, peak = rss_bytes(pid)
    finally:
        worker.stop()
        ctx.done(task)
    loads = _loads(worker.log_path)
    if not fresh <= stored:  # how far it got is the figure a later run must beat: say it
        raise TimeoutError(
            f"P5 reload: fresh events not stored after {stall:.0f}s; {sum(x['keys'] for x in loads):,} of "
            f"{size:,} ids loaded by then (partition loads {loads}), peak RSS {peak / MB:.0f} MB ({worker.log_path})")
    copies = {r[0] for r in client.query(
        "SELECT id FROM events WHERE subject = {s:String}", parameters={"s": FRESH_SUBJECT}).result_rows} - {
        f"fresh{r}-{p}" for r in range(run + 1) for p in range(partitions)}
    loaded = sum(x["keys"] for x in loads)
    all_counted = not copies and loaded >= size
    if not all_counted:
        raise AssertionError(f"P5 reload: copies stored {sorted(copies)}, {loaded:,} of {size:,} ids loaded")
    return {"wall_seconds_from_start": round(wall, 1), "load_seconds": round(sum(x["seconds"] for x in loads), 3),
            "partition_loads": loads, "peak_rss_bytes": peak, "rss_bytes": rss, "keys_loaded": loaded,
            "rss_timeline": samples[:: max(1, len(samples) // 40)], "all_counted": all_counted,
            "copies_dropped": partitions, "bulk_load": bulk}


def _timeout(ctx: BenchContext, size: int) -> float:
    """Seconds a reloading worker gets (`--p5-reload-timeout`): by default 30 min, or 30 us an id when that is
    more -- ~4x the 7-9 us a key measured at 20M-50M ids on the loaded 2-core machine, so 100M gets 50 min."""
    given = float(ctx.options.get("p5_reload_timeout") or 0)
    return given if given > 0 else max(1800.0, size * 30e-6)


def _loads(log: Path) -> list[dict[str, Any]]:
    """The worker's own record of each partition load: keys and seconds (`BatchProcessor.ensure_loaded`)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if LOADED not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == LOADED:
            out.append({"partition": record["partition"], "keys": record["keys"], "seconds": record["seconds"]})
    return out


def _keep_days() -> int:
    """Days of keys a load reads, as `BatchProcessor.keep_days` computes them: the horizon plus retention."""
    settings = Settings()
    return math.ceil((settings.dedupe_horizon_days * 86_400 + settings.topic_retention_hours * 3600) / 86_400)


def _sink_read(ctx: BenchContext, url: str, database: str, partitions: int, size: int) -> float:
    """Seconds of the worker's load queries through `ClickHouseSink.load_dedupe`, rows only counted."""
    sink = ClickHouseSink(url, database)
    keep_days = _keep_days()
    task = ctx.task(f"P5 reload baseline: streaming {size:,} ids without merging", None)
    t0 = time.perf_counter()
    n = sum(sink.load_dedupe(p, keep_days, None, lambda rows: sum(1 for _ in rows)) for p in range(partitions))
    seconds = time.perf_counter() - t0
    ctx.done(task)
    if n != size:
        raise AssertionError(f"P5 reload baseline: streamed {n:,} ids, {size:,} are stored")
    return round(seconds, 3)


def _naive_baseline(ctx: BenchContext, size: int) -> dict[str, Any]:
    """The Python set of N keys, measured when the machine has room for it (~100 bytes a key: 10 GB at 100M),
    else measured at the largest size that fits and scaled linearly (flagged)."""
    available = _mem_available()
    fits = max(1_000_000, int((available - 4 * 1024**3) / (1.5 * NAIVE_BYTES_PER_KEY)))
    measured_at = min(size, fits)
    task = ctx.task(f"P5 naive: Python set of {measured_at:,} dedupe keys", None)
    rss = naive_set_rss(measured_at)
    ctx.done(task)
    return {"naive_set_rss_bytes": rss * size // measured_at, "naive_set_measured_at": measured_at,
            "naive_set_extrapolated": measured_at != size}


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
