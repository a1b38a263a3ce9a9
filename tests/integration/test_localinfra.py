"""The local broker and ClickHouse really work: round trips are compared against what was sent, restarts
keep data, and nothing outlives stop(). Each test starts its own servers (cheap: ~0.1 s broker, ~0.5 s
ClickHouse) so pausing or killing one never disturbs other tests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from meterline.localinfra import fetch_tansu
from meterline.localinfra.broker import LocalBroker, TopicMismatchError, broker_answers, ensure_topic
from meterline.localinfra.clickhouse_server import LocalClickHouse, ping
from meterline.localinfra.ports import NotReadyError, port_is_free

pytestmark = pytest.mark.timeout(180)


def pid_gone(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    b = LocalBroker(tmp_path)
    try:
        yield b.start()
    finally:
        b.stop()


@pytest.fixture
def fresh_clickhouse(tmp_path: Path) -> Iterator[LocalClickHouse]:
    server = LocalClickHouse(tmp_path / "data")
    try:
        yield server.start()
    finally:
        server.stop()


def produce_all(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Idempotent producer, acks=all (what ingest uses); fail unless every message was acked."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    errors: list[KafkaError] = []
    for key, value in messages:
        producer.produce(topic, value, key, on_delivery=lambda err, _msg: errors.append(err) if err else None)
    assert producer.flush(30) == 0
    assert errors == []


Received = tuple[int | None, bytes | None, bytes | None]


def consume_assigned(bootstrap: str, topic: str, partitions: int, count: int) -> list[Received]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[Received] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append((msg.partition(), msg.key(), msg.value()))
        assert consumer.poll(1.0) is None  # and nothing more than was sent
    finally:
        consumer.close()
    return got


# --- broker -------------------------------------------------------------------------------------------


def test_broker_starts_on_free_port_with_fresh_cluster_id(tmp_path: Path) -> None:
    with LocalBroker(tmp_path) as one, LocalBroker(tmp_path) as two:
        assert one.bootstrap.startswith("127.0.0.1:") and one.port != two.port
        assert not port_is_free(one.port)  # type: ignore[arg-type]
        assert one.cluster_id != two.cluster_id
        assert str(one.cluster_id).startswith("meterline-")
        # The epoch the processor reads is what clients see in metadata.
        assert AdminClient({"bootstrap.servers": one.bootstrap}).list_topics(timeout=5).cluster_id == one.cluster_id


def test_produce_and_consume_back_exactly_what_was_sent(fresh_broker: LocalBroker) -> None:
    ensure_topic(fresh_broker.bootstrap, "events", 4)
    sent = [(f"subject-{i % 7}".encode(), f"payload-{i}".encode()) for i in range(300)]
    produce_all(fresh_broker.bootstrap, "events", sent)

    got = consume_assigned(fresh_broker.bootstrap, "events", 4, len(sent))

    assert sorted((k, v) for _, k, v in got) == sorted(sent)
    for key in {k for k, _ in sent}:  # one key -> one partition, in send order
        assert len({p for p, k, _ in got if k == key}) == 1
        assert [v for _, k, v in got if k == key] == [v for k, v in sent if k == key]


def test_consumer_group_join_and_commit(fresh_broker: LocalBroker) -> None:
    ensure_topic(fresh_broker.bootstrap, "grouped", 2)
    sent = [(b"k%d" % i, b"v%d" % i) for i in range(20)]
    produce_all(fresh_broker.bootstrap, "grouped", sent)
    # tansu delays a join by about session.timeout.ms / 2, so keep it short.
    conf = {"bootstrap.servers": fresh_broker.bootstrap, "group.id": "g", "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "session.timeout.ms": 6000}
    consumer = Consumer(conf)
    try:
        consumer.subscribe(["grouped"])
        got: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + 60
        while len(got) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append((msg.key(), msg.value()))
        assert sorted(got) == sorted(sent)
        consumer.commit(asynchronous=False)
        committed = consumer.committed([TopicPartition("grouped", p) for p in range(2)], timeout=10)
        assert sum(tp.offset for tp in committed) == len(sent)
    finally:
        consumer.close()


def test_ensure_topic_is_idempotent_and_checks_partitions(fresh_broker: LocalBroker) -> None:
    ensure_topic(fresh_broker.bootstrap, "t", 8)
    ensure_topic(fresh_broker.bootstrap, "t", 8)
    topics = AdminClient({"bootstrap.servers": fresh_broker.bootstrap}).list_topics(timeout=5).topics
    assert len(topics["t"].partitions) == 8
    with pytest.raises(TopicMismatchError, match="has 8 partitions, expected 3"):
        ensure_topic(fresh_broker.bootstrap, "t", 3)


def test_broker_pause_makes_it_unresponsive_and_resume_recovers(fresh_broker: LocalBroker) -> None:
    ensure_topic(fresh_broker.bootstrap, "p", 1)
    fresh_broker.pause()
    try:
        with pytest.raises(KafkaException):
            broker_answers(fresh_broker.bootstrap, timeout=1.0)
    finally:
        fresh_broker.resume()
    assert broker_answers(fresh_broker.bootstrap, timeout=5.0)
    produce_all(fresh_broker.bootstrap, "p", [(b"k", b"after-resume")])
    assert [v for _, _, v in consume_assigned(fresh_broker.bootstrap, "p", 1, 1)] == [b"after-resume"]


def test_broker_stop_leaves_no_process_even_with_clients_or_paused(tmp_path: Path) -> None:
    # tansu ignores SIGTERM while clients are connected; stop() must still end it (SIGKILL fallback).
    b = LocalBroker(tmp_path).start()
    pid, port = b.pid, b.port
    producer = Producer({"bootstrap.servers": b.bootstrap})
    producer.list_topics(timeout=5)
    b.pause()
    b.stop()
    assert pid_gone(pid) and not b.running
    assert port_is_free(port)  # type: ignore[arg-type]
    b.stop()  # twice is fine


def test_broker_restart_is_a_new_empty_log_on_the_same_port(fresh_broker: LocalBroker) -> None:
    """The broker re-created under running clients (tests/faults/test_broker_epoch.py): same address, new
    cluster id (= new log epoch), no topics, offsets from 0 again."""
    ensure_topic(fresh_broker.bootstrap, "events", 1)
    produce_all(fresh_broker.bootstrap, "events", [(b"k", b"old-%d" % i) for i in range(5)])
    bootstrap, cluster_id, pid = fresh_broker.bootstrap, fresh_broker.cluster_id, fresh_broker.pid
    fresh_broker.stop()
    fresh_broker.restart()
    assert fresh_broker.bootstrap == bootstrap and fresh_broker.pid != pid and pid_gone(pid)
    assert fresh_broker.cluster_id != cluster_id
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5)
    assert metadata.cluster_id == fresh_broker.cluster_id and "events" not in metadata.topics
    ensure_topic(bootstrap, "events", 1)
    produce_all(bootstrap, "events", [(b"k", b"new")])
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition("events", 0), timeout=10)
    finally:
        consumer.close()
    assert (low, high) == (0, 1)
    assert [v for _, _, v in consume_assigned(bootstrap, "events", 1, 1)] == [b"new"]


def test_tansu_path_and_fetch_are_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fetch_tansu.tansu_path()
    assert fetch_tansu.binary_version(path) == "tansu 0.6.0"
    monkeypatch.setenv(fetch_tansu.ENV_VAR, str(path))
    assert fetch_tansu.tansu_path() == path
    monkeypatch.setenv(fetch_tansu.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(fetch_tansu.TansuFetchError, match="METERLINE_TANSU_BIN"):
        fetch_tansu.tansu_path()

    dest = tmp_path / "bin" / "tansu"
    assert fetch_tansu.fetch(dest) == dest and fetch_tansu.works(dest)
    mtime = dest.stat().st_mtime_ns
    fetch_tansu.fetch(dest)
    assert dest.stat().st_mtime_ns == mtime  # second call did not re-download


# --- ClickHouse ---------------------------------------------------------------------------------------

ROWS = [(1, "one", 1.5), (2, "two", -2.25), (3, "three", 0.0)]


def client_for(server: LocalClickHouse) -> clickhouse_connect.driver.client.Client:
    return clickhouse_connect.get_client(host="127.0.0.1", port=server.http_port)


def create_and_fill(server: LocalClickHouse, rows: list[tuple[int, str, float]]) -> None:
    client = client_for(server)
    try:
        client.command("CREATE DATABASE IF NOT EXISTS probe")
        client.command(
            "CREATE TABLE IF NOT EXISTS probe.t (k UInt32, name String, v Float64) "
            "ENGINE = ReplacingMergeTree ORDER BY k"
        )
        client.insert("probe.t", [list(r) for r in rows], column_names=["k", "name", "v"])
    finally:
        client.close()


def read_rows(server: LocalClickHouse) -> list[tuple[int, str, float]]:
    client = client_for(server)
    try:
        return [tuple(r) for r in client.query("SELECT k, name, v FROM probe.t FINAL ORDER BY k").result_rows]
    finally:
        client.close()


def test_clickhouse_round_trip(fresh_clickhouse: LocalClickHouse) -> None:
    assert fresh_clickhouse.url == f"http://127.0.0.1:{fresh_clickhouse.http_port}"
    assert ping(fresh_clickhouse.url)
    create_and_fill(fresh_clickhouse, ROWS)
    assert read_rows(fresh_clickhouse) == ROWS


def test_clickhouse_keeps_data_across_stop_and_kill(fresh_clickhouse: LocalClickHouse) -> None:
    create_and_fill(fresh_clickhouse, ROWS[:2])
    first_pid = fresh_clickhouse.pid
    fresh_clickhouse.stop()
    assert pid_gone(first_pid)

    fresh_clickhouse.start()
    assert read_rows(fresh_clickhouse) == ROWS[:2]
    create_and_fill(fresh_clickhouse, ROWS[2:])
    killed_pid = fresh_clickhouse.pid
    fresh_clickhouse.kill()  # crash: no shutdown, lock file left behind
    assert pid_gone(killed_pid)

    fresh_clickhouse.start()  # reopens the same data dir
    assert read_rows(fresh_clickhouse) == ROWS


def test_clickhouse_restarts_on_its_old_ports(fresh_clickhouse: LocalClickHouse) -> None:
    """Fault tests kill ClickHouse under running processes; only the same URL lets them reconnect."""
    create_and_fill(fresh_clickhouse, ROWS)
    url, pid = fresh_clickhouse.url, fresh_clickhouse.pid
    fresh_clickhouse.kill()
    assert pid_gone(pid)
    fresh_clickhouse.restart()
    assert fresh_clickhouse.url == url and fresh_clickhouse.pid != pid
    assert read_rows(fresh_clickhouse) == ROWS


def test_two_servers_need_two_data_dirs(tmp_path: Path, fresh_clickhouse: LocalClickHouse) -> None:
    create_and_fill(fresh_clickhouse, ROWS[:1])
    with LocalClickHouse(tmp_path / "other") as other:
        create_and_fill(other, ROWS[1:])
        assert read_rows(other) == ROWS[1:]
        assert read_rows(fresh_clickhouse) == ROWS[:1]
    same = LocalClickHouse(fresh_clickhouse.data_dir, run_dir=tmp_path / "same-run", start_timeout=20)
    try:
        with pytest.raises(NotReadyError, match="Cannot lock file"):
            same.start(attempts=1)
    finally:
        same.stop()
    assert read_rows(fresh_clickhouse) == ROWS[:1]  # the owner is unaffected


def test_clickhouse_pause_and_resume(fresh_clickhouse: LocalClickHouse) -> None:
    fresh_clickhouse.pause()
    try:
        with pytest.raises(OSError):  # urllib timeout: the socket accepts but nothing answers
            ping(fresh_clickhouse.url, timeout=1.0)
    finally:
        fresh_clickhouse.resume()
    assert ping(fresh_clickhouse.url, timeout=5.0)


def test_clickhouse_stop_leaves_no_process(tmp_path: Path) -> None:
    server = LocalClickHouse(tmp_path / "data").start()
    pid, port = server.pid, server.http_port
    server.pause()
    server.stop()
    assert pid_gone(pid) and not server.running
    assert port_is_free(port)  # type: ignore[arg-type]


# --- session fixtures ---------------------------------------------------------------------------------


def test_session_fixtures_answer(kafka_bootstrap: str, clickhouse_url: str, unique_name: object) -> None:
    assert broker_answers(kafka_bootstrap, timeout=5.0)
    assert ping("http://" + clickhouse_url.split("://", 1)[1].split("@")[-1])  # ping needs no credentials
    names = {unique_name("my-topic") for _ in range(3)}  # type: ignore[operator]
    assert len(names) == 3 and all(n.startswith("my_topic_") for n in names)
