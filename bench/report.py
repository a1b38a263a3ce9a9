"""Benchmark results: one `Figure` per measured number, printed as a rich table and saved as JSON.

Why every figure carries its baseline: a throughput or latency on its own says more about the machine
than about meterline. Each figure is measured next to a baseline taken in the same run, on the same
broker and ClickHouse, so the ratio is what carries over between machines.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Figure:
    """One measured number next to its baseline.

    `higher_is_better` says how `ratio` reads: for throughputs ratio = value / baseline, for latencies
    and memory ratio = baseline / value, so a ratio above 1 always means meterline is ahead.
    `target` is checked by `check` (a callable result stored as `passed`) and described in `target`.
    """

    figure: str  # "P1", "P2", ...
    name: str
    size: int  # events (or ids) this figure was measured over
    value: float
    unit: str
    baseline: float
    baseline_name: str
    ratio: float = 0.0
    higher_is_better: bool = True
    target: str = ""
    passed: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ratio:
            if self.higher_is_better:
                self.ratio = self.value / self.baseline if self.baseline else 0.0
            else:
                self.ratio = self.baseline / self.value if self.value else 0.0


@dataclass
class Report:
    """Everything one `make bench` run measured, plus what it ran on."""

    size: str
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "size": self.size,
            "params": self.params,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "figures": [asdict(f) for f in self.figures],
            "errors": self.errors,
        }

    def save(self, results_dir: Path) -> Path:
        results_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = results_dir / f"{stamp}.json"
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        return path

    def table(self) -> Table:
        table = Table(title=f"meterline bench ({self.size})", show_lines=False)
        for col, justify in (
            ("fig", "left"), ("what", "left"), ("size", "right"), ("meterline", "right"),
            ("baseline", "right"), ("ratio", "right"), ("target", "left"), ("", "center"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for f in self.figures:
            mark = {True: "[green]ok[/green]", False: "[red]miss[/red]", None: ""}[f.passed]
            table.add_row(
                f.figure,
                f.name,
                f"{f.size:,}",
                f"{_num(f.value)} {f.unit}",
                f"{_num(f.baseline)} {f.unit}",
                f"{f.ratio:.3g}x",
                f.target,
                mark,
            )
        return table

    def print(self, console: Console) -> None:
        console.print(self.table())
        baselines = {f"{f.figure} baseline": f.baseline_name for f in self.figures}
        for label, name in baselines.items():
            console.print(f"[dim]{label}: {name}[/dim]")
        for figure, error in self.errors.items():
            console.print(f"[red]{figure} failed:[/red] {error}")


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:,.2f}"
    return f"{x:.4f}"
