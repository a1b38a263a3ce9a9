"""Ingest's request -> publish logic on an in-memory publisher (tests/fakes.py).

The real broker path (idempotent librdkafka producer, 503 on a stalled broker) is covered by
tests/integration/test_ingest.py and tests/faults/test_outages.py. Expected messages are computed here
from the posted events: one Kafka message group per subject, keyed by it, every event exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from ingest.app import create_app
from meterline.core.errors import BrokerUnavailableError
from meterline.settings import Settings
from tests.fakes import FakePublisher

BATCH = {"Content-Type": "application/cloudevents-batch+json"}


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def http(publisher: FakePublisher, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(config_file=str(tmp_path / "absent.yaml"), kafka_bootstrap="unused:9092",
                        max_batch_events=5000)
    with TestClient(create_app(settings, producer=publisher)) as client:
        yield client


def ev(i: int, subject: str) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "s", "type": "t", "subject": subject,
            "time": "2024-01-01T00:00:00.000001Z", "data": {"v": i}}


def published(publisher: FakePublisher) -> list[tuple[str, list[dict[str, Any]]]]:
    return [(key.decode(), orjson.loads(value)) for key, value in publisher.messages]


@pytest.mark.parametrize("n", [1, 7, 1200])
def test_events_are_published_once_grouped_by_subject(http: TestClient, publisher: FakePublisher, n: int) -> None:
    rnd = random.Random(n)
    events = [ev(i, f"subject-{rnd.randrange(5)}") for i in range(n)]
    assert http.post("/api/v1/events", content=orjson.dumps(events), headers=BATCH).status_code == 204
    messages = published(publisher)
    assert publisher.calls == 1
    for key, batch in messages:
        assert {e["subject"] for e in batch} == {key}
    by_subject: dict[str, list[str]] = {}
    for e in events:
        by_subject.setdefault(e["subject"], []).append(e["id"])
    got: dict[str, list[str]] = {}
    for key, batch in messages:
        got.setdefault(key, []).extend(e["id"] for e in batch)
    assert got == by_subject  # every event once, in request order within its subject
    assert sorted(e["data"]["v"] for _, batch in messages for e in batch) == list(range(n))


def test_one_invalid_event_publishes_nothing(http: TestClient, publisher: FakePublisher) -> None:
    events = [ev(0, "a"), {**ev(1, "b"), "id": ""}, ev(2, "c")]
    response = http.post("/api/v1/events", content=orjson.dumps(events), headers=BATCH)
    assert response.status_code == 400
    assert [e["index"] for e in response.json()["errors"]] == [1]
    assert publisher.calls == 0 and publisher.messages == []


def test_unacknowledged_publish_is_a_503_to_retry(http: TestClient, publisher: FakePublisher) -> None:
    publisher.fail_with = BrokerUnavailableError("broker did not acknowledge 1 message(s) within 5s")
    response = http.post("/api/v1/events", content=orjson.dumps([ev(0, "a")]), headers=BATCH)
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["retry-after"]) > 0
    assert "did not acknowledge" in response.json()["detail"]


def test_lifecycle_and_readiness_follow_the_publisher(publisher: FakePublisher, tmp_path: Path) -> None:
    settings = Settings(config_file=str(tmp_path / "absent.yaml"), kafka_bootstrap="unused:9092")
    app = create_app(settings, producer=publisher)
    assert not publisher.started
    with TestClient(app) as client:
        assert publisher.started and not publisher.closed
        assert client.get("/readyz").status_code == 200
        publisher.ready = False
        assert client.get("/readyz").status_code == 503
    assert publisher.closed
