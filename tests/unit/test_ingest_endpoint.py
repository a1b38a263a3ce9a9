"""`ingest.endpoint.IngestEndpoint` answers exactly as the FastAPI route it replaces on the hot path.

The oracle is the FastAPI route itself (`ingest.routes.router`, still declared for OpenAPI): the same app
is built twice, once serving POST /api/v1/events through the router only and once through the endpoint,
and every request (accepted, refused for each reason, broker failing) must get the same status, headers
and body from both, publish the same messages, and leave the same `scope["route"]` for the latency
histogram (query/latency.py labels ingest requests by it). The endpoint also takes `ingest.fastpath` and the
route does not, so the same comparison holds the fast path to the validator and the wire encoder; the
cases after the first block sit on the edges the fast path decides by itself.

A third copy of the app is served as a server serves it (`meterline.server.served`: behind
`IngestFrontDoor`, which hands these requests to the app's middleware chain itself) and must answer the same.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from ingest.app import ingest_lifespan, install_ingest
from ingest.endpoint import IngestFrontDoor
from ingest.routes import router
from meterline.adapters.auth import install_auth
from meterline.adapters.problems import install_problem_handlers
from meterline.core.errors import BrokerUnavailableError
from meterline.core.times import format_time
from meterline.server import served
from meterline.settings import Settings
from tests.fakes import FakePublisher

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


class RouteSeen:
    """Records the path of `scope["route"]` once the inner app answered (what query/latency.py reads), and
    whether FastAPI's router dispatched the request (it sets `scope["endpoint"]`)."""

    def __init__(self, app: ASGIApp, seen: list[tuple[str | None, bool]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http":
            self.seen.append((getattr(scope.get("route"), "path", None), "endpoint" in scope))


def build(settings: Settings, publisher: FakePublisher, *, endpoint: bool) -> tuple[FastAPI, list[tuple[str | None, bool]]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with auth.running(), ingest_lifespan(app, settings, publisher):
            yield

    app = FastAPI(lifespan=lifespan, telemetry={"tracing": False, "metrics": False, "logs": False})  # as ours
    install_problem_handlers(app)
    if endpoint:
        install_ingest(app)
    else:
        app.include_router(router)
    seen: list[tuple[str | None, bool]] = []
    app.add_middleware(RouteSeen, seen=seen)
    auth = install_auth(app, settings)
    return app, seen


def event(i: int, **changes: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e{i}", "source": "s", "type": "t", "subject": f"sub-{i % 3}",
            "time": "2024-01-01T00:00:00.000001Z", "data": {"v": i}, **changes}


CASES: list[tuple[str, dict[str, str], bytes]] = [
    ("single", {"content-type": SINGLE}, orjson.dumps(event(1))),
    ("single, charset", {"content-type": f"{SINGLE}; charset=utf-8"}, orjson.dumps(event(2))),
    ("batch", {"content-type": BATCH}, orjson.dumps([event(i) for i in range(7)])),
    ("plain object", {"content-type": "application/json"}, orjson.dumps(event(3))),
    ("no time", {"content-type": SINGLE}, orjson.dumps({k: v for k, v in event(4, id="no-time").items() if k != "time"})),
    ("empty batch", {"content-type": BATCH}, b"[]"),
    ("no content type", {}, orjson.dumps(event(5))),
    ("wrong content type", {"content-type": "text/plain"}, orjson.dumps(event(6))),
    ("wrong charset", {"content-type": f"{SINGLE}; charset=latin-1"}, orjson.dumps(event(7))),
    ("not json", {"content-type": SINGLE}, b"{nope"),
    ("empty body", {"content-type": SINGLE}, b""),
    ("array as single", {"content-type": SINGLE}, orjson.dumps([event(8)])),
    ("invalid event", {"content-type": BATCH}, orjson.dumps([event(9), event(10, id="")])),
    ("inexact number", {"content-type": SINGLE}, orjson.dumps(event(11))[:-2] + b',"n":18446744073709551616}}'),
    ("too many events", {"content-type": BATCH}, orjson.dumps([event(i) for i in range(6)])),
    ("body too large", {"content-type": BATCH}, orjson.dumps([event(i, data={"pad": "x" * 3000}) for i in range(9)])),
    ("bad content-length", {"content-type": SINGLE, "content-length": "12x"}, orjson.dumps(event(12))),
    # Edges `ingest.fastpath` decides by itself (the endpoint takes it, the route does not).
    ("batch, one subject cut in two messages", {"content-type": BATCH},
     orjson.dumps([event(i, subject="big", data={"pad": "x" * 2200}) for i in range(6)])),
    ("raw C1 control in an id", {"content-type": SINGLE}, orjson.dumps(event(13, id="a\x85b"))),
    ("escaped C1 control in a subject", {"content-type": SINGLE}, json.dumps(event(14, subject="a\x85b")).encode()),
    ("escaped newline in a type", {"content-type": BATCH}, json.dumps([event(15), event(16, type="a\nb")]).encode()),
    ("DEL in a source", {"content-type": SINGLE}, orjson.dumps(event(17, source="a\x7fb"))),
    ("escapes in data only", {"content-type": BATCH},
     json.dumps([event(18, data={"q": 'say "hi"\n', "u": "é"}), event(19)]).encode()),
    ("times: offset, no fraction, short fraction", {"content-type": BATCH},
     orjson.dumps([event(20, time="2024-01-01T05:30:00.5+05:30"), event(21, time="2024-01-01T00:00:00Z"),
                   event(22, time="2024-01-01T00:00:00.12Z")])),
    ("second 60 of a known minute", {"content-type": BATCH},
     orjson.dumps([event(23, time="2024-01-01T00:00:59.000000Z"), event(24, time="2024-01-01T00:00:60.000000Z")])),
    ("data null, datacontenttype, extension", {"content-type": BATCH},
     orjson.dumps([event(25, data=None), event(26, datacontenttype="application/json"), event(27, region="eu")])),
    ("inexact number in a batch", {"content-type": BATCH},
     b"[" + orjson.dumps(event(28)) + b"," + orjson.dumps(event(29))[:-2] + b',"n":0.1000000000000000055511}}]'),
    ("several without time", {"content-type": BATCH},
     orjson.dumps([{k: v for k, v in event(i, id="no-time").items() if k != "time"} for i in range(3)])),
]


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[dict[str, tuple[TestClient, FakePublisher, list[tuple[str | None, bool]]]]]:
    """The same app twice: POST /api/v1/events through the FastAPI route, and through the endpoint."""
    settings = Settings(config_file=str(tmp_path / "absent.yaml"), kafka_bootstrap="unused:9092",
                        auth_local_mode=True, max_batch_events=8, max_body_bytes=20_000, max_message_bytes=16_384)
    pub_route, pub_fast, pub_door = FakePublisher(), FakePublisher(), FakePublisher()
    app_route, seen_route = build(settings, pub_route, endpoint=False)
    app_fast, seen_fast = build(settings, pub_fast, endpoint=True)
    app_door, seen_door = build(settings, pub_door, endpoint=True)
    door = served(app_door)
    assert isinstance(door, IngestFrontDoor)
    with TestClient(app_route) as via_route, TestClient(app_fast) as via_endpoint, TestClient(door) as via_door:
        yield {"route": (via_route, pub_route, seen_route), "endpoint": (via_endpoint, pub_fast, seen_fast),
               "door": (via_door, pub_door, seen_door)}


def published(publisher: FakePublisher, before: str, after: str) -> list[tuple[bytes, list[dict[str, Any]]]]:
    """The published messages, with a receive time (an event sent without `time`) checked to lie within
    the request and then blanked: the two apps receive the request a moment apart."""
    out = []
    for key, value in publisher.messages:
        events = orjson.loads(value)
        for e in events:
            if e["id"] == "no-time":
                assert before <= e["time"] <= after
                e["time"] = "received"
        out.append((key, events))
    return out


def answer(client: TestClient, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    response = client.post("/api/v1/events", content=body, headers=headers)
    kept = {k: v for k, v in response.headers.items() if k not in ("date", "server")}
    return response.status_code, kept, response.content


def same_answer(clients: dict[str, Any], headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request to the route, the endpoint and the front door: the same answer and the same published
    messages."""
    via_route, pub_route, _ = clients["route"]
    before = format_time(datetime.now(UTC))
    expected = answer(via_route, headers, body)
    got = {name: answer(clients[name][0], headers, body) for name in ("endpoint", "door")}
    after = format_time(datetime.now(UTC))
    assert got == {"endpoint": expected, "door": expected}
    for name in ("endpoint", "door"):
        assert published(clients[name][1], before, after) == published(pub_route, before, after)
    return expected


@pytest.mark.parametrize(("name", "headers", "body"), CASES, ids=[c[0] for c in CASES])
def test_the_endpoint_answers_as_the_route(clients: dict[str, Any], name: str, headers: dict[str, str],
                                           body: bytes) -> None:
    seen_route, seen_fast, seen_door = clients["route"][2], clients["endpoint"][2], clients["door"][2]
    expected = same_answer(clients, headers, body)
    assert seen_route == [("/api/v1/events", True)]
    assert seen_fast == [("/api/v1/events", False)]  # the same route for the histogram, not via the router
    assert seen_door == [("/api/v1/events", False)]
    assert clients["door"][0].app._chain is not None  # served through the chain, not the app's entry
    for seen in (seen_route, seen_fast, seen_door):
        seen.clear()
    if expected[0] >= 400:
        assert expected[1]["content-type"] == "application/problem+json"


def test_a_broker_failure_is_the_same_503(clients: dict[str, Any]) -> None:
    for _, publisher, _ in clients.values():
        publisher.fail_with = BrokerUnavailableError("broker did not acknowledge 1 message(s) within 5s")
    answers = [answer(client, {"content-type": SINGLE}, orjson.dumps(event(1))) for client, _, _ in clients.values()]
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 503 and answers[0][1]["retry-after"]


def test_an_unexpected_error_is_the_same_500_and_still_raised_to_the_server(
    clients: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Starlette's ServerErrorMiddleware does for the app (the 500 handler's problem, then the error
    raised on for the server to log), the front door does too."""
    answers = []
    for client, publisher, _ in clients.values():
        async def broken(messages: Any) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(publisher, "publish", broken)
        with pytest.raises(RuntimeError, match="bug"):
            answer(client, {"content-type": SINGLE}, orjson.dumps(event(1)))
        quiet = TestClient(client.app, raise_server_exceptions=False)
        answers.append(answer(quiet, {"content-type": SINGLE}, orjson.dumps(event(1))))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 500 and answers[0][1]["content-type"] == "application/problem+json"


def test_other_paths_and_methods_reach_the_router(clients: dict[str, Any]) -> None:
    for path, method in (("/api/v1/events", "GET"), ("/api/v1/events/", "POST"), ("/api/v1/other", "POST")):
        answers = [client.request(method, path, content=b"{}", headers={"content-type": SINGLE},
                                  follow_redirects=False).status_code for client, _, _ in clients.values()]
        assert answers[0] == answers[1] == answers[2] != 204


def test_the_endpoint_takes_the_fast_path_and_the_route_does_not(clients: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard for the comparison above: it compares `ingest.fastpath` with the validator only if the
    endpoint really publishes through the one and the route through the other."""
    import ingest.routes

    answered: list[bool] = []
    real = ingest.routes.fast_messages

    def spy(*args: Any, **kwargs: Any) -> Any:
        messages = real(*args, **kwargs)
        answered.append(messages is not None)
        return messages

    monkeypatch.setattr(ingest.routes, "fast_messages", spy)
    body = orjson.dumps([event(i) for i in range(7)])
    assert answer(clients["route"][0], {"content-type": BATCH}, body)[0] == 204
    assert answered == []
    assert answer(clients["endpoint"][0], {"content-type": BATCH}, body)[0] == 204
    assert answered == [True]


@pytest.mark.parametrize(("name", "headers", "body"), [c for c in CASES if c[2].startswith(b"[")],
                         ids=[c[0] for c in CASES if c[2].startswith(b"[")])
def test_a_big_batch_answers_the_same_on_the_loop_and_in_a_thread(
    clients: dict[str, Any], monkeypatch: pytest.MonkeyPatch, name: str, headers: dict[str, str], body: bytes
) -> None:
    """Batches over OFFLOAD_THRESHOLD: the route validates them in a worker thread, the endpoint tries the
    fast path on the loop first (up to FAST_OFFLOAD_THRESHOLD) and hands the rest to the thread."""
    import ingest.routes

    monkeypatch.setattr(ingest.routes, "OFFLOAD_THRESHOLD", 1)
    # "several without time" (3 events) goes past both thresholds: the fast path is tried in the thread.
    monkeypatch.setattr(ingest.routes, "FAST_OFFLOAD_THRESHOLD", 2 if "several" in name else 8)
    same_answer(clients, headers, body)


@pytest.mark.parametrize("which", ["ingest", "all"])
def test_the_served_apps_take_the_front_door(which: str, tmp_path: Path) -> None:
    """`meterline serve ingest|all` serve ingest requests through the chain, not the FastAPI entry (the
    door falls back to the app, unseen, when an app is not the shape it was written for)."""
    from ingest.app import create_app
    from meterline.server import build_app

    settings = Settings(config_file=str(tmp_path / "absent.yaml"), kafka_bootstrap="unused:9092",
                        clickhouse_url="http://unused:8123", auth_local_mode=True)
    door = served(create_app(settings) if which == "ingest" else build_app("all", settings))
    assert isinstance(door, IngestFrontDoor)
    assert door._find_chain() is not None
