"""What every figure module receives: the shared infrastructure, the options and the progress display."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID

from bench.infra import Infra


@dataclass
class BenchContext:
    infra: Infra
    progress: Progress
    console: Console
    options: dict[str, Any] = field(default_factory=dict)
    #: Measurements one figure shares with another, e.g. P5 reads the memory of P2's worker run.
    shared: dict[Any, Any] = field(default_factory=dict)

    @property
    def work_dir(self) -> Path:
        return self.infra.data_dir

    def task(self, description: str, total: float | None) -> TaskID:
        return self.progress.add_task(description, total=total)

    def done(self, task: TaskID) -> None:
        """Drop a finished bar, so the display keeps only what is running."""
        self.progress.remove_task(task)
