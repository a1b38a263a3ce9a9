"""Global dedupe's race, staged deterministically on real ClickHouse: two workers decide copies of the
same (source, id) on the partitions they each own before either one's batch is written.

Worker A's write is held at a gate while worker B processes its whole batch, so B's merge of A's keys
finds nothing and both accept their copies -- before retraction existed both were counted for good.
Then each worker reconciles (as its timer does): the copy `first_sighting` ranks first stays, the owner
of the other partition retracts the loser. The oracle is computed here from the log: each key counts
once, at its copy with the smallest (broker time, partition, offset, index).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from meterline.adapters.clickhouse import connect
from meterline.adapters.compactions import ReplayGuard, write_claim
from meterline.core.compaction import DONE
from meterline.core.meters import Aggregation, Meter, MeterSet
from meterline.core.rows import Rows
from meterline.core.schema import SINGLE_NODE, Topology
from meterline.localinfra.clickhouse_cluster import LocalClickHouseCluster
from meterline.settings import Settings
from processor import metrics
from processor.batch import BatchProcessor, Message
from processor.dedupe import DedupeState
from processor.sink import ClickHouseSink

EPOCH = "race-cluster/race-topic"
METERS = MeterSet([
    Meter(slug="tokens", event_type="prompt", aggregation=Aggregation.SUM, value_property="$.tokens",
          group_by={"model": "$.model"}),
    Meter(slug="calls", event_type="prompt", aggregation=Aggregation.COUNT),
])
Key = tuple[str, str, datetime, str]


class GatedSink(ClickHouseSink):
    """The real sink, whose writes wait for `gate` once `hold` is set: a worker that decided its batch
    and stalls before writing it (a slow insert, a GC pause)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = False
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def write(self, rows: Rows) -> None:
        if self.hold:
            self.waiting.set()
            await self.gate.wait()
        await super().write(rows)


@pytest.fixture
def database(clickhouse_url: str, unique_name: Callable[[str], str]) -> Iterator[str]:
    db = unique_name("race")
    yield db
    client = connect(clickhouse_url)
    client.command(f"DROP DATABASE IF EXISTS `{db}`")
    client.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalClickHouseCluster]:
    with LocalClickHouseCluster(tmp_path_factory.mktemp("race-cluster") / "clickhouse", shards=2) as running:
        yield running


def worker(tmp_path: Path, name: str, clickhouse_url: str, database: str, owns: set[int],
           topology: Topology = SINGLE_NODE) -> BatchProcessor:
    settings = Settings(config_file=str(tmp_path / "absent.yaml"), dedupe_horizon_days=32, late_horizon_days=None,
                        topic_partitions=2, window_size_seconds=60)
    sink = GatedSink(f"{clickhouse_url}/{database}", database, backoff_max=0.5, topology=topology)
    if topology.cluster is None:  # a cluster's schema is created on every node by the test
        sink.ensure_schema(keys_keep_days=40)
    state = DedupeState(str(tmp_path / name), 32, max_lag_seconds=3600)
    processor = BatchProcessor(settings, METERS, state, sink, EPOCH)
    processor.assigned(owns)
    return processor


def event(source: str, event_id: str, subject: str, t: datetime, tokens: int, model: str) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": source, "type": "prompt", "subject": subject,
            "time": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "data": {"tokens": tokens, "model": model}}


def the_log(now: float, age: timedelta = timedelta(minutes=30)) -> tuple[list[Message], list[Message]]:
    """Partition 0 (worker A): originals, some with unique events in the same message; partition 1
    (worker B): copies of most of them under another subject -- half sent before the original (their
    broker time is earlier: the copy wins), half after -- plus unique events of its own. Event times
    start `age` before `now`."""
    t = datetime.fromtimestamp(now, UTC).replace(second=0, microsecond=0) - age
    originals = [event("app", f"e{i}", f"customer-{i % 3}", t + timedelta(seconds=7 * i), 10 + i, f"m{i % 2}")
                 for i in range(40)]
    own_a = [event("app", f"a{i}", "customer-0", t + timedelta(seconds=11 * i), 100, "m0") for i in range(6)]
    copies = [dict(e, subject=e["subject"] + "-retried", data={"tokens": e["data"]["tokens"], "model": "m9"})
              for e in originals[:30]]
    own_b = [event("app", f"b{i}", "customer-9", t + timedelta(seconds=13 * i), 1000, "m1") for i in range(4)]

    def messages(partition: int, groups: list[list[dict[str, Any]]], times: list[float]) -> list[Message]:
        return [(partition, offset, orjson.dumps(g), ts) for offset, (g, ts) in enumerate(zip(groups, times))]

    # A: 4 messages of originals (the last two mixed with unique events), each one subject in ingest's
    # format; B: copies alone (the early ones), copies mixed with unique events (the late ones).
    by_subject = lambda es: [[e for e in es if e["subject"] == s] for s in sorted({e["subject"] for e in es})]
    a_groups = by_subject(originals[:20]) + by_subject(originals[20:] + own_a)
    b_groups = by_subject(copies[:15]) + by_subject(copies[15:] + own_b)
    a = messages(0, a_groups, [now - 20] * len(a_groups))
    b = messages(1, b_groups, [now - 30] * len(by_subject(copies[:15])) + [now - 10] * (len(b_groups) - len(by_subject(copies[:15]))))
    return a, b


def oracle(log: list[Message], also: Sequence[Message] = ()) -> dict[Key, tuple[int, Decimal]]:
    """Each (source, id) counts once: its copy with the smallest (broker second, partition, offset, index);
    the losing copies in `also` count besides (they could not be retracted)."""
    best: dict[tuple[str, str], tuple[tuple[int, int, int, int], dict[str, Any]]] = {}
    for partition, offset, value, ts in log:
        for index, e in enumerate(orjson.loads(value)):
            rank = (int(ts or 0), partition, offset, index)
            key = (e["source"], e["id"])
            if key not in best or rank < best[key][0]:
                best[key] = (rank, e)
    counted = [e for _, e in best.values()]
    for partition, offset, value, ts in also:
        counted += [e for index, e in enumerate(orjson.loads(value))
                    if best[(e["source"], e["id"])][0] != (int(ts or 0), partition, offset, index)]
    out: Counter[Key] = Counter()
    calls: Counter[Key] = Counter()
    for e in counted:
        minute = datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC, second=0, microsecond=0)
        out[("tokens", e["subject"], minute, orjson.dumps({"model": e["data"]["model"]}).decode())] += e["data"]["tokens"]
        calls[("calls", e["subject"], minute, "{}")] += 1
    expected = {k: (0, Decimal(v)) for k, v in out.items()}
    expected.update({k: (v, Decimal(0)) for k, v in calls.items()})
    return expected


def rollups(client: Any, db: str) -> dict[Key, tuple[int, Decimal]]:
    """What a meter query sums: window rows after FINAL, zero rows skipped (query/sql.py)."""
    rows = client.query(
        f"SELECT meter, subject, window_start, group_key, sum(count), sum(sum) FROM `{db}`.meter_windows FINAL "
        "WHERE count > 0 GROUP BY meter, subject, window_start, group_key").result_rows
    out: dict[Key, tuple[int, Decimal]] = {}
    for meter, subject, ws, gk, c, s in rows:
        ws = ws.replace(tzinfo=UTC) if ws.tzinfo is None else ws
        out[(meter, subject, ws, gk)] = (0, Decimal(s)) if meter == "tokens" else (int(c), Decimal(0))
    return out


def stored_events(client: Any, db: str) -> Counter[tuple[str, str, str]]:
    rows = client.query(f"SELECT source, id, subject FROM `{db}`.events FINAL").result_rows
    return Counter((str(s), str(i), str(subj)) for s, i, subj in rows)


def winners(log: list[Message]) -> Counter[tuple[str, str, str]]:
    best: dict[tuple[str, str], tuple[tuple[int, int, int, int], str]] = {}
    for partition, offset, value, ts in log:
        for index, e in enumerate(orjson.loads(value)):
            rank, key = (int(ts or 0), partition, offset, index), (e["source"], e["id"])
            if key not in best or rank < best[key][0]:
                best[key] = (rank, e["subject"])
    return Counter((s, i, subj) for (s, i), (_, subj) in best.items())


async def race(a: BatchProcessor, b: BatchProcessor, log_a: list[Message], log_b: list[Message]) -> None:
    """A decides and flushes its batch, then stalls before writing; B processes its batch whole; A writes."""
    sink_a = a.sink
    assert isinstance(sink_a, GatedSink)
    sink_a.hold = True
    task = asyncio.create_task(a.process(log_a))
    await asyncio.wait_for(sink_a.waiting.wait(), 30)
    await b.process(log_b)
    sink_a.gate.set()
    await asyncio.wait_for(task, 60)
    sink_a.hold = False


def test_copies_decided_by_two_workers_before_either_wrote_count_once(
        tmp_path: Path, clickhouse_url: str, database: str) -> None:
    staged_race(tmp_path, clickhouse_url, database)


def test_the_race_is_repaired_on_a_cluster(tmp_path: Path, cluster: LocalClickHouseCluster,
                                           unique_name: Callable[[str], str]) -> None:
    """2 shards: rows sharded by subject (the two copies of a key mostly on different shards), deletes run
    on every node's local table (`mutate`), the replacement windows carry their own insert token."""
    database = unique_name("race")
    cluster.create_schema(database)
    topology = Topology(cluster=cluster.name, replicated=False, on_cluster=False,
                        nodes=tuple(node.url for node in cluster.nodes))
    staged_race(tmp_path, cluster.url, database, topology)


def staged_race(tmp_path: Path, clickhouse_url: str, database: str, topology: Topology = SINGLE_NODE) -> None:
    now = float(int(time.time()))  # broker times are whole milliseconds, as Kafka's are
    log_a, log_b = the_log(now)
    expected, expected_events = oracle(log_a + log_b), winners(log_a + log_b)
    a = worker(tmp_path, "a", clickhouse_url, database, {0}, topology)
    b = worker(tmp_path, "b", clickhouse_url, database, {1}, topology)
    client = connect(clickhouse_url, database=database)

    async def scenario() -> None:
        await race(a, b, log_a, log_b)
        # Both copies of 30 keys are stored now; no worker could have seen the other's in time.
        assert rollups(client, database) != expected
        for _ in range(2):  # as the timers do: A retracts the originals that lost, B the copies
            await a.reconcile()
            await b.reconcile()
        # A meets all 30 and retracts its 15 losing originals before B looks: B meets the 15 others.
        assert (a.state.conflicts, b.state.conflicts) == (30, 15)
        # Nothing is left to do on the partitions they own (the other's losers stay noted, in case).
        assert {x.loser.partition for x in a.state.pending_retractions()} <= {1}
        assert {x.loser.partition for x in b.state.pending_retractions()} <= {0}
        assert rollups(client, database) == expected
        assert stored_events(client, database) == expected_events
        zero = client.query(f"SELECT count() FROM `{database}`.meter_windows FINAL WHERE count = 0").result_rows[0][0]
        assert zero > 0  # rows only losers fed were replaced by zero rows, which answers skip
        # Replays decide as the retraction did: a crash before the acks re-processes both batches.
        await a.process(log_a)
        await b.process(log_b)
        assert rollups(client, database) == expected
        assert stored_events(client, database) == expected_events
        # A new owner of B's partition with an empty cache (a lost state dir) finds no conflict left.
        c = worker(tmp_path, "c", clickhouse_url, database, {1}, topology)
        await c.reconcile()
        await c.process(log_b)
        assert c.state.conflicts == 0 and c.state.pending_retractions() == []
        # ... and a worker that comes to own a partition with losers it noted finds them undone already.
        a.assigned({1})
        await a.reconcile()
        assert a.state.pending_retractions() == []
        assert rollups(client, database) == expected
        c.state.close()

    try:
        asyncio.run(scenario())
    finally:
        client.close()
        a.state.close()
        b.state.close()


class CrashingSink(GatedSink):
    """Dies (a non-storage error, as kill -9 would stop it) right before deleting the losers' rows of
    `crash_at`: their windows are replaced; their `events` rows (unless deleted before the crash) and
    their `dedupe_keys` rows (deleted last) stay."""

    crash = True
    crash_at = "events"

    def _delete(self, table: str, positions: Any) -> None:
        if table == self.crash_at and self.crash:
            self.crash = False
            raise RuntimeError(f"killed before deleting the losers' {table} rows")
        super()._delete(table, positions)


@pytest.mark.parametrize("crash_at", ["events", "dedupe_keys"])
def test_a_retraction_cut_short_is_found_again_by_a_worker_with_a_lost_cache(
        tmp_path: Path, clickhouse_url: str, database: str, crash_at: str) -> None:
    now = float(int(time.time()))
    log_a, log_b = the_log(now)
    expected, expected_events = oracle(log_a + log_b), winners(log_a + log_b)
    a = worker(tmp_path, "a", clickhouse_url, database, {0})
    b = worker(tmp_path, "b", clickhouse_url, database, {1})
    client = connect(clickhouse_url, database=database)
    crashing = CrashingSink(f"{clickhouse_url}/{database}", database, backoff_max=0.5)
    crashing.crash_at = crash_at
    a.sink = crashing

    async def scenario() -> None:
        b_sink = b.sink
        assert isinstance(b_sink, GatedSink)
        b_sink.hold = True  # this time B stalls; A processes its batch whole
        task = asyncio.create_task(b.process(log_b))
        await asyncio.wait_for(b_sink.waiting.wait(), 30)
        await a.process(log_a)
        b_sink.gate.set()
        await asyncio.wait_for(task, 60)
        b_sink.hold = False
        await b.reconcile()  # B retracts its late copies
        with pytest.raises(RuntimeError, match="killed"):
            await a.reconcile()  # A dies part-way through retracting its 15 losing originals
        a.state.close()
        # Restarted without its state dir: the losers' dedupe_keys rows make the conflicts show again.
        a2 = worker(tmp_path, "a2", clickhouse_url, database, {0})
        await a2.reconcile()
        assert a2.state.conflicts == 15 and a2.state.pending_retractions() == []
        assert rollups(client, database) == expected
        assert stored_events(client, database) == expected_events
        await a2.process(log_a)  # and its replay drops them
        assert rollups(client, database) == expected
        assert stored_events(client, database) == expected_events
        a2.state.close()

    try:
        asyncio.run(scenario())
    finally:
        client.close()
        b.state.close()


def test_a_loser_whose_month_was_compacted_first_stays_counted_and_says_so(
        tmp_path: Path, clickhouse_url: str, database: str) -> None:
    """The compaction fence: the loser's windows sit in a month compacted before its retraction, so a
    replacement would be dropped at the watermark. Nothing of it is deleted (its `events` row still
    matches what is counted), the worker counts it as unrepaired, and the other side's losers are
    retracted as usual."""
    now = float(int(time.time()))
    log_a, log_b = the_log(now, age=timedelta(days=40))  # windows in a closed month
    a = worker(tmp_path, "a", clickhouse_url, database, {0})
    b = worker(tmp_path, "b", clickhouse_url, database, {1})
    for w in (a, b):
        assert isinstance(w.sink, ClickHouseSink)
        w.sink.replay_guard = ReplayGuard(database, timedelta(days=1), timedelta(minutes=10), "race-test")
    client = connect(clickhouse_url, database=database)

    async def scenario() -> None:
        await race(a, b, log_a, log_b)
        # Compacted after both copies were written, before any retraction (worker A was down meanwhile).
        month = datetime.fromtimestamp(now, UTC) - timedelta(days=40)
        write_claim(client, database, f"{month:%Y%m}", "compactor", DONE,
                    watermarks={(EPOCH, 0): max(offset for _, offset, _, _ in log_a)})
        unrepaired = metrics.DEDUPE_UNREPAIRED._value.get()
        for _ in range(2):
            await b.reconcile()
            await a.reconcile()
        assert metrics.DEDUPE_UNREPAIRED._value.get() - unrepaired == 15
        assert a.state.pending_retractions([0]) == [] and b.state.pending_retractions([1]) == []
        assert rollups(client, database) == oracle(log_a + log_b, also=log_a)  # A's 15 losers stay counted
        stored = stored_events(client, database)
        assert sum(stored.values()) == sum(winners(log_a + log_b).values()) + 15

    try:
        asyncio.run(scenario())
    finally:
        client.close()
        a.state.close()
        b.state.close()
