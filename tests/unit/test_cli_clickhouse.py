"""Commands that need ClickHouse say which variable is missing instead of connecting to nowhere."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from meterline.cli import app


@pytest.mark.parametrize("argv", [["recompute", "tokens_total"], ["dead-letters", "list"], ["dead-letters", "replay"]])
def test_missing_clickhouse_url_is_named(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLICKHOUSE_URL", raising=False)
    monkeypatch.delenv("METERLINE_CLICKHOUSE_URL", raising=False)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert "CLICKHOUSE_URL is not set" in result.output
