"""Ingest against the REAL broker: the app runs under uvicorn on a free port, and every accepted
request is checked by consuming the topic (the oracle is what we sent, normalised)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import orjson
import pytest
import uvicorn
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.app import create_app
from ingest.producer import EventProducer
from meterline.core.errors import BrokerUnavailableError
from meterline.core.events import decode_batch
from meterline.localinfra.broker import LocalBroker, broker_answers, ensure_topic
from meterline.localinfra.ports import free_port
from meterline.server import serve_options, served
from meterline.settings import Settings
from tests.infra import unique

PARTITIONS = 4
SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


class Server:
    """uvicorn in a thread, stopped in a finally (tests must not leak servers)."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # What `meterline serve ingest` runs: the app behind its front door (ingest/endpoint.py), uvicorn
        # with the same options.
        config = uvicorn.Config(served(create_app(settings)), host="127.0.0.1", port=self.port, log_level="warning",
                                **serve_options())
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("ingest app did not become healthy")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def app_settings(kafka_bootstrap: str) -> Settings:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        events_topic=unique("test-ingest"),
        topic_partitions=PARTITIONS,
        produce_timeout_seconds=3.0,
        max_body_bytes=256 * 1024,
        max_batch_events=1000,
    )
    ensure_topic(kafka_bootstrap, settings.events_topic, PARTITIONS)  # provisioned, as in production
    return settings


@pytest.fixture(scope="module")
def server(app_settings: Settings) -> Iterator[Server]:
    with Server(app_settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def consumer(kafka_bootstrap: str) -> Iterator[Consumer]:
    c = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        yield c
    finally:
        c.close()


def read_until(
    consumer: Consumer, topic: str, want_ids: set[str]
) -> list[tuple[bytes, list[dict[str, Any]]]]:
    """Consume the topic from the beginning until every id in `want_ids` was seen (or 20 s).

    Why not watermarks: tansu reports the high watermark of a multi-record batch wrongly, so "what
    arrived since offset X" is answered by ids instead (every test uses fresh uuid ids).
    """
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    out: list[tuple[bytes, list[dict[str, Any]]]] = []
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    try:
        while not want_ids <= seen and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            events = decode_batch(msg.value())
            out.append((msg.key(), events))
            seen.update(e["id"] for e in events)
    finally:
        consumer.unassign()
    return out


def mine(
    messages: list[tuple[bytes, list[dict[str, Any]]]], ids: set[str]
) -> list[tuple[bytes, list[dict[str, Any]]]]:
    """The messages holding any of `ids` (a message never mixes requests' subjects... but may, so filter)."""
    return [
        (k, [e for e in evs if e["id"] in ids]) for k, evs in messages if any(e["id"] in ids for e in evs)
    ]


def make_event(i: int, subject: str = "cust-1", **over: Any) -> dict[str, Any]:
    e = {
        "specversion": "1.0",
        "id": f"id-{uuid.uuid4().hex}-{i}",
        "source": "test",
        "type": "prompt",
        "subject": subject,
        "time": "2024-01-01T00:00:00.001Z",
        "data": {"tokens": i, "model": "m"},
    }
    e.update(over)
    return e


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"]
    return body


def normalised(e: dict[str, Any]) -> dict[str, Any]:
    out = dict(e)
    out["time"] = "2024-01-01T00:00:00.001000Z"
    return out


# ------------------------------------------------------------------------------------- accepted paths
@pytest.mark.parametrize(
    ("content_type", "batch"),
    [(SINGLE, False), (BATCH, True), ("application/json", False), ("application/json; charset=utf-8", True)],
)
def test_published_events_match_what_was_sent(
    client: httpx.Client, consumer: Consumer, app_settings: Settings, content_type: str, batch: bool
) -> None:
    topic = app_settings.events_topic
    sent = [make_event(i, subject=f"s{i % 3}") for i in range(7)] if batch else [make_event(0)]
    r = client.post(
        "/api/v1/events",
        content=orjson.dumps(sent if batch else sent[0]),
        headers={"content-type": content_type},
    )
    assert r.status_code == 204, r.text
    ids = {e["id"] for e in sent}
    got = mine(read_until(consumer, topic, ids), ids)
    for key, events in got:
        assert {e["subject"] for e in events} == {key.decode()}  # one subject per message, key = subject
    received = [e for _, events in got for e in events]
    assert sorted(received, key=lambda e: e["id"]) == sorted(map(normalised, sent), key=lambda e: e["id"])
    for subject in {e["subject"] for e in sent}:  # order kept within a subject
        assert [e["id"] for e in received if e["subject"] == subject] == [
            e["id"] for e in sent if e["subject"] == subject
        ]


def test_missing_time_is_filled_with_receive_time(
    client: httpx.Client, consumer: Consumer, app_settings: Settings
) -> None:
    e = make_event(1)
    del e["time"]
    assert (
        client.post("/api/v1/events", content=orjson.dumps(e), headers={"content-type": SINGLE}).status_code
        == 204
    )
    [(_, [got])] = mine(read_until(consumer, app_settings.events_topic, {e["id"]}), {e["id"]})
    assert got["time"].endswith("Z") and got["time"][:2] == "20"


# ------------------------------------------------------------------------------------- rejected paths
def test_invalid_batch_lists_every_problem_and_publishes_nothing(
    client: httpx.Client, consumer: Consumer, app_settings: Settings
) -> None:
    topic = app_settings.events_topic
    subject = f"sub-{uuid.uuid4().hex}"
    batch = [
        make_event(0, subject),
        make_event(1, id=""),
        make_event(2, subject),
        make_event(3, subject=None, time="nope"),
        5,
    ]
    body = assert_problem(
        client.post("/api/v1/events", content=orjson.dumps(batch), headers={"content-type": BATCH}), 400
    )
    assert {(e["index"], e["field"]) for e in body["errors"]} == {
        (1, "id"),
        (3, "subject"),
        (3, "time"),
        (4, "event"),
    }
    # Nothing published: a sentinel with the same subject (same partition, sent later) is found first.
    sentinel = make_event(9, subject)
    assert (
        client.post(
            "/api/v1/events", content=orjson.dumps(sentinel), headers={"content-type": SINGLE}
        ).status_code
        == 204
    )
    seen = {e["id"] for _, evs in read_until(consumer, topic, {sentinel["id"]}) for e in evs}
    assert sentinel["id"] in seen
    assert not seen & {batch[0]["id"], batch[2]["id"]}


@pytest.mark.parametrize("field", ["id", "source", "subject", "type"])
def test_control_characters_are_a_400_naming_the_field(client: httpx.Client, field: str) -> None:
    batch = [make_event(0), make_event(1, **{field: "a\u0000b"})]
    body = assert_problem(
        client.post("/api/v1/events", content=orjson.dumps(batch), headers={"content-type": BATCH}), 400
    )
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(1, field)]


def test_a_400_lists_a_bounded_number_of_problems_and_counts_the_rest(client: httpx.Client) -> None:
    """Each event carries an inexact number and a bad id; the answer lists the first problems only."""
    n = 900
    batch = [make_event(i, id=f"x\n{i}", data={"v": 0.12345678901234567890}) for i in range(n)]
    body_bytes = orjson.dumps(batch)
    # orjson writes the float shortest; put the inexact literal back the way a client would send it.
    body_bytes = body_bytes.replace(b'"v":0.12345678901234568', b'"v":0.12345678901234567890')
    r = client.post("/api/v1/events", content=body_bytes, headers={"content-type": BATCH})
    body = assert_problem(r, 400)
    want_problems = n  # the inexact numbers are refused first, one problem per number
    assert len(body["errors"]) == 100
    assert body["errorsNotListed"] == want_problems - 100
    assert len(r.content) < 64 * 1024
    few = assert_problem(client.post("/api/v1/events", content=orjson.dumps(batch[:3]),
                                     headers={"content-type": BATCH}), 400)
    assert len(few["errors"]) == 3 and "errorsNotListed" not in few


def test_numbers_beyond_exactness_are_refused_and_the_largest_exact_ones_kept(
    client: httpx.Client, consumer: Consumer, app_settings: Settings
) -> None:
    """orjson would round 2^64 to a float without a word; ingest refuses it instead, naming the field."""
    subject = f"sub-{uuid.uuid4().hex}"
    kept, refused = make_event(0, subject), make_event(1, subject)
    kept["data"] = {"tokens": 2**64 - 1, "ratio": 0.1}
    refused["data"] = {"usage": {"tokens": "PLACEHOLDER"}}
    body = orjson.dumps(kept)  # orjson writes ints of up to 64 bits exactly
    refused_body = orjson.dumps(refused).replace(b'"PLACEHOLDER"', str(2**64).encode())
    batch = b"[" + body + b"," + refused_body + b"]"
    problem = assert_problem(client.post("/api/v1/events", content=batch, headers={"content-type": BATCH}), 400)
    assert [(e["index"], e["field"]) for e in problem["errors"]] == [(1, "data.usage.tokens")]
    assert "18446744073709551616" in problem["errors"][0]["message"]
    # Alone, the exact event is accepted and reaches Kafka with its value intact.
    assert client.post("/api/v1/events", content=body, headers={"content-type": SINGLE}).status_code == 204
    got = [e for _, evs in mine(read_until(consumer, app_settings.events_topic, {kept["id"]}), {kept["id"]}) for e in evs]
    assert [e["data"] for e in got] == [{"tokens": 18446744073709551615, "ratio": 0.1}]
    assert refused["id"] not in {e["id"] for e in got}


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"{not json", SINGLE, 400),
        (b"", SINGLE, 400),
        (b"[]", SINGLE, 400),  # single-event type with an array
        (b"{}", BATCH, 400),  # batch type with an object
        (b"123", "application/json", 400),
        (b"{}", "text/plain", 415),
        (b"{}", "application/xml", 415),
        (b"{}", "application/json; charset=latin-1", 415),
        (b"\xff\xfe", "application/json", 400),
    ],
)
def test_unreadable_requests(client: httpx.Client, content: bytes, content_type: str, status: int) -> None:
    assert_problem(
        client.post("/api/v1/events", content=content, headers={"content-type": content_type}), status
    )


def test_missing_content_type_is_415(client: httpx.Client) -> None:
    assert_problem(client.post("/api/v1/events", content=b"{}", headers={"content-type": ""}), 415)


def test_body_too_large(client: httpx.Client, app_settings: Settings) -> None:
    big = orjson.dumps([make_event(i, data={"pad": "x" * 1000}) for i in range(400)])
    assert len(big) > app_settings.max_body_bytes
    assert_problem(client.post("/api/v1/events", content=big, headers={"content-type": BATCH}), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the streamed size must be enforced
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    assert_problem(client.post("/api/v1/events", content=chunked(), headers={"content-type": BATCH}), 413)


def test_too_many_events_is_413(client: httpx.Client, app_settings: Settings) -> None:
    batch = [{"x": 1}] * (app_settings.max_batch_events + 1)
    assert_problem(
        client.post("/api/v1/events", content=orjson.dumps(batch), headers={"content-type": BATCH}), 413
    )


def test_wrong_method_and_path_are_problems(client: httpx.Client) -> None:
    assert_problem(client.get("/api/v1/events"), 405)
    assert_problem(client.get("/nope"), 404)


def test_health_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"broker": "ok"}
    metrics = client.get("/metrics").text
    assert "meterline_ingest_events_accepted_total" in metrics
    assert "meterline_ingest_publish_seconds_bucket" in metrics


# ------------------------------------------------------------------------------------- random input
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.sampled_from(["1.0", "0.3", ""]) | json_values,
        "id": st.text(max_size=5) | json_values,
        "source": st.just("s") | json_values,
        "type": st.just("t") | json_values,
        "subject": st.sampled_from(["a", "b"]) | json_values,
        "time": st.sampled_from(["2024-01-01T00:00:00Z", "bad", "2024-01-01T00:00:00+05:30"]) | json_values,
        "data": json_values,
    },
)
bodies = st.one_of(
    json_values.map(orjson.dumps),
    event_like.map(orjson.dumps),
    st.lists(event_like, max_size=5).map(orjson.dumps),
    st.binary(max_size=50),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=bodies,
    content_type=st.sampled_from([SINGLE, BATCH, "application/json", "text/plain", "application/x"]),
)
def test_random_bodies_never_5xx(client: httpx.Client, body: bytes, content_type: str) -> None:
    r = client.post("/api/v1/events", content=body, headers={"content-type": content_type})
    assert r.status_code in {204, 400, 413, 415}, r.text
    if r.status_code != 204:
        assert r.headers["content-type"].startswith("application/problem+json")


def test_schemathesis_no_server_errors(server: Server) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/api/v1/events" and op.method.upper() == "POST" for op in operations)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call()
            assert response.status_code < 500, (case.path, case.media_type, response.text)
            case.validate_response(response, checks=[not_a_server_error])

        check()


def kafka_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partition for a keyed record (Java's Utils.murmur2, toPositive, mod), written out here as
    the oracle for the producer's `murmur2_random` partitioner."""
    m, h = 0x5BD1E995, (0x9747B28C ^ len(key)) & 0xFFFFFFFF
    whole = len(key) - len(key) % 4
    for i in range(0, whole, 4):
        k = (int.from_bytes(key[i:i + 4], "little") * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = key[whole:]
    if tail:
        h ^= int.from_bytes(tail, "little")
        h = (h * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def test_a_request_of_many_subjects_puts_each_on_its_keys_partition(
    client: httpx.Client, consumer: Consumer, app_settings: Settings
) -> None:
    """Each of a request's messages lands on the partition Kafka's partitioner gives its key (the subject), where
    any other client producing that subject puts it (ingest/producer.py: `murmur2_random`)."""
    topic = app_settings.events_topic
    sent = [make_event(i, subject=f"subject-{i}-{uuid.uuid4().hex[:6]}") for i in range(40)]
    r = client.post("/api/v1/events", content=orjson.dumps(sent), headers={"content-type": BATCH})
    assert r.status_code == 204, r.text
    want = {e["id"]: e["subject"] for e in sent}
    found: dict[str, tuple[int, bytes]] = {}
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    try:
        deadline = time.monotonic() + 20
        while not want.keys() <= found.keys() and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            for e in decode_batch(msg.value()):
                if e["id"] in want:
                    found[e["id"]] = (msg.partition(), msg.key())
    finally:
        consumer.unassign()
    assert found.keys() == want.keys()
    for event_id, subject in want.items():
        assert found[event_id] == (kafka_partition(subject.encode(), PARTITIONS), subject.encode())
    assert len({p for p, _ in found.values()}) > 1  # the request spread over partitions


# -------------------------------------------------------------------------------------- the producer
async def test_close_settles_every_publish_in_flight(app_settings: Settings, consumer: Consumer) -> None:
    """Shutdown flushes from a worker thread (as the lifespan does): every request still waiting for
    its ack settles, through the loop, and what they published is in the log."""
    settings = app_settings.model_copy(update={"events_topic": unique("test-close")})
    producer = EventProducer(settings)
    await asyncio.to_thread(producer.start)
    closed = False
    try:
        warm = make_event(-1)
        await producer.publish([(b"cust-1", orjson.dumps([warm]))])  # the loop's poll timer is running
        sent = [make_event(i, subject=f"cust-{i % 7}") for i in range(300)]
        tasks = [asyncio.create_task(producer.publish([(e["subject"].encode(), orjson.dumps([e]))])) for e in sent]
        await asyncio.sleep(0)  # each task produced and now awaits its ack
        await asyncio.to_thread(producer.close)
        closed = True
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        assert results == [None] * len(sent)
    finally:
        if not closed:
            producer.close()
    ids = {e["id"] for e in sent}
    got = [e["id"] for _, evs in mine(read_until(consumer, settings.events_topic, ids), ids) for e in evs]
    assert sorted(got) == sorted(ids)  # each exactly once


# ------------------------------------------------------------------------------------- broker faults
def test_broker_paused_gives_bounded_503_then_recovers(
    client: httpx.Client, broker: Any, app_settings: Settings
) -> None:
    if broker is None:
        pytest.skip("needs the locally launched broker (broker fixture) to pause it")
    broker.pause()  # returns once /proc shows every tansu thread stopped
    try:
        # Observable proof that nothing answers at the producer's bootstrap: if another process served
        # this port (a restarted or second broker), the 503 below would be a 204 for that reason.
        with pytest.raises(KafkaException):
            broker_answers(app_settings.kafka_bootstrap, timeout=1.0)
        started = time.monotonic()
        r = client.post(
            "/api/v1/events", content=orjson.dumps(make_event(0)), headers={"content-type": SINGLE}
        )
        elapsed = time.monotonic() - started
        body = assert_problem(r, 503)
        assert r.headers.get("retry-after")
        assert elapsed < app_settings.produce_timeout_seconds + 3, elapsed
        assert body["detail"]
        assert client.get("/readyz").status_code == 503
    finally:
        broker.resume()
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        status = client.post(
            "/api/v1/events", content=orjson.dumps(make_event(1)), headers={"content-type": SINGLE}
        ).status_code
        if status == 204:
            break
        time.sleep(0.5)
    assert status == 204


async def test_a_broker_recreated_at_the_same_address_gets_a_new_producer(app_settings: Settings,
                                                                          tmp_path: Path) -> None:
    """librdkafka's idempotent producer times out every message for ever once the broker at its address
    is another cluster (a re-created memory broker); ingest must replace it, so after at most a few 503s
    publishing works again, on the new broker."""
    broker = LocalBroker(tmp_path).start()
    try:
        settings = app_settings.model_copy(update={"kafka_bootstrap": broker.bootstrap,
                                                   "produce_timeout_seconds": 2.0})
        ensure_topic(broker.bootstrap, settings.events_topic, PARTITIONS)
        producer = EventProducer(settings)
        await asyncio.to_thread(producer.start)
        try:
            await producer.publish([(b"cust-1", orjson.dumps([make_event(0)]))])
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.restart)  # same port, new cluster id, empty
            ensure_topic(broker.bootstrap, settings.events_topic, PARTITIONS)
            refused = 0
            deadline = time.monotonic() + 30
            while True:
                try:
                    await producer.publish([(b"cust-1", orjson.dumps([make_event(1)]))])
                    break
                except BrokerUnavailableError:
                    refused += 1
                    assert time.monotonic() < deadline, f"still refused after {refused} tries"
                    await asyncio.sleep(0.2)
        finally:
            await asyncio.to_thread(producer.close)
        consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "reader"})
        try:
            ends = [consumer.get_watermark_offsets(TopicPartition(settings.events_topic, p), timeout=10)[1]
                    for p in range(PARTITIONS)]
        finally:
            consumer.close()
        assert sum(ends) >= 1  # the new broker has the event published after its restart
    finally:
        broker.stop()


def test_while_the_drain_file_exists_ingest_answers_503_and_publishes_nothing(
    app_settings: Settings, consumer: Consumer, tmp_path: Any
) -> None:
    """`meterline run` creates the drain file before it waits for the processors (supervisor.drain)."""
    drain_file = tmp_path / "draining"
    settings = app_settings.model_copy(update={"drain_file": str(drain_file)})
    subject = f"sub-{uuid.uuid4().hex}"
    refused, sentinel = make_event(0, subject), make_event(1, subject)
    with Server(settings) as running, httpx.Client(base_url=running.base_url, timeout=30) as c:
        drain_file.touch()
        r = c.post("/api/v1/events", content=orjson.dumps(refused), headers={"content-type": SINGLE})
        body = assert_problem(r, 503)
        assert "stopping" in body["detail"] and r.headers["retry-after"]
        metrics = c.get("/metrics").text
        assert "meterline_ingest_publishes_in_flight 0.0" in metrics
        drain_file.unlink()
        assert c.post("/api/v1/events", content=orjson.dumps(sentinel),
                      headers={"content-type": SINGLE}).status_code == 204
    seen = {e["id"] for _, evs in read_until(consumer, app_settings.events_topic, {sentinel["id"]}) for e in evs}
    assert sentinel["id"] in seen and refused["id"] not in seen


def test_messages_stay_under_the_broker_record_limit_and_an_event_that_cannot_fit_is_413(
    app_settings: Settings, consumer: Consumer
) -> None:
    limit = 16 * 1024
    settings = app_settings.model_copy(update={"max_message_bytes": limit})
    subject = f"sub-{uuid.uuid4().hex}"
    many = [make_event(i, subject, data={"tokens": i, "note": "x" * 150}) for i in range(300)]
    big = make_event(999, subject, data={"note": "y" * limit})
    small = make_event(1000, subject)
    sentinel = make_event(1001, subject)
    with Server(settings) as running, httpx.Client(base_url=running.base_url, timeout=30) as c:
        assert c.post("/api/v1/events", content=orjson.dumps(many), headers={"content-type": BATCH}).status_code == 204
        body = assert_problem(c.post("/api/v1/events", content=orjson.dumps([small, big]),
                                     headers={"content-type": BATCH}), 413)
        assert "max_message_bytes" in body["detail"]
        assert c.post("/api/v1/events", content=orjson.dumps(sentinel), headers={"content-type": SINGLE}).status_code == 204
    ids = {e["id"] for e in many} | {sentinel["id"]}
    got = read_until(consumer, app_settings.events_topic, ids)
    mine_ = mine(got, ids | {small["id"], big["id"]})
    assert sorted(e["id"] for _, evs in mine_ for e in evs) == sorted(ids)  # nothing of the 413 request
    records = [(key, orjson.dumps(events)) for key, events in got if key == subject.encode()]
    assert len(records) > 2  # the 300 events were cut into several messages...
    assert all(len(key) + len(value) + 512 <= limit for key, value in records)  # ...each under the limit


def test_ingest_creates_the_topic_only_when_told_to(app_settings: Settings, kafka_bootstrap: str) -> None:
    """In production the processor (or the operator) creates the topic with its replication, retention
    and min.insync.replicas; an ingest process must not create it with whatever a client would default to."""
    from confluent_kafka.admin import AdminClient

    def exists(topic: str) -> bool:
        return topic in AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics

    for creates in (False, True):
        settings = app_settings.model_copy(update={"events_topic": unique("not-provisioned"),
                                                   "ingest_creates_topic": creates,
                                                   "topic_replication_factor": 1, "topic_min_insync_replicas": 1})
        with Server(settings):
            assert exists(settings.events_topic) is creates
