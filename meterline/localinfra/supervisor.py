"""What `meterline run` does between start and stop: keep the processes up, and drain before stopping.

Supervision: a processor worker or the HTTP server that exits (a crash, a kill -9) is started again on
its own state, after a backoff that doubles per consecutive failure (1 s up to 30 s) and resets once the
process stayed up for a minute. Each exit and restart is logged; the state of every process is written
to `<data_dir>/run/status.json`, which the API's `/readyz` reads (check `processors`), so a crash loop is
visible there too. Exactly-once does not depend on any of this (a restarted worker replays from its
committed offsets); supervision only keeps a one-machine install running the way a real orchestrator
keeps a deployment running.

Drain: the local broker keeps its log in memory, so whatever it acknowledged but no processor wrote to
ClickHouse is lost when it stops. `drain` therefore (1) makes ingest answer 503 (the drain file), (2)
waits until no request is between that check and the broker's answer (`meterline_ingest_publishes_in_flight`
on /metrics is 0), (3) appends an empty message (`[]`, no events) to every partition as a barrier and
(4) waits until the processors' committed offset of every partition is past its barrier: everything the
broker acknowledged before it is then written. A barrier rather than the broker's end offsets: the local
broker reports a wrong high watermark for multi-record batches, while produce acknowledgements carry
exact offsets.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from meterline.localinfra.process import ManagedProcess
from meterline.localinfra.stack import LocalStack

logger = logging.getLogger(__name__)

_IN_FLIGHT = re.compile(r"^meterline_ingest_publishes_in_flight\s+([0-9.e+-]+)$", re.MULTILINE)


@dataclass
class Backoff:
    """Delay before the next restart: doubles per consecutive failure, resets after a stable run."""

    initial: float = 1.0
    maximum: float = 30.0
    stable_seconds: float = 60.0

    def delay(self, consecutive_failures: int) -> float:
        return min(self.maximum, self.initial * 2 ** max(0, consecutive_failures - 1))


@dataclass
class Supervised:
    """One process under supervision and its restart history."""

    name: str
    start: Callable[[], ManagedProcess]
    proc: ManagedProcess
    started_at: float
    restarts: int = 0
    consecutive_failures: int = 0
    last_exit: int | None = None
    restart_at: float | None = None

    def state(self) -> str:
        if self.restart_at is not None:
            return "restarting"
        return "running" if self.proc.is_alive() else "exited"


@dataclass
class Supervisor:
    """Restarts the stack's workers and HTTP server when they exit; `poll()` is one round (cheap)."""

    stack: LocalStack
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic
    on_event: Callable[[str], None] = logger.warning
    draining: bool = False
    _members: list[Supervised] = field(default_factory=list)
    _last_status: str = ""

    def __post_init__(self) -> None:
        now = self.clock()
        for index, proc in enumerate(self.stack.workers):
            self._members.append(Supervised(proc.name, self._worker_starter(index), proc, now))
        if self.stack.server is not None:
            self._members.append(Supervised(self.stack.server.name, self.stack.restart_server, self.stack.server, now))
        self.write_status()

    def _worker_starter(self, index: int) -> Callable[[], ManagedProcess]:
        return lambda: self.stack.add_processor(index)

    def poll(self) -> None:
        """Notice exits, schedule restarts with backoff, start what is due; then publish the status."""
        now = self.clock()
        for m in self._members:
            if m.restart_at is None and not m.proc.is_alive():
                m.last_exit = m.proc.returncode
                m.proc.stop()  # reap and close its log
                stable = now - m.started_at >= self.backoff.stable_seconds
                m.consecutive_failures = 1 if stable else m.consecutive_failures + 1
                delay = self.backoff.delay(m.consecutive_failures)
                m.restart_at = now + delay
                loop = " (crash loop)" if m.consecutive_failures > 1 else ""
                self.on_event(f"{m.name} exited (rc {m.last_exit}){loop}; restart #{m.restarts + 1} in {delay:.0f}s; "
                              f"see {m.proc.log_path}")
            elif m.restart_at is not None and now >= m.restart_at:
                m.proc = m.start()
                m.started_at = self.clock()
                m.restart_at = None
                m.restarts += 1
                self.on_event(f"{m.name} restarted (pid {m.proc.pid}, restart #{m.restarts})")
        self.write_status()

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "draining": self.draining,
            "clickhouse": self.stack.clickhouse_db_url,
            "kafka": self.stack.kafka_bootstrap,
            "processes": {
                m.name: {
                    "state": m.state(), "pid": m.proc.pid, "restarts": m.restarts, "lastExit": m.last_exit,
                    "consecutiveFailures": m.consecutive_failures,
                    "restartIn": None if m.restart_at is None else round(max(0.0, m.restart_at - now), 1),
                }
                for m in self._members
            },
        }

    def write_status(self) -> None:
        """Atomically replace the status file when something changed (readers never see half a file)."""
        status = self.status()
        for p in status["processes"].values():
            p.pop("restartIn")  # changes every round; not worth a write
        text = json.dumps(status, indent=1)
        if text == self._last_status:
            return
        path = self.stack.status_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1))
        os.replace(tmp, path)
        self._last_status = text


@dataclass
class DrainReport:
    barriers: dict[int, int]
    completed: bool
    seconds: float


def drain(stack: LocalStack, supervisor: Supervisor, cancelled: threading.Event,
          progress: Callable[[str], None] = logger.info) -> DrainReport:
    """Stop ingest, then wait until every acknowledged message is written (see module doc).

    Keeps supervising meanwhile (a worker crashing during the drain is restarted and finishes it).
    Returns early, `completed=False`, when `cancelled` is set (a second Ctrl-C).
    """
    started = time.monotonic()
    stack.drain_file.parent.mkdir(parents=True, exist_ok=True)
    stack.drain_file.touch()
    supervisor.draining = True
    supervisor.write_status()

    def wait(done: Callable[[], bool], what: str) -> bool:
        last_report = 0.0
        while not cancelled.is_set():
            supervisor.poll()
            if done():
                return True
            if time.monotonic() - last_report > 5:
                progress(what)
                last_report = time.monotonic()
            cancelled.wait(0.2)
        return False

    if not wait(lambda: _in_flight(stack) == 0, "waiting for ingest requests in flight"):
        return DrainReport({}, False, time.monotonic() - started)
    barriers = _produce_barriers(stack)
    group = _committed_reader(stack)
    try:
        def behind() -> dict[int, int]:
            committed = _committed(group, str(stack.topic), barriers)
            return {p: b + 1 - committed.get(p, 0) for p, b in barriers.items() if committed.get(p, -1) <= b}

        left: dict[int, int] = {}

        def done() -> bool:
            nonlocal left
            left = behind()
            return not left

        ok = wait(done, "waiting for processors to write what the broker acknowledged "
                        f"({sum(left.values()) if left else '?'} messages behind)")
    finally:
        group.close()
    return DrainReport(barriers, ok, time.monotonic() - started)


def _in_flight(stack: LocalStack) -> float | None:
    """The ingest server's in-flight publishes from its /metrics, or None while it cannot answer."""
    if stack.server is None or not stack.server.is_alive():
        return 0.0  # nothing can publish through a server that is not running
    try:
        text = httpx.get(stack.url + "/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    found = _IN_FLIGHT.search(text)
    return float(found.group(1)) if found else 0.0


def _produce_barriers(stack: LocalStack) -> dict[int, int]:
    """Append `[]` to every partition; return each barrier's offset (from the broker's acknowledgement)."""
    producer = Producer({"bootstrap.servers": str(stack.kafka_bootstrap), "acks": "all", "enable.idempotence": True})
    offsets: dict[int, int] = {}
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            offsets[msg.partition()] = msg.offset()

    for p in range(stack.partitions):
        producer.produce(str(stack.topic), b"[]", partition=p, on_delivery=delivered)
    if producer.flush(30) != 0 or errors:
        raise RuntimeError(f"could not append drain barriers: {errors or 'timeout'}")
    return offsets


def _committed_reader(stack: LocalStack) -> Consumer:
    """A client of the processors' consumer group that only reads its committed offsets (never joins)."""
    return Consumer({"bootstrap.servers": str(stack.kafka_bootstrap), "group.id": stack.consumer_group,
                     "enable.auto.commit": False})


def _committed(consumer: Consumer, topic: str, partitions: dict[int, int]) -> dict[int, int]:
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=5)
    except KafkaException:
        return {}
    return {tp.partition: tp.offset for tp in found if tp.error is None}


def read_status(path: str | Path) -> dict[str, Any] | None:
    """The supervisor's last status, or None when there is none (not started by `meterline run`)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
