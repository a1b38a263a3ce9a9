"""meterline/localinfra/supervisor.py: restart with doubling backoff, reset after a stable run, status file
(what the API's /readyz reads through meterline.adapters.health.supervisor_check)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterline.adapters.health import supervisor_check
from meterline.localinfra.supervisor import Backoff, Supervisor, read_status


@dataclass
class FakeProc:
    name: str
    pid: int
    alive: bool = True
    returncode: int | None = None
    log_path: Path = Path("/dev/null")

    def is_alive(self) -> bool:
        return self.alive

    def stop(self) -> None:
        pass

    def crash(self) -> None:
        self.alive, self.returncode = False, -9


@dataclass
class FakeStack:
    root: Path
    workers: list[Any] = field(default_factory=list)
    server: Any = None
    clickhouse_db_url: str = "http://ch/db"
    kafka_bootstrap: str = "k:9092"
    pids: int = 100

    @property
    def status_file(self) -> Path:
        return self.root / "run" / "status.json"

    def add_processor(self, index: int) -> FakeProc:
        self.pids += 1
        self.workers[index] = FakeProc(f"processor-{index}", self.pids)
        return self.workers[index]

    def restart_server(self) -> FakeProc:
        self.pids += 1
        self.server = FakeProc("http", self.pids)
        return self.server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path) -> tuple[FakeStack, Supervisor, Clock, list[str]]:
    stack = FakeStack(tmp_path, workers=[FakeProc("processor-0", 1), FakeProc("processor-1", 2)],
                      server=FakeProc("http", 3))
    clock, events = Clock(), []
    sup = Supervisor(stack, Backoff(initial=1, maximum=8, stable_seconds=60), clock=clock,  # type: ignore[arg-type]
                     on_event=events.append)
    return stack, sup, clock, events


def ready(stack: FakeStack) -> bool:
    return asyncio.run(supervisor_check(str(stack.status_file))())


def test_a_crashed_worker_restarts_after_a_doubling_backoff(tmp_path: Path) -> None:
    stack, sup, clock, events = make(tmp_path)
    assert ready(stack)
    delays = []
    for _ in range(5):  # crash right after every restart: a crash loop
        stack.workers[0].crash()
        sup.poll()
        assert not ready(stack) and read_status(stack.status_file)["processes"]["processor-0"]["state"] == "restarting"
        restart_in = read_status(stack.status_file)["processes"]["processor-0"]["restartIn"]
        delays.append(restart_in)
        clock.now += restart_in - 0.01
        sup.poll()
        assert not stack.workers[0].is_alive()  # not before the backoff elapsed
        clock.now += 0.02
        sup.poll()
        assert stack.workers[0].is_alive() and ready(stack)
    assert delays == [1, 2, 4, 8, 8]
    assert sum("crash loop" in e for e in events) == 4
    assert read_status(stack.status_file)["processes"]["processor-0"]["restarts"] == 5
    assert stack.workers[1].pid == 2  # the other worker was left alone
    clock.now += 61  # stayed up a minute: the next crash starts the backoff over
    stack.workers[0].crash()
    sup.poll()
    assert read_status(stack.status_file)["processes"]["processor-0"]["restartIn"] == 1


def test_the_api_server_is_supervised_too(tmp_path: Path) -> None:
    stack, sup, clock, events = make(tmp_path)
    stack.server.crash()
    sup.poll()
    clock.now += 1
    sup.poll()
    assert stack.server.is_alive() and stack.server.pid > 3
    assert any(e.startswith("http exited (rc -9)") for e in events)


def test_no_status_file_means_nothing_to_report(tmp_path: Path) -> None:
    assert asyncio.run(supervisor_check(str(tmp_path / "absent.json"))())
