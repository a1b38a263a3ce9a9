"""The published OpenMeter Python SDK creates, updates, reads and deletes meters (live meters, issue 12).

A meter created through the SDK over stored events answers every window exactly once its history is
built (checked against tests/oracle.py); `name` and `groupBy` changes through `meters.update` show up in
`meters.get`; a delete makes `meters.get` fail with the SDK's 404 error.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from meterline.localinfra.stack import LocalStack
from tests.conformance.conftest import METERS, SdkCall
from tests.oracle import EventFactory, OracleMeter, expected, first_sightings, response_windows

ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
START = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def history(stack: LocalStack) -> list[dict[str, Any]]:
    """Events stored before the meter exists; waits until the file meter `prompt_count` counted them."""
    factory = EventFactory(seed=41, start=START, span=timedelta(hours=4))
    events = [factory.event() for _ in range(800)]
    resp = httpx.post(f"{stack.url}/api/v1/events", json=events, timeout=30,
                      headers={"content-type": "application/cloudevents-batch+json"})
    assert resp.status_code == 204, resp.text
    want = sum(1 for e in first_sightings(events) if e["type"] == "prompt")
    deadline = time.monotonic() + 120
    got = None
    while time.monotonic() < deadline:
        stack.assert_running()
        r = httpx.get(f"{stack.url}/api/v1/meters/prompt_count/query",
                      params={"from": START.isoformat(), "to": (START + timedelta(days=1)).isoformat()}, timeout=10)
        got = sum(Decimal(str(row["value"])) for row in r.json()["data"]) if r.status_code == 200 else None
        if got == want:
            return events
        time.sleep(0.3)
    pytest.fail(f"history not counted: {got} != {want}")


def test_python_sdk_meter_crud(stack: LocalStack, history: list[dict[str, Any]], sdk_call: SdkCall) -> None:
    assert "sdk_tokens" not in METERS
    create = {"model": "MeterCreate", "value": {
        "slug": "sdk_tokens", "name": "SDK tokens", "eventType": "prompt", "aggregation": "SUM",
        "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}, "metadata": {"owner": "sdk"}}}
    created, duplicate = sdk_call("python", [{"op": "meters.create", "args": [create]},
                                             {"op": "meters.create", "args": [create]}])
    meter = created["ok"]
    assert ULID.match(meter["id"]) and meter["slug"] == "sdk_tokens" and meter["name"] == "SDK tokens"
    assert meter["createdAt"] and meter["updatedAt"] and meter["metadata"] == {"owner": "sdk"}
    assert duplicate["error"]["status"] == 409

    deadline = time.monotonic() + 120
    while sdk_call("python", [{"op": "meters.get", "args": ["sdk_tokens"]}])[0]["ok"]["annotations"][
            "meterline.state"] != "ready":
        assert time.monotonic() < deadline, "the new meter's history was not built in time"
        time.sleep(0.5)
    oracle = OracleMeter("sdk_tokens", "prompt", "SUM", "tokens", ("model",))
    end = START + timedelta(days=1)
    r = httpx.get(f"{stack.url}/api/v1/meters/sdk_tokens/query",
                  params={"from": START.isoformat(), "to": end.isoformat(), "windowSize": "HOUR", "groupBy": "model"})
    assert r.status_code == 200, r.text
    assert response_windows(r.json(), ("model",)) == expected(
        first_sightings(history), oracle, start=START, end=end, window="HOUR", group_by=("model",), by_subject=False)

    update = {"model": "MeterUpdate", "value": {"name": "Tokens by type", "groupBy": {"type": "$.type"}}}
    updated, got, listed = sdk_call("python", [
        {"op": "meters.update", "args": ["sdk_tokens", update]},
        {"op": "meters.get", "args": [meter["id"]]},
        {"op": "meters.list"},
    ])
    assert updated["ok"]["name"] == "Tokens by type" and updated["ok"]["groupBy"] == {"type": "$.type"}
    assert got["ok"]["groupBy"] == {"type": "$.type"} and got["ok"]["id"] == meter["id"]
    assert "sdk_tokens" in [m["slug"] for m in listed["ok"]]

    deleted, gone, file_meter = sdk_call("python", [
        {"op": "meters.delete", "args": ["sdk_tokens"]},
        {"op": "meters.get", "args": ["sdk_tokens"]},
        {"op": "meters.delete", "args": ["prompt_count"]},
    ])
    assert "error" not in deleted, deleted
    assert gone["error"]["status"] == 404
    assert file_meter["error"]["status"] == 409  # config.yaml's meters change in config.yaml
