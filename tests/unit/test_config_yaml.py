"""The shipped config.yaml loads and meters every example event of OpenMeter's examples page.

Expected values are computed here from the raw example strings, not through meterline.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterline.core.accumulator import WindowAccumulator
from meterline.core.meters import Aggregation, Measurement, MeterSet, load_meters
from meterline.core.times import parse_time

CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


@pytest.fixture(scope="module")
def meter_set() -> MeterSet:
    return MeterSet(load_meters(CONFIG))


def _ev(type_: str, data: dict[str, Any], subject: str = "customer-1") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "type": type_,
        "id": "00001",
        "time": "2024-01-01T00:00:00.001Z",
        "source": "test",
        "subject": subject,
        "data": data,
    }


def _by_slug(ms: list[Measurement]) -> dict[str, Measurement]:
    return {m.meter.slug: m for m in ms}


def test_config_has_every_aggregation_and_example_meter(meter_set: MeterSet) -> None:
    slugs = {m.slug for m in meter_set.meters}
    assert {
        "tokens_total",
        "gpu_execution_duration_seconds",
        "api_requests_total",
        "api_request_duration_seconds",
        "api_request_ingress_bytes",
        "pod_execution_time",
        "unique_sessions_total",
        "workflow_created",
        "workflow_succeeded",
        "workflow_failed",
        "pages_total",
        "words_total",
        "translate_tokens_total",
        "storage_bytes_latest",
        "job_seconds_avg",
        "job_seconds_max",
        "job_seconds_min",
        "active_users",
    } <= slugs
    assert {m.aggregation for m in meter_set.meters} == set(Aggregation)


def test_llm_tokens(meter_set: MeterSet) -> None:
    ms, rej = meter_set.measure(_ev("prompt", {"tokens": "123456", "model": "gpt4-turbo", "type": "output"}))
    assert rej == []
    (m,) = ms
    assert m.meter.slug == "tokens_total" and m.value == Decimal(123456)
    assert m.group == {"model": "gpt4-turbo", "type": "output"}


def test_gpu_time(meter_set: MeterSet) -> None:
    data = {
        "duration_seconds": "12345",
        "hostname": "my-hostname",
        "region": "us-east-1",
        "gpu_type": "nvidia_A100",
    }
    ms, rej = meter_set.measure(_ev("gpu_time", data))
    assert rej == [] and len(ms) == 1
    assert ms[0].value == Decimal(12345)
    assert ms[0].group == {"hostname": "my-hostname", "region": "us-east-1", "gpu_type": "nvidia_A100"}


def test_request_moves_three_meters(meter_set: MeterSet) -> None:
    data = {
        "method": "GET",
        "route": "/products/:product_id",
        "duration_seconds": "123",
        "ingress_bytes": "456",
        "egress_bytes": "789",
    }
    ms, rej = meter_set.measure(_ev("request", data))
    assert rej == []
    got = _by_slug(ms)
    assert set(got) == {"api_requests_total", "api_request_duration_seconds", "api_request_ingress_bytes"}
    assert got["api_requests_total"].value is None
    assert got["api_request_duration_seconds"].value == Decimal(123)
    assert got["api_request_ingress_bytes"].value == Decimal(456)
    for m in ms:
        assert m.group == {"method": "GET", "route": "/products/:product_id"}


def test_request_count_only_example(meter_set: MeterSet) -> None:
    # The plain "API Request Count" example has no duration/bytes: count it, dead-letter the rest.
    ms, rej = meter_set.measure(_ev("request", {"method": "GET", "route": "/products/:product_id"}))
    assert [m.meter.slug for m in ms] == ["api_requests_total"]
    assert {(r.meter, r.code) for r in rej} == {
        ("api_request_duration_seconds", "value_missing"),
        ("api_request_ingress_bytes", "value_missing"),
    }


def test_pod_execution_time(meter_set: MeterSet) -> None:
    data = {"duration_seconds": "123", "pod_name": "pod_name", "pod_namespace": "pod_namespace"}
    (m,), rej = meter_set.measure(_ev("kube-pod-exec-time", data))
    assert rej == [] and m.value == Decimal(123)
    assert m.group == {"pod_name": "pod_name", "pod_namespace": "pod_namespace"}


def test_unique_sessions(meter_set: MeterSet) -> None:
    # The docs' example event has type auth_check, which the login meter does not match.
    assert meter_set.measure(_ev("auth_check", {"session_id": "session_id"})) == ([], [])
    (m,), _ = meter_set.measure(_ev("login", {"session_id": "session_id"}))
    assert m.meter.slug == "unique_sessions_total" and m.value == "session_id"


def test_workflow_state_changes(meter_set: MeterSet) -> None:
    # The docs' create example sends `type`, not `task_type`: counted in the NULL group.
    (created,), _ = meter_set.measure(_ev("workflow_create", {"type": "image-generate"}, "task-1"))
    assert created.meter.slug == "workflow_created" and created.group == {} and created.group_key == "{}"
    (ok,), _ = meter_set.measure(_ev("workflow_success", {"task_type": "image-generate"}, "task-1"))
    assert ok.meter.slug == "workflow_succeeded" and ok.group == {"task_type": "image-generate"}


def test_translate(meter_set: MeterSet) -> None:
    data = {"model": "gpt-4", "pages": 23, "tokens": 10200, "words": 6912}
    ms, rej = meter_set.measure(_ev("translate", data, "customer-123"))
    assert rej == []
    got = _by_slug(ms)
    assert got["pages_total"].value == Decimal(23)
    assert got["words_total"].value == Decimal(6912)
    assert got["translate_tokens_total"].value == Decimal(10200)
    assert got["translate_tokens_total"].group == {"model": "gpt-4"}
    t = parse_time("2025-02-18T16:37:44Z")
    acc = WindowAccumulator()
    acc.add("customer-123", t, got["pages_total"], 0)
    assert [d.window_start for d in acc.deltas()] == [datetime(2025, 2, 18, 16, 37, tzinfo=UTC)]


def test_extra_aggregation_meters(meter_set: MeterSet) -> None:
    (m,), _ = meter_set.measure(_ev("storage", {"bytes": "1048576", "tier": "hot"}))
    assert m.meter.aggregation is Aggregation.LATEST and m.value == Decimal(1048576)
    ms, _ = meter_set.measure(_ev("job", {"duration_seconds": 1.25, "queue": "default"}))
    assert {m.meter.aggregation for m in ms} == {Aggregation.AVG, Aggregation.MAX, Aggregation.MIN}
    assert all(m.value == Decimal("1.25") for m in ms)
    (u,), _ = meter_set.measure(_ev("activity", {"user_id": 42}))
    assert u.value == "42"
