"""Live meters on the real stack (broker, two Faust workers, ClickHouse, HTTP server with the meter
controller), every answer compared with tests/oracle.py (docs/design.md, "Live meters").

- A meter created after its events were ingested answers every window exactly, with no manual step.
- A groupBy + aggregation change while events stream in: every answer during the rebuild is the old
  definition's, exact; after the switch every window is the new definition's, exact; both workers
  applied the same version and no row of another generation is left.
- config.yaml edited while the stack runs: a new meter is queryable without a restart; a broken edit
  keeps the old meters and is reported (/readyz, validate-config).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.adapters.clickhouse import connect
from meterline.localinfra.stack import LocalStack
from tests.oracle import EventFactory, OracleMeter, config_yaml, expected, first_sightings, response_windows

pytestmark = pytest.mark.e2e

COUNTER = OracleMeter("prompt_count", "prompt", "COUNT", None)
DAY1 = datetime(2024, 2, 1, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
END = DAY1 + timedelta(days=2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, clickhouse_url: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("live")
    config = root / "config.yaml"
    config.write_text(config_yaml([COUNTER]))
    with LocalStack(data_dir=root, config_file=config, processors=2, partitions=4, kafka_bootstrap=kafka_bootstrap,
                    clickhouse_url=clickhouse_url) as running:
        yield running


def send(stack: LocalStack, events: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for i in range(0, len(events), 200):
            resp = client.post("/api/v1/events", json=events[i : i + 200],
                               headers={"content-type": "application/cloudevents-batch+json"})
            assert resp.status_code == 204, resp.text


def wait_counted(stack: LocalStack, events: list[dict[str, Any]], timeout: float = 180.0) -> None:
    """Until the file meter prompt_count equals the oracle's count of `events` (all processed)."""
    want = sum(1 for e in first_sightings(events) if e["type"] == "prompt")
    deadline = time.monotonic() + timeout
    got: Any = None
    while time.monotonic() < deadline:
        stack.assert_running()
        r = httpx.get(f"{stack.url}/api/v1/meters/prompt_count/query",
                      params={"from": DAY1.isoformat(), "to": END.isoformat()}, timeout=10)
        got = sum(Decimal(str(x["value"])) for x in r.json()["data"]) if r.status_code == 200 else None
        if got == want:
            return
        time.sleep(0.3)
    pytest.fail(f"not all events processed: prompt_count={got}, want {want}; logs in {stack.data_dir}/logs")


def meter(stack: LocalStack, slug: str) -> dict[str, Any]:
    r = httpx.get(f"{stack.url}/api/v1/meters/{slug}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_ready(stack: LocalStack, slug: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.assert_running()
        r = httpx.get(f"{stack.url}/api/v1/meters/{slug}", timeout=10)
        if r.status_code == 200 and r.json()["annotations"]["meterline.state"] == "ready":
            return r.json()  # type: ignore[no-any-return]
        assert r.status_code in (200, 404), r.text  # 404 until a config.yaml edit is picked up
        time.sleep(0.3)
    pytest.fail(f"{slug} still building after {timeout}s; logs in {stack.data_dir}/logs")


def answer(stack: LocalStack, slug: str, group_by: tuple[str, ...], start: datetime, end: datetime) -> httpx.Response:
    return httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", timeout=30, params={
        "from": start.isoformat(), "to": end.isoformat(), "windowSize": "HOUR", "groupBy": list(group_by)})


def oracle(events: list[dict[str, Any]], m: OracleMeter, start: datetime, end: datetime) -> dict[Any, Decimal]:
    return expected(first_sightings(events), m, start=start, end=end, window="HOUR", group_by=m.group_fields,
                    by_subject=False)


def clickhouse_rows(stack: LocalStack, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    try:
        return [tuple(r) for r in client.query(sql, parameters=params).result_rows]
    finally:
        client.close()


@pytest.fixture(scope="module")
def history(stack: LocalStack) -> list[dict[str, Any]]:
    factory = EventFactory(seed=12, start=DAY1, span=timedelta(hours=8))
    events = [factory.event(invalid_rate=0.03) for _ in range(3000)]
    events += [dict(e) for e in events[:200]]  # resent duplicates
    send(stack, events)
    wait_counted(stack, events)
    return events


def test_meter_created_after_its_events_answers_exactly(stack: LocalStack, history: list[dict[str, Any]]) -> None:
    r = httpx.post(f"{stack.url}/api/v1/meters", timeout=10, json={
        "slug": "tokens", "eventType": "prompt", "aggregation": "SUM", "valueProperty": "$.tokens",
        "groupBy": {"model": "$.model"}})
    assert r.status_code == 201, r.text
    early = answer(stack, "tokens", ("model",), DAY1, DAY2)
    assert early.status_code in (200, 503)  # never a silently partial number
    if early.status_code == 503:
        assert early.headers["content-type"].startswith("application/problem+json")
    wait_ready(stack, "tokens")
    got = answer(stack, "tokens", ("model",), DAY1, DAY2)
    assert got.status_code == 200, got.text
    assert response_windows(got.json(), ("model",)) == oracle(
        history, OracleMeter("tokens", "prompt", "SUM", "tokens", ("model",)), DAY1, DAY2)


def test_redefinition_while_events_stream(stack: LocalStack, history: list[dict[str, Any]]) -> None:
    old = OracleMeter("tokens", "prompt", "SUM", "tokens", ("model",))
    new = OracleMeter("tokens", "prompt", "MAX", "tokens", ("type",))
    if meter(stack, "tokens")["aggregation"] != "SUM":
        pytest.skip("needs the meter the previous test created")
    wait_ready(stack, "tokens")
    old_answer = oracle(history, old, DAY1, DAY2)

    streamed: list[dict[str, Any]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:  # day-2 events arrive during the whole rebuild
        factory = EventFactory(seed=13, start=DAY2, span=timedelta(hours=8))
        try:
            while not stop.is_set():
                batch = [factory.event() for _ in range(100)]
                send(stack, batch)
                streamed.extend(batch)
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        time.sleep(0.5)
        r = httpx.put(f"{stack.url}/api/v1/meters/tokens", timeout=10,
                      json={"groupBy": {"type": "$.type"}, "aggregation": "MAX"})
        assert r.status_code == 200, r.text
        changed = r.json()["annotations"]
        assert changed["meterline.state"] == "building"
        old_answers = 0
        deadline = time.monotonic() + 180
        while meter(stack, "tokens")["annotations"]["meterline.state"] == "building":
            assert time.monotonic() < deadline, "the rebuild did not finish"
            got = answer(stack, "tokens", ("model",), DAY1, DAY2)
            if got.status_code == 400:  # switched between the two requests: groupBy model is gone
                break
            assert got.status_code == 200, got.text
            assert response_windows(got.json(), ("model",)) == old_answer  # the old definition, exactly
            old_answers += 1
        assert old_answers >= 1
    finally:
        stop.set()
        streamer.join(timeout=60)
    assert not errors, errors
    everything = history + streamed
    wait_counted(stack, everything)
    switched = wait_ready(stack, "tokens")
    generation = switched["annotations"]["meterline.activeGeneration"]
    assert generation == changed["meterline.generation"]
    got = answer(stack, "tokens", ("type",), DAY1, END)
    assert got.status_code == 200, got.text
    assert response_windows(got.json(), ("type",)) == oracle(everything, new, DAY1, END)

    # Both workers applied the same (latest) version; only the active generation's rows remain.
    version = switched["annotations"]["meterline.version"]
    deadline = time.monotonic() + 60
    while True:
        applied = clickhouse_rows(stack, "SELECT worker, applied['default/tokens'] FROM meter_workers FINAL"
                                         " WHERE seen_at >= now64(6) - INTERVAL 10 SECOND")
        generations = clickhouse_rows(stack, "SELECT DISTINCT generation FROM meter_windows WHERE meter = 'tokens'")
        if len(applied) == 2 and {v for _, v in applied} == {version} and generations == [(generation,)]:
            break
        assert time.monotonic() < deadline, (applied, generations, version, generation)
        time.sleep(0.5)


def test_config_edit_applies_without_restart(stack: LocalStack, history: list[dict[str, Any]]) -> None:
    storage = OracleMeter("storage_latest", "storage", "LATEST", "bytes", ("tier",))
    stack.config_file.write_text(config_yaml([COUNTER, storage]))
    wait_ready(stack, "storage_latest")
    got = answer(stack, "storage_latest", ("tier",), DAY1, DAY2)
    assert got.status_code == 200, got.text
    assert response_windows(got.json(), ("tier",)) == oracle(history, storage, DAY1, DAY2)

    stack.config_file.write_text(config_yaml([COUNTER, storage]).replace("LATEST", "NEWEST"))
    deadline = time.monotonic() + 60
    while (ready := httpx.get(f"{stack.url}/readyz", timeout=10).json()).get("config", {}).get("status") != "invalid":
        assert time.monotonic() < deadline, ready
        time.sleep(0.3)
    assert "NEWEST" in ready["config"]["detail"] and "aggregation" in ready["config"]["detail"]
    assert meter(stack, "storage_latest")["aggregation"] == "LATEST"  # the last good meters keep running
    assert answer(stack, "storage_latest", ("tier",), DAY1, DAY2).status_code == 200
    check = subprocess.run([sys.executable, "-m", "meterline.cli", "validate-config", str(stack.config_file)],
                           capture_output=True, text=True, env=stack.env(), timeout=60, check=False)
    assert check.returncode == 1 and "NEWEST" in check.stdout + check.stderr
    stack.config_file.write_text(config_yaml([COUNTER, storage]))
    deadline = time.monotonic() + 60
    while httpx.get(f"{stack.url}/readyz", timeout=10).json().get("config", {}).get("status") != "valid":
        assert time.monotonic() < deadline
        time.sleep(0.3)
