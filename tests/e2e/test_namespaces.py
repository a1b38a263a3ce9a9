"""Two tenants on one running stack, each with its own keys: every event, window, dead letter, subject
and dedupe key belongs to the namespace of the key that sent it.

Both tenants send the same (source, id) pairs, and tenant A resends them: each namespace counts each
pair exactly once. Every expectation is computed here from what each tenant sent.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.localinfra.stack import LocalStack
from tests.e2e.test_keys import create_key
from tests.oracle import OracleMeter, config_yaml

pytestmark = pytest.mark.e2e

METERS = [OracleMeter("calls", "call", "COUNT", None), OracleMeter("tokens", "call", "SUM", "n")]
BATCH = {"Content-Type": "application/cloudevents-batch+json"}
RANGE = "from=2024-03-01T00:00:00Z&to=2024-03-02T00:00:00Z"
EVENTS_FROM = "from=2024-03-01T00:00:00Z"  # the event list defaults to recent event times


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, clickhouse_url: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("tenants")
    config = root / "config.yaml"
    config.write_text(config_yaml(METERS))
    with LocalStack(
        data_dir=root, config_file=config, processors=1, partitions=2, kafka_bootstrap=kafka_bootstrap,
        clickhouse_url=clickhouse_url, extra_env={"METERLINE_AUTH_LOCAL_MODE": "false"},
    ) as running:
        yield running


def _events(tenant: str, n: int) -> list[dict[str, Any]]:
    """The same (source, id) pairs for every tenant; the data says whose event it is."""
    return [{"specversion": "1.0", "type": "call", "id": f"e{i}", "source": "shared", "subject": f"s{i % 2}",
             "time": f"2024-03-01T00:{i:02d}:00Z", "data": {"n": i + 1, "tenant": tenant}} for i in range(n)]


def _get(http: httpx.Client, key: str, path: str) -> Any:
    r = http.get(path, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, (path, r.text)
    return r.json()


def _wait(predicate: Any, stack: LocalStack, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        stack.assert_running()
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_namespaces_are_isolated_end_to_end(tenants: LocalStack) -> None:
    a, b = create_key(tenants, "acme", "ingest,read,admin"), create_key(tenants, "beta", "ingest,read")
    sent = {"acme": _events("acme", 10), "beta": _events("beta", 6)}
    only_a = {**sent["acme"][0], "id": "only-a", "subject": "secret-subject-a", "data": {"tenant": "acme"}}
    with httpx.Client(base_url=tenants.url, timeout=10) as http:
        def post(key: str, events: list[dict[str, Any]]) -> None:
            r = http.post("/api/v1/events", json=events, headers={**BATCH, "Authorization": f"Bearer {key}"})
            assert r.status_code == 204, r.text

        post(b, sent["beta"])  # B first: A's later copies of the same (source, id) must still count for A
        post(a, sent["acme"])
        post(a, sent["acme"])  # a retry inside A: duplicates, counted once
        post(a, [only_a])  # no `n`: a `tokens` dead letter, and a subject only A has

        expected = {ns: {"calls": len(evs), "tokens": sum(e["data"]["n"] for e in evs)} for ns, evs in sent.items()}
        expected["acme"]["calls"] += 1

        def totals(key: str) -> dict[str, Any]:
            out = {}
            for meter in ("calls", "tokens"):
                data = _get(http, key, f"/api/v1/meters/{meter}/query?{RANGE}")["data"]
                out[meter] = data[0]["value"] if data else 0
            return out

        _wait(lambda: totals(a) == expected["acme"] and totals(b) == expected["beta"], tenants,
              f"totals never matched {expected}")

        # Raw events: each tenant sees exactly its own, though ids and sources are the same.
        seen_b = _get(http, b, f"/api/v1/events?limit=100&{EVENTS_FROM}")
        assert sorted(e["event"]["id"] for e in seen_b) == sorted(e["id"] for e in sent["beta"])
        assert {e["event"]["data"]["tenant"] for e in seen_b} == {"beta"}
        assert _get(http, b, f"/api/v1/events?id=only-a&{EVENTS_FROM}") == []
        assert [e["event"]["id"] for e in _get(http, a, f"/api/v1/events?id=only-a&{EVENTS_FROM}")] == ["only-a"]

        # Dead letters: A's `tokens` rejection is A's alone.
        assert [d["event"]["id"] for d in _get(http, a, "/api/v1/dead-letters")] == ["only-a"]
        assert _get(http, b, "/api/v1/dead-letters") == []

        # Subjects: B never learns A's subject, through the meter or by grouping.
        assert "secret-subject-a" in _get(http, a, f"/api/v1/meters/calls/subjects?{RANGE}")
        assert "secret-subject-a" not in _get(http, b, f"/api/v1/meters/calls/subjects?{RANGE}")
        grouped = _get(http, b, f"/api/v1/meters/calls/query?{RANGE}&groupBy=subject")["data"]
        by_subject: dict[str, int] = {}
        for e in sent["beta"]:
            by_subject[e["subject"]] = by_subject.get(e["subject"], 0) + 1
        assert {d["subject"]: d["value"] for d in grouped} == by_subject
        filtered = _get(http, b, f"/api/v1/meters/calls/query?{RANGE}&subject=secret-subject-a")["data"]
        assert all(d["value"] == 0 for d in filtered)

        # B's ingest-only rights do not include admin: A's portal tokens stay A's.
        r = http.post("/api/v1/portal/tokens", json={"subject": "s0"}, headers={"Authorization": f"Bearer {a}"})
        assert r.status_code == 200
        assert http.get("/api/v1/portal/tokens", headers={"Authorization": f"Bearer {b}"}).status_code == 403


def test_openmeter_python_sdk_with_a_key(tenants: LocalStack) -> None:
    """The unmodified OpenMeter Python SDK (`Client(endpoint, token=key)`) ingests and queries in its namespace."""
    from tests.conformance import sdks

    driver = Path(sdks.__file__).parent / "drivers" / "openmeter_py.py"

    key = create_key(tenants, "sdk-tenant", "ingest,read")
    events = [{**e, "source": "sdk"} for e in _events("sdk-tenant", 4)]
    calls = [{"op": "events.ingest_events", "args": [[{"model": "Event", "value": e} for e in events]]}]
    python = sdks.python_sdk()

    def run(calls: list[dict[str, Any]], token: str | None = key) -> list[dict[str, Any]]:
        request = {"endpoint": tenants.url, "calls": calls, **({"token": token} if token else {})}
        done = subprocess.run([str(python), str(driver)], input=json.dumps(request),
                              capture_output=True, text=True, timeout=300, check=True)
        return list(json.loads(done.stdout))

    assert "error" not in run(calls)[0]
    assert run(calls, token=None)[0]["error"]["status"] == 401  # no key: refused, local mode is off
    query = [{"op": "meters.query_json", "args": ["calls"],
              "kwargs": {"from_parameter": "2024-03-01T00:00:00+00:00", "to": "2024-03-02T00:00:00+00:00"}}]

    def total() -> Any:
        answer = run(query)[0]
        rows = answer.get("ok", {}).get("data", [])
        return rows[0]["value"] if rows else 0

    _wait(lambda: total() == len(events), tenants, "the SDK's events were never counted in its namespace")
