"""`meterline validate-config` must name file, meter and field for every problem, and accept the shipped file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from meterline.cli import app
from meterline.server import forwarded_allow_ips, serve_options, served

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_shipped_config_is_valid() -> None:
    result = runner.invoke(app, ["validate-config", str(ROOT / "config.yaml")])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_every_problem_is_listed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
meters:
  - slug: Bad Slug
    eventType: x
    aggregation: SUM
    valueProperty: $.v
  - slug: counts
    eventType: x
    aggregation: COUNT
    valueProperty: $.v
  - slug: counts
    eventType: y
    aggregation: MEDIAN
    valueProperty: "$[["
"""
    )
    result = runner.invoke(app, ["validate-config", str(bad)])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert f"{bad}: meters[0]" in out and "slug" in out
    assert "meters[1] (counts).valueProperty" in out
    assert "meters[2] (counts).aggregation" in out


def test_missing_file_is_reported(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate-config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert "not found" in result.output


def test_serve_bounds_concurrency(monkeypatch: Any, tmp_path: Path) -> None:
    """uvicorn answers 503 beyond `http_limit_concurrency` instead of queueing without bound."""
    import uvicorn

    captured: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: captured.update(options))
    monkeypatch.setenv("METERLINE_CONFIG", str(tmp_path / "absent.yaml"))
    monkeypatch.setenv("METERLINE_HTTP_LIMIT_CONCURRENCY", "7")
    result = runner.invoke(app, ["serve", "query"])
    assert result.exit_code == 0, result.output
    assert captured["limit_concurrency"] == 7


@pytest.mark.parametrize("env", [None, "10.0.0.0/8, 127.0.0.1"])
def test_served_apps_trust_the_proxies_uvicorn_would(monkeypatch: Any, env: str | None) -> None:
    """`meterline serve` turns uvicorn's proxy headers off and `served` adds them (not for ingest): the
    same trusted proxies as uvicorn's own Config, and forwarded client addresses reach the routes."""
    import uvicorn

    if env is None:
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    else:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", env)
    assert forwarded_allow_ips() == uvicorn.Config(FastAPI(), log_config=None).forwarded_allow_ips
    assert serve_options()["proxy_headers"] is False

    inner = FastAPI()

    @inner.get("/who")
    def who(request: Request) -> str:
        return request.client.host if request.client else ""

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    with TestClient(served(inner)) as client:
        assert client.get("/who", headers={"x-forwarded-for": "203.0.113.9"}).json() == "203.0.113.9"
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")
    with TestClient(served(inner)) as client:  # the test client's address is not a trusted proxy
        assert client.get("/who", headers={"x-forwarded-for": "203.0.113.9"}).json() == "testclient"
