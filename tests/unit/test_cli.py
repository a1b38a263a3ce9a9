"""`meterline validate-config` must name file, meter and field for every problem, and accept the shipped file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from meterline.cli import app

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
