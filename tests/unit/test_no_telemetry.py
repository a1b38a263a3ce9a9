"""Every app builder turns off FastAPI's native OpenTelemetry: nothing in meterline uses it, and while it is
on FastAPI looks up the global tracer, meter and logger providers on every request (~2-3% of a single-event
ingest request, bench P1 in README).

The oracle is the count of those look-ups, made by wrapping the three getters FastAPI calls: a default
`FastAPI()` makes them on a request (so the wrapping sees what it should), meterline's apps make none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.telemetry import _asgi
from fastapi.testclient import TestClient

from ingest.app import create_app as create_ingest
from meterline.server import build_app
from meterline.settings import Settings


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    for module, name in ((_asgi.trace, "get_tracer_provider"), (_asgi.metrics, "get_meter_provider"),
                         (_asgi._logs, "get_logger_provider")):
        original = getattr(module, name)

        def counted(*args: object, _name: str = name, _original: Callable[..., object] = original) -> object:
            seen.append(_name)
            return _original(*args)

        monkeypatch.setattr(module, name, counted)
    return seen


def request(app: FastAPI) -> None:
    """One request without the lifespan (no broker, no ClickHouse): whatever it answers, it went through
    `FastAPI.__call__`, where the providers are looked up."""
    TestClient(app, raise_server_exceptions=False).get("/no-such-path")


def test_a_default_app_looks_the_providers_up(lookups: list[str]) -> None:
    request(FastAPI())
    assert set(lookups) == {"get_tracer_provider", "get_meter_provider", "get_logger_provider"}


@pytest.mark.parametrize("which", ["ingest-only", "ingest", "query", "all"])
def test_meterline_apps_do_not(which: str, lookups: list[str], tmp_path: Path) -> None:
    settings = Settings(config_file=str(tmp_path / "absent.yaml"), kafka_bootstrap="unused:9092",
                        clickhouse_url="http://unused:8123")
    app = create_ingest(settings) if which == "ingest-only" else build_app(which, settings)
    request(app)
    assert lookups == []
