"""The processor on a real broker, real ClickHouse and a real worker process (`python -m processor`).

Events are produced straight to Kafka in ingest's wire format (JSON arrays of one subject, keyed by
subject) with exact duplicates, and the ClickHouse rollups must equal an oracle computed here -- also
after the worker is killed with SIGKILL mid-run and restarted (exactly-once effect).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, localcontext
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Producer

from meterline.adapters.clickhouse import connect, keep_dedupe_keys
from meterline.localinfra.ports import free_port, wait_for
from processor.topics import ensure_events_topic

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
meters:
  - slug: tokens
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy:
      model: $.model
  - slug: calls
    eventType: prompt
    aggregation: COUNT
"""
Key = tuple[str, str, datetime, str]


def generate(rnd: random.Random, n: int, start: int = 0, dup_from: list[dict[str, Any]] | None = None,
             dup_rate: float = 0.1) -> list[dict[str, Any]]:
    """`n` events over 20 subjects and 5 minutes; a share are exact copies of earlier events."""
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    out: list[dict[str, Any]] = []
    pool = dup_from if dup_from is not None else out
    for i in range(start, start + n):
        if pool and rnd.random() < dup_rate:
            out.append(dict(rnd.choice(pool)))
            continue
        t = base + timedelta(seconds=rnd.randrange(300), microseconds=rnd.randrange(10**6))
        out.append({"specversion": "1.0", "id": f"evt-{i}", "source": "itest", "type": "prompt",
                    "subject": f"cust-{rnd.randrange(20)}", "time": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "data": {"tokens": rnd.randrange(1, 1000), "model": rnd.choice(["a", "b"])}})
    return out


def messages(events: list[dict[str, Any]], size: int = 100) -> list[tuple[str, list[dict[str, Any]]]]:
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_subject[e["subject"]].append(e)
    return [(s, evs[i:i + size]) for s, evs in by_subject.items() for i in range(0, len(evs), size)]


def produce(bootstrap: str, topic: str, msgs: list[tuple[str, list[dict[str, Any]]]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for subject, evs in msgs:
        producer.produce(topic, orjson.dumps(evs), key=subject.encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def oracle(msgs: list[tuple[str, list[dict[str, Any]]]]) -> tuple[dict[Key, tuple[int, Decimal]], int]:
    """Rollups of the first sighting of every (source, id), per meter/subject/minute/group."""
    seen: set[tuple[str, str]] = set()
    out: dict[Key, list[Any]] = defaultdict(lambda: [0, Decimal(0)])
    with localcontext(Context(prec=100)):  # 29-digit values: the default context would round sums
        _fold(msgs, seen, out)
    return {k: (c, s) for k, (c, s) in out.items()}, len(seen)


def _fold(msgs: list[tuple[str, list[dict[str, Any]]]], seen: set[tuple[str, str]], out: dict[Key, list[Any]]) -> None:
    for _, evs in msgs:  # duplicates share a subject, so per-subject order is the log order
        for e in evs:
            if (e["source"], e["id"]) in seen:
                continue
            seen.add((e["source"], e["id"]))
            minute = datetime.fromisoformat(e["time"]).replace(second=0, microsecond=0)
            tok = out[("tokens", e["subject"], minute, orjson.dumps({"model": e["data"]["model"]}).decode())]
            tok[0] += 1
            tok[1] += Decimal(e["data"]["tokens"])
            out[("calls", e["subject"], minute, "{}")][0] += 1


def rollups(client: Any, db: str) -> dict[Key, tuple[int, Decimal]]:
    result = client.query(
        f"SELECT meter, subject, window_start, group_key, sum(count), sum(sum) FROM `{db}`.meter_windows FINAL "
        "GROUP BY meter, subject, window_start, group_key"
    )
    out: dict[Key, tuple[int, Decimal]] = {}
    for meter, subject, ws, gk, c, s in result.result_rows:
        ws = ws.replace(tzinfo=UTC) if ws.tzinfo is None else ws
        out[(meter, subject, ws, gk)] = (int(c), Decimal(s) if meter == "tokens" else Decimal(0))
    return out


@pytest.fixture
def world(kafka_bootstrap: str, clickhouse_url: str, unique_name: Callable[[str], str],
          tmp_path: Path) -> Iterator[dict[str, Any]]:
    topic, db = unique_name("events"), unique_name("proc")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    ensure_events_topic(kafka_bootstrap, topic, 4)
    env = dict(os.environ, KAFKA_BOOTSTRAP=kafka_bootstrap, CLICKHOUSE_URL=f"{clickhouse_url.rstrip('/')}/{db}",
               METERLINE_EVENTS_TOPIC=topic, METERLINE_TOPIC_PARTITIONS="4", METERLINE_CONFIG=str(config),
               METERLINE_CONSUMER_GROUP=unique_name("group"), METERLINE_STATE_DIR=str(tmp_path / "state"),
               METERLINE_PROCESSOR_BATCH_MESSAGES="20")
    procs: list[subprocess.Popen[bytes]] = []

    def start(**extra: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"worker-{len(procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([sys.executable, "-m", "processor"], cwd=ROOT, env=env | extra, stdout=log, stderr=log)
        procs.append(p)
        return p

    client = connect(clickhouse_url, database="default")
    try:
        yield {"topic": topic, "db": db, "start": start, "client": client, "tmp": tmp_path, "config": config}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        client.close()


def count_events(client: Any, db: str) -> int:
    try:
        return int(client.command(f"SELECT count() FROM `{db}`.events FINAL"))
    except Exception:  # noqa: BLE001 - the worker creates the schema; until then there is nothing
        return 0


def wait_exact(world: dict[str, Any], expected: dict[Key, tuple[int, Decimal]], unique: int,
               timeout: float = 120.0) -> None:
    client, db = world["client"], world["db"]
    deadline = time.monotonic() + timeout
    got: dict[Key, tuple[int, Decimal]] = {}
    while time.monotonic() < deadline:
        if count_events(client, db) >= unique:
            got = rollups(client, db)
            if got == expected:
                assert count_events(client, db) == unique
                return
        time.sleep(0.5)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(world["tmp"].glob("worker-*.log")))
    missing = {k: (v, got.get(k)) for k, v in expected.items() if got.get(k) != v}
    extra = {k: got.get(k) for k in set(got) - set(expected)}
    pytest.fail(f"rollups differ in {len(missing)} windows (events {count_events(client, db)}/{unique}): "
                f"missing or wrong {dict(list(missing.items())[:5])}, unexpected {dict(list(extra.items())[:5])}\n{logs}")


def test_rollups_equal_oracle(world: dict[str, Any], kafka_bootstrap: str) -> None:
    rnd = random.Random(7)
    msgs = messages(generate(rnd, 3000))
    produce(kafka_bootstrap, world["topic"], msgs)
    world["start"]()
    expected, unique = oracle(msgs)
    wait_exact(world, expected, unique)


def test_sigkill_mid_run_and_restart_stays_exact(world: dict[str, Any], kafka_bootstrap: str) -> None:
    rnd = random.Random(11)
    first = generate(rnd, 4000)
    msgs = messages(first, size=50)
    produce(kafka_bootstrap, world["topic"], msgs)
    worker = world["start"]()
    deadline = time.monotonic() + 60
    while count_events(world["client"], world["db"]) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)  # mid-run: some batches written, offsets partly committed
    worker.wait(10)
    # more events, including exact re-sends of events the dead worker may or may not have written
    second = generate(rnd, 2000, start=10_000, dup_from=first, dup_rate=0.3)
    more = messages(second, size=50)
    produce(kafka_bootstrap, world["topic"], more)
    world["start"]()
    expected, unique = oracle(msgs + more)
    wait_exact(world, expected, unique)


def test_poison_messages_are_dead_lettered_and_never_stall_their_partition(
        world: dict[str, Any], kafka_bootstrap: str) -> None:
    """Messages a foreign producer put on the topic, each followed by valid events of its subject: an
    event time ClickHouse cannot store (dead-lettered, never retried for ever), a message whose window sum
    would overflow Decimal128(9) (the value that would overflow it is dead-lettered `value_out_of_range`,
    the rest metered), and two (source, id) pairs that differ only around a NUL (two events, two keys).
    Every valid event is counted. (Rows ClickHouse itself refuses are quarantined: tests/unit/test_batch.py
    and test_sink.py.)"""
    rnd = random.Random(5)
    valid = generate(rnd, 600)
    subjects = sorted({e["subject"] for e in valid})
    base = dict(valid[0], data={"tokens": 1, "model": "a"})
    far_future = dict(base, id="poison-time", subject=subjects[0], time="9999-12-31T23:59:59Z")
    huge = "99900000000000000000000000000"  # 29 digits: each value fits, their sum does not
    overflow = [dict(base, id=f"poison-sum-{i}", subject=subjects[1], data={"tokens": huge, "model": "a"})
                for i in range(2)]
    nul = [dict(base, id="c", source="a\u0000b", subject=subjects[2]),
           dict(base, id="b\u0000c", source="a", subject=subjects[2])]
    produce(kafka_bootstrap, world["topic"], [(subjects[0], [far_future]), (subjects[1], overflow), (subjects[2], nul)])
    msgs = messages(valid)
    produce(kafka_bootstrap, world["topic"], msgs)
    world["start"]()
    # The first huge value fits its window; the second would take the sum past 10^29: only COUNT counts it.
    expected, unique = oracle([(subjects[1], overflow[:1]), (subjects[2], nul), *msgs])
    minute = datetime.fromisoformat(base["time"]).replace(second=0, microsecond=0)
    count, _ = expected[("calls", subjects[1], minute, "{}")]
    expected[("calls", subjects[1], minute, "{}")] = (count + 1, Decimal(0))
    wait_exact(world, expected, unique + 1)  # the second overflow event is stored, its tokens not metered
    client, db = world["client"], world["db"]
    dead = client.query(f"SELECT id, meter, reason_code FROM `{db}`.dead_letters FINAL").result_rows
    assert sorted(dead) == [("poison-sum-1", "tokens", "value_out_of_range"), ("poison-time", "", "invalid_event")]


def test_a_restarted_log_stops_the_worker_and_never_overwrites_old_positions(
        world: dict[str, Any], kafka_bootstrap: str) -> None:
    """The topic is deleted and re-created while the worker runs (as when a Kafka volume is lost): its
    offsets restart at 0. Positions of the new log must not replace rows of the old one, so the worker
    stops loudly (a restart then works under the new log epoch: cluster id + topic id)."""
    from confluent_kafka.admin import AdminClient

    rnd = random.Random(17)
    first = messages(generate(rnd, 1500), size=20)
    produce(kafka_bootstrap, world["topic"], first)
    worker = world["start"]()
    expected, unique = oracle(first)
    wait_exact(world, expected, unique)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.delete_topics([world["topic"]])[world["topic"]].result(30)
    deadline = time.monotonic() + 30
    while world["topic"] in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
        time.sleep(0.2)
    ensure_events_topic(kafka_bootstrap, world["topic"], 4)
    second = messages(generate(rnd, 300, start=50_000), size=20)  # fewer offsets than the old log had
    produce(kafka_bootstrap, world["topic"], second)
    deadline = time.monotonic() + 120
    while worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker.poll() is not None, "the worker kept running on a restarted log"
    log = "".join(p.read_text(errors="replace") for p in world["tmp"].glob("worker-*.log"))
    assert "the topic's log restarted" in log
    wait_exact(world, expected, unique)  # nothing of the old log was overwritten
    # (Resuming the new log from its start despite the group's old committed offsets is not done yet.)


# config.yaml with a YAML error inside its meters block (the settings block stays readable).
BROKEN = """
processor_batch_seconds: 0.2
meters:
  - slug: tokens
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model
"""


def worker_logs(world: dict[str, Any]) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(world["tmp"].glob("worker-*.log")))


def test_a_restart_with_a_broken_config_meters_with_the_stored_meters(
        world: dict[str, Any], kafka_bootstrap: str) -> None:
    """Hot reload keeps the last good meters on a broken file; a restart must too: the worker starts with
    the meters in the store, meters every event exactly, says why the file was not applied (log,
    meterline_config_valid 0, /readyz `config`) and reports the file valid again once it is fixed."""
    rnd = random.Random(23)
    first = messages(generate(rnd, 800))
    produce(kafka_bootstrap, world["topic"], first)
    worker = world["start"]()
    expected, unique = oracle(first)
    wait_exact(world, expected, unique)
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)

    world["config"].write_text(BROKEN)
    second = messages(generate(rnd, 800, start=20_000))
    produce(kafka_bootstrap, world["topic"], second)
    port = free_port()
    worker = world["start"](METERLINE_PROCESSOR_WEB_PORT=str(port))
    expected, unique = oracle(first + second)  # both meters of the store, not the file's broken list
    wait_exact(world, expected, unique)
    assert worker.poll() is None, worker_logs(world)
    web = f"http://127.0.0.1:{port}"
    assert "meterline_config_valid 0.0" in httpx.get(f"{web}/metrics", timeout=10).text
    config = httpx.get(f"{web}/readyz", timeout=10).json()["config"]
    assert config["status"] == "invalid" and "meters: invalid YAML" in config["detail"], config
    assert "config.yaml NOT applied" in worker_logs(world)

    world["config"].write_text(CONFIG)
    os.utime(world["config"], (time.time() + 5, time.time() + 5))  # an mtime that surely moved
    wait_for(lambda: httpx.get(f"{web}/readyz", timeout=10).json()["config"]["status"] == "valid", 30,
             "the fixed file reported valid")
    assert "meterline_config_valid 1.0" in httpx.get(f"{web}/metrics", timeout=10).text


def test_a_first_start_with_a_broken_config_refuses_naming_the_file(world: dict[str, Any]) -> None:
    """No meter in the store and none readable from the file: nothing to meter with, so the worker exits
    and says why (a store with meters starts instead: the test above)."""
    world["config"].write_text(BROKEN)
    worker = world["start"]()
    assert worker.wait(120) != 0
    log = worker_logs(world)
    assert f"{world['config']}: meters: invalid YAML" in log and "holds no meter yet" in log, log


def assignments(world: dict[str, Any], workers: int, partitions: int = 4, timeout: float = 60.0) -> list[set[int]]:
    """Each worker's partitions once the group has settled: every partition owned by exactly one worker
    (read from the workers' "assigned" log records)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owned: list[set[int]] = []
        for i in range(workers):
            records = [orjson.loads(line) for line in (world["tmp"] / f"worker-{i}.log").read_bytes().splitlines()
                       if line.startswith(b"{") and b'"assigned"' in line]
            mine = [r["partitions"] for r in records if r.get("event") == "assigned"]
            owned.append(set(mine[-1]) if mine else set())
        if all(owned) and sum(map(len, owned)) == partitions and set().union(*owned) == set(range(partitions)):
            return owned
        time.sleep(0.3)
    pytest.fail(f"the group did not settle on {workers} workers")


def produce_to(bootstrap: str, topic: str, partition: int, msgs: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Produce onto one partition whatever the key says (a foreign producer, or a partition-count change)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for subject, evs in msgs:
        producer.produce(topic, orjson.dumps(evs), key=subject.encode(), partition=partition)
    assert producer.flush(30) == 0


def test_copies_on_partitions_of_two_workers_count_once(world: dict[str, Any], kafka_bootstrap: str) -> None:
    """Dedupe is global per namespace: copies of events (same source and id, another subject) on a
    partition another worker owns are dropped -- a client retry under another subject, a partition-count
    change or a message produced straight onto another partition -- and the retry's new events count."""
    world["start"](METERLINE_STATE_DIR=str(world["tmp"] / "a"))  # one RocksDB directory per live worker
    # The second starts once the first synced config.yaml's meters: two workers syncing a fresh store at
    # once can leave one metering its first batch without them (a live-meters race, not this test's).
    assignments(world, 1)
    world["start"](METERLINE_STATE_DIR=str(world["tmp"] / "b"))
    one, two = assignments(world, 2)
    rnd = random.Random(23)
    originals = generate(rnd, 400, dup_rate=0)
    first = messages(originals, size=40)
    produce_to(kafka_bootstrap, world["topic"], min(one), first)
    expected, unique = oracle(first)
    wait_exact(world, expected, unique)
    retried = [dict(e, subject="retry-" + e["subject"]) for e in rnd.sample(originals, 150)]
    fresh = generate(rnd, 100, start=5_000, dup_rate=0)
    second = messages(retried + fresh, size=40)
    produce_to(kafka_bootstrap, world["topic"], min(two), second)
    # More copies on the first worker's partition (its own keys), then one new event behind them.
    third = messages(retried[:30], size=10) + messages(generate(rnd, 1, start=9_000, dup_rate=0))
    produce_to(kafka_bootstrap, world["topic"], max(one), third)
    expected, unique = oracle(first + second + third)
    assert unique == 501
    wait_exact(world, expected, unique)


def test_a_lagging_takeover_judges_the_dedupe_horizon_on_broker_time(world: dict[str, Any], kafka_bootstrap: str) -> None:
    """Originals appended 33 days ago (producer timestamps: this test's topic keeps CreateTime), retries
    31.9 days after them, processed by a worker that took over with an empty cache: it loads the keys
    kept for the horizon plus the maximum lag from ClickHouse and drops every retry."""
    rnd = random.Random(29)
    now_ms = int(time.time() * 1000)
    originals = generate(rnd, 300, dup_rate=0)
    first = messages(originals, size=30)
    produce_at(kafka_bootstrap, world["topic"], first, now_ms - 33 * 86_400_000)
    worker = world["start"](METERLINE_STATE_DIR=str(world["tmp"] / "a"))
    expected, unique = oracle(first)
    wait_exact(world, expected, unique)
    # dedupe_keys rows live as long as a load reads keys (32 + 14 days) plus one day, then go.
    engine = world["client"].command(f"SELECT engine_full FROM system.tables WHERE database = '{world['db']}' "
                                     "AND name = 'dedupe_keys'")
    assert "TTL toDateTime(seen_at) + toIntervalDay(47)" in str(engine)
    assert not keep_dedupe_keys(world["client"], world["db"], 47)  # already so: no second ALTER
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    second = messages(rnd.sample(originals, 120) + generate(rnd, 50, start=7_000, dup_rate=0), size=30)
    produce_at(kafka_bootstrap, world["topic"], second, now_ms - 33 * 86_400_000 + int(31.9 * 86_400_000))
    world["start"](METERLINE_STATE_DIR=str(world["tmp"] / "b"))  # a takeover: nothing cached locally
    expected, unique = oracle(first + second)
    assert unique == 350
    wait_exact(world, expected, unique)


def test_copies_of_events_stored_before_dedupe_keys_existed_are_dropped_after_a_restart(
        world: dict[str, Any], kafka_bootstrap: str) -> None:
    """Originals stored, then their `dedupe_keys` rows and the backfill record removed: the history a version
    from before that table left (`events` only). A worker with an empty cache reloads its partitions from
    `dedupe_keys` alone, so it drops the copies only because its schema step filled the table from `events`."""
    rnd = random.Random(31)
    originals = generate(rnd, 400, dup_rate=0)
    first = messages(originals, size=40)
    produce(kafka_bootstrap, world["topic"], first)
    worker = world["start"](METERLINE_STATE_DIR=str(world["tmp"] / "a"))
    expected, unique = oracle(first)
    wait_exact(world, expected, unique)
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    for table in ("dedupe_keys", "dedupe_key_backfills"):
        world["client"].command(f"TRUNCATE TABLE IF EXISTS `{world['db']}`.{table}")
    second = messages(rnd.sample(originals, 150) + generate(rnd, 60, start=9_000, dup_rate=0), size=30)
    produce(kafka_bootstrap, world["topic"], second)
    world["start"](METERLINE_STATE_DIR=str(world["tmp"] / "b"))  # a restart with nothing cached locally
    expected, unique = oracle(first + second)
    assert unique == 460
    wait_exact(world, expected, unique)


def produce_at(bootstrap: str, topic: str, msgs: list[tuple[str, list[dict[str, Any]]]], timestamp_ms: int) -> None:
    """Produce with a chosen message timestamp (the topic's CreateTime): how old the log says they are."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for subject, evs in msgs:
        producer.produce(topic, orjson.dumps(evs), key=subject.encode(), timestamp=timestamp_ms)
    assert producer.flush(30) == 0
