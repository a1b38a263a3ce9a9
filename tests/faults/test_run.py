"""`meterline run` as a user runs it (the real command, its own broker and ClickHouse under a data dir):

Scenario 11 (supervised restart): two workers; one is killed with SIGKILL, and again right after its
restart (a crash loop). The run restarts it with backoff, says so in its log and in the API's /readyz,
the API keeps answering, and every window ends equal to the oracle.

Scenario 12 (drain on stop): a burst of events, Ctrl-C (SIGINT) right after the last 204, then
`meterline run` again on the same data dir. The local broker keeps its log in memory, so every event it
acknowledged must have been written before the first run stopped: all of them are counted.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.localinfra.ports import free_port, wait_for
from meterline.localinfra.process import ManagedProcess
from meterline.localinfra.supervisor import read_status
from tests.faults.harness import (
    FAULT_CONFIG,
    MakeSender,
    Summary,
    begin,
    fault_events,
    fault_stream,
    feed_in_background,
    liveness_timeout,
    settle,
    totals,
)

pytestmark = pytest.mark.faults


@dataclass
class Run:
    """One `meterline run` process; quacks like the LocalStack the harness reads windows through."""

    data_dir: Path
    config_file: Path
    processors: int
    port: int
    proc: ManagedProcess | None = None
    database: str = "meterline"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"run-{self.data_dir.name}.log"

    @property
    def clickhouse_url(self) -> str:
        status = self.status()
        assert status is not None, "no status file"
        return str(status["clickhouse"])

    def status(self) -> dict[str, Any] | None:
        return read_status(self.data_dir / "run" / "status.json")

    def start(self) -> Run:
        env = dict(os.environ, METERLINE_CONFIG=str(self.config_file), PYTHONUNBUFFERED="1")
        env.pop("KAFKA_BOOTSTRAP", None)
        env.pop("CLICKHOUSE_URL", None)
        self.proc = ManagedProcess(
            [sys.executable, "-m", "meterline.cli", "run", "--port", str(self.port), "--processors",
             str(self.processors), "--data-dir", str(self.data_dir)],
            name="meterline-run", env=env, log_path=self.log_path, stop_timeout=120.0,
        )
        self.proc.start()
        wait_for(self._ready, timeout=180, what=f"meterline run on {self.url} (log {self.log_path})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if not self.proc.is_alive():
            raise RuntimeError(f"meterline run exited:\n{self.proc.log_tail()}")
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200 and self.status() is not None
        except httpx.HTTPError:
            return False

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the run process only (its children are in their own process groups)."""
        assert self.proc is not None and self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGINT)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        wait_for(lambda: not self.proc.is_alive(), timeout=timeout, what="meterline run to stop")  # type: ignore[union-attr]
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def processes(self) -> dict[str, Any]:
        status = self.status()
        return dict(status["processes"]) if status else {}


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def new(processors: int = 1, data_dir: Path | None = None, port: int | None = None) -> Run:
        config = tmp_path / "config.yaml"
        config.write_text(FAULT_CONFIG)
        run = Run(data_dir or tmp_path / f"data{len(runs)}", config, processors, port or free_port())
        runs.append(run)
        return run.start()

    try:
        yield new
    finally:
        for run in runs:
            if run.proc is not None:
                run.proc.stop(timeout=60)


def test_crashed_worker_is_restarted_with_backoff(make_run: Callable[..., Run], make_sender: MakeSender,
                                                  summary: Summary) -> None:
    started, row, seed, rng = begin(summary("11 meterline run: kill -9 a worker twice"), 11)
    run = make_run(processors=2)
    stream = fault_stream(seed, fault_events() // 4, rng)
    sender = make_sender(run.url)
    feeder = feed_in_background(sender, stream, rng, over_seconds=30.0)
    # crash while events flow: once the first ones are counted
    wait_for(lambda: sum(totals(run) or ()) > 0, timeout=120, what="the first events counted")  # type: ignore[arg-type]
    victim = "processor-0"
    pid = run.processes()[victim]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: run.processes()[victim]["restarts"] >= 1 and run.processes()[victim]["state"] == "running",
             timeout=60, what=f"{victim} restarted")
    os.kill(run.processes()[victim]["pid"], signal.SIGKILL)  # right after its restart: a crash loop
    unready = False

    def restarted_twice() -> bool:
        nonlocal unready
        try:
            ready = httpx.get(run.url + "/readyz", timeout=2)
            if ready.status_code == 503 and ready.json()["checks"].get("processors") == "unavailable":
                unready = True
        except httpx.HTTPError:
            pass
        p = run.processes()[victim]
        return bool(p["restarts"] >= 2 and p["state"] == "running")

    wait_for(restarted_twice, timeout=90, interval=0.1, what=f"{victim} restarted twice")
    feeder.join_checked(timeout=600)
    settle(row, run, sender, started)  # type: ignore[arg-type]
    assert unready, "/readyz never reported the processors unavailable while a worker was restarting"
    assert "processor-0 exited (rc -9) (crash loop)" in run.log(), run.log()[-3000:]
    assert set(sender.statuses) == {204}, sender.statuses  # the API answered throughout
    row.note = f"readyz 503 while restarting; restarts {run.processes()[victim]['restarts']}"


def test_ctrl_c_drains_every_acknowledged_event(tmp_path: Path, make_run: Callable[..., Run],
                                                make_sender: MakeSender, summary: Summary) -> None:
    started, row, seed, rng = begin(summary("12 meterline run: burst, Ctrl-C at once, run again"), 12)
    data_dir = tmp_path / "data"
    run = make_run(processors=1, data_dir=data_dir)
    stream = fault_stream(seed, fault_events() // 2, rng)
    sender = make_sender(run.url)
    sender.send_all(stream, rng, 200, 500)
    run.interrupt()  # right after the last 204
    assert run.wait_exit(timeout=liveness_timeout()) == 0, run.log()[-3000:]
    assert "drained in" in run.log(), run.log()[-3000:]
    again = make_run(processors=1, data_dir=data_dir, port=run.port)
    settle(row, again, sender, started)  # type: ignore[arg-type]
    row.note = "all acknowledged events counted after restart"
