"""Fault tests (make test-faults): every test owns its broker, ClickHouse, Faust workers and HTTP server,
because it kills, pauses or restarts them. The summary table of all scenarios is printed at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table

from meterline.localinfra.stack import LocalStack
from tests.faults.harness import FAULT_CONFIG, MakeSender, MakeStack, ScenarioRow, Sender, Summary, fault_seed

_ROWS = pytest.StashKey[list[ScenarioRow]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ROWS] = []


@pytest.fixture(scope="session")
def summary(pytestconfig: pytest.Config) -> Summary:
    """`row = summary("scenario")` adds a row to the table printed after the session."""

    def new(name: str) -> ScenarioRow:
        row = ScenarioRow(name)
        pytestconfig.stash[_ROWS].append(row)
        return row

    return new


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    table = Table(title=f"meterline fault scenarios (seed {fault_seed()})")
    for col in ("scenario", "sent", "accepted (2xx)", "duplicates dropped", "late", "dead-lettered",
                "windows checked", "mismatches", "seconds", "note"):
        table.add_column(col, justify="left" if col in ("scenario", "note") else "right")
    for r in rows:
        table.add_row(r.scenario, str(r.sent), str(r.accepted), str(r.duplicates_dropped), str(r.late),
                      str(r.dead_lettered), str(r.windows_checked), str(r.mismatches), f"{r.seconds:.0f}",
                      r.note.strip())
    console = Console(file=terminalreporter._tw._file, width=200, force_terminal=False)
    console.print(table)


@pytest.fixture
def make_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeStack]:
    """`make_stack(processors=2, extra_env={...}, config=...)` starts a private stack; all are stopped
    (by PID) at the end of the test, even when it fails.

    KAFKA_BOOTSTRAP / CLICKHOUSE_URL are ignored here on purpose: these tests kill and pause the
    broker and ClickHouse, which they can only do to servers they started themselves.
    """
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("CLICKHOUSE_URL", raising=False)
    stacks: list[LocalStack] = []

    def start(*, processors: int = 1, partitions: int = 4, extra_env: dict[str, str] | None = None,
              config: str = FAULT_CONFIG) -> LocalStack:
        root = tmp_path / f"stack{len(stacks)}"
        root.mkdir()
        config_file = root / "config.yaml"
        config_file.write_text(config)
        stack = LocalStack(data_dir=root, config_file=config_file, processors=processors,
                           partitions=partitions, extra_env=dict(extra_env or {}))
        stacks.append(stack)
        return stack.start()

    try:
        yield start
    finally:
        for stack in reversed(stacks):
            stack.stop()


@pytest.fixture
def make_sender() -> Iterator[MakeSender]:
    """`make_sender(url, **options)`: a retrying HTTP client, closed at the end even when the test fails."""
    senders: list[Sender] = []

    def new(url: str, **options: Any) -> Sender:
        sender = Sender(url, **options)
        senders.append(sender)
        return sender

    try:
        yield new
    finally:
        for sender in senders:
            sender.close()
