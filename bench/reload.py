"""The dedupe reload of one partition: what a worker pays on every start or takeover, before and after the
owned-partition load moved from `events` to `dedupe_keys` (docs/design.md, "Exactly-once effect" 6).

    python -m bench.reload --events 2000000 --partitions 8 --rounds 3

Stores `--events` events over `--partitions` partitions in a fresh database (in `events` only, as a
version from before `dedupe_keys` left them), times the one-time backfill the processor's schema step
runs, then alternates, per round, the two reloads of partition 0 into a fresh `DedupeState` (the real
RocksDB merge a worker does): the baseline is the query the loader ran before (a scan of `events`,
keys recomputed from `(source, id)`), the other `ClickHouseSink.load_dedupe`. Rows read are ClickHouse's
own count (`X-ClickHouse-Summary`). Figures are medians over the rounds, with their spread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from meterline.adapters.clickhouse import connect, create_schema
from meterline.core.positions import dedupe_key
from meterline.localinfra.clickhouse_server import LocalClickHouse
from processor.dedupe import DedupeState
from processor.key_backfill import backfill_dedupe_keys
from processor.sink import ClickHouseSink, dedupe_load_query

KEEP_DAYS = 47
#: The owned-partition load before this change (processor/sink.py at 8cc855c): the baseline.
OLD_LOAD = (
    "SELECT source, id, namespace, log_epoch, kafka_partition, kafka_offset, batch_index, "
    "toUnixTimestamp(ingested_at) FROM {db}.events "
    "WHERE kafka_partition = {{partition:UInt32}} AND ingested_at >= now() - toIntervalDay({{days:UInt32}})"
)


def store_history(client: Any, db: str, events: int, partitions: int) -> None:
    """`events` rows of the last 40 days, round-robin over the partitions, ordered as the table orders them."""
    client.command(
        f"INSERT INTO `{db}`.events (dedupe_key, id, source, type, subject, time, data, ingested_at, log_epoch, "
        "kafka_partition, kafka_offset, batch_index, validation_errors) "
        "SELECT MD5(toString(number)), concat('evt-', toString(number)), 'bench', 'prompt', "
        "concat('customer-', toString(number % 1000)), now64(6) - toIntervalSecond(number % 3456000), '{}', "
        "now64(3) - toIntervalSecond(3456000 - intDiv(number, " + str(partitions) + ")), 'bench-epoch', "
        f"number % {partitions}, intDiv(number, {partitions}), 0, [] FROM numbers({events})",
        settings={"max_partitions_per_insert_block": 1000})


def timed(load: Callable[[Callable[[Iterable[Sequence[Any]]], int]], int], state_dir: Path) -> tuple[float, int]:
    """Seconds and keys of one load into a fresh RocksDB cache."""
    state = DedupeState(str(state_dir), KEEP_DAYS - 1)
    try:
        started = time.perf_counter()
        n = load(lambda rows: state.load_rows("bench-epoch", 0, rows))
        return time.perf_counter() - started, n
    finally:
        state.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clickhouse-url", default="", help="an existing server (default: start a local one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        server = None
        url = args.clickhouse_url
        if not url:
            server = LocalClickHouse(Path(tmp) / "clickhouse").start()
            url = server.url
        try:
            run(url, Path(tmp), args.events, args.partitions, args.rounds)
        finally:
            if server is not None:
                server.stop()


def run(url: str, tmp: Path, events: int, partitions: int, rounds: int) -> None:
    db = f"bench_reload_{int(time.time())}"
    client = connect(url, database="default")
    create_schema(client, db)
    started = time.perf_counter()
    store_history(client, db, events, partitions)
    print(f"stored {events:,} events over {partitions} partitions in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    backfilled = backfill_dedupe_keys(client, db, KEEP_DAYS)
    backfill_s = time.perf_counter() - started
    print(f"one-time backfill of dedupe_keys: {backfilled:,} keys in {backfill_s:.1f} s "
          f"({(backfilled or 0) / backfill_s:,.0f} keys/s)")
    sink = ClickHouseSink(f"{url.rstrip('/')}/{db}", db)
    old_sql = OLD_LOAD.format(db=f"`{db}`")
    params = {"partition": 0, "days": KEEP_DAYS - 1}

    def old(merge: Callable[[Iterable[Sequence[Any]]], int]) -> int:
        with client.query_row_block_stream(old_sql, parameters=params) as stream:
            return merge((dedupe_key(s, i, ns), *rest) for block in stream for s, i, ns, *rest in block)

    def new(merge: Callable[[Iterable[Sequence[Any]]], int]) -> int:
        return sink.load_dedupe(0, KEEP_DAYS - 1, None, merge)

    new_sql, new_params = dedupe_load_query(db, 0, KEEP_DAYS - 1, None)
    read = {name: int(client.query(sql, parameters=p, settings={"wait_end_of_query": 1}).summary["read_rows"])
            for name, sql, p in (("before", old_sql, params), ("after", new_sql, new_params))}
    times: dict[str, list[float]] = {"before": [], "after": [], "before read": [], "after read": []}
    keys: dict[str, int] = {}
    for r in range(rounds):
        for name, load in (("before", old), ("after", new)) if r % 2 == 0 else (("after", new), ("before", old)):
            seconds, keys[name] = timed(load, tmp / f"state-{name}-{r}")
            times[name].append(seconds)
            started = time.perf_counter()  # the read alone: what the query (and key hashing) costs
            keys[f"{name} read"] = load(lambda rows: sum(1 for _ in rows))
            times[f"{name} read"].append(time.perf_counter() - started)
    assert len(set(keys.values())) == 1 and keys["after"] == events // partitions, keys
    for name in ("before", "after"):
        t, q = times[name], times[f"{name} read"]
        print(f"{name:6}: reload of partition 0 ({keys[name]:,} keys) into RocksDB: median {statistics.median(t):.2f} s "
              f"(runs {', '.join(f'{x:.2f}' for x in t)}); the read alone: median {statistics.median(q):.2f} s "
              f"(runs {', '.join(f'{x:.2f}' for x in q)}); ClickHouse read {read[name]:,} rows")
    ratio = statistics.median(times["before"]) / statistics.median(times["after"])
    read_ratio = statistics.median(times["before read"]) / statistics.median(times["after read"])
    print(f"before/after: reload {ratio:.1f}x, read alone {read_ratio:.1f}x, rows read "
          f"{read['before'] / read['after']:.1f}x ({rounds} alternating rounds)")
    client.command(f"DROP DATABASE `{db}`")
    client.close()


if __name__ == "__main__":
    main()
