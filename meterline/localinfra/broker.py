"""A local Kafka-compatible broker (tansu, in-memory storage) on a free port, for ``make run`` and tests.

Why a fresh random cluster id per start: the design uses the cluster id as the *log epoch* of every
event position. A memory broker loses its log on restart and hands out offsets from 0 again; a new
epoch guarantees those new positions never collide with positions recorded before the restart.

Measured on tansu 0.6.0:
- ``create_topics`` honours ``num_partitions`` and answers TOPIC_ALREADY_EXISTS on a repeat.
- Any metadata request for an unknown topic auto-creates it with 4 partitions. Faust creates only its
  internal topics (changelogs, leader topic) with the right counts, never its source topics, so call
  `ensure_topic` before the first worker or producer starts, or the topic silently gets 4 partitions.
- A consumer-group join takes about half the client's session timeout: librdkafka's 45 s default
  -> ~23 s, Faust's 60 s default -> ~30 s; ``session.timeout.ms=6000`` / ``broker_session_timeout=6``
  -> ~3 s.
- SIGTERM is ignored while clients are connected, so `stop` falls back to SIGKILL (memory storage:
  nothing is lost that a restart would keep anyway).
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from meterline.localinfra.fetch_tansu import tansu_path
from meterline.localinfra.ports import HOST, NotReadyError, free_port, wait_for
from meterline.localinfra.process import ManagedProcess

log = logging.getLogger(__name__)

CLUSTER_ID_PREFIX = "meterline-"


class TopicMismatchError(RuntimeError):
    """An existing topic has a different partition count than requested (keys would map differently)."""


def new_cluster_id() -> str:
    return f"{CLUSTER_ID_PREFIX}{uuid.uuid4().hex}"


def broker_answers(bootstrap: str, timeout: float = 1.0) -> bool:
    """True if the broker returns cluster metadata (the same call clients make first).

    librdkafka logging is off here: "connection refused" while the broker starts is expected.
    """
    AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=timeout)
    return True


def ensure_topic(bootstrap: str, name: str, partitions: int, timeout: float = 10.0) -> None:
    """Create ``name`` with ``partitions`` partitions unless it exists; verify the partition count.

    Idempotent so every process may call it at startup. A different existing count is an error rather
    than silently accepted: subject-keyed partitioning (one owner per window row) depends on it.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1)], operation_timeout=timeout
    )
    try:
        futures[name].result(timeout)
        log.info("created topic %s with %d partitions", name, partitions)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    metadata = admin.list_topics(topic=name, timeout=timeout).topics.get(name)
    actual = len(metadata.partitions) if metadata is not None and metadata.error is None else None
    if actual != partitions:
        raise TopicMismatchError(f"topic {name} has {actual} partitions, expected {partitions}")


class LocalBroker:
    """One tansu broker subprocess; ``with LocalBroker() as b: b.bootstrap``.

    Every `start` is a new, empty broker with a new port and cluster id (memory storage only).
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        binary: str | Path | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 2.0,
    ) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
        self.binary = Path(binary) if binary is not None else None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self.cluster_id: str | None = None
        self._proc: ManagedProcess | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalBroker is not started")
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def log_path(self) -> Path | None:
        return self._proc.log_path if self._proc is not None else None

    def start(self, attempts: int = 3) -> Self:
        """Start on a free port and wait until metadata requests succeed; retry if the port was taken."""
        if self.running:
            raise RuntimeError(f"LocalBroker already running (pid {self.pid})")
        binary = self.binary if self.binary is not None else tansu_path()
        for attempt in range(1, attempts + 1):
            self.port, self.cluster_id = free_port(), new_cluster_id()
            url = f"tcp://{HOST}:{self.port}"
            proc = ManagedProcess(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/", "--cluster-id", self.cluster_id],
                name=f"tansu[{self.port}]",
                log_path=self.log_dir / f"tansu-{self.port}.log",
                stop_timeout=self.stop_timeout,
            )
            self._proc = proc
            proc.start()
            try:
                wait_for(
                    lambda: broker_answers(self.bootstrap),
                    self.start_timeout,
                    f"local broker (tansu) at {self.bootstrap}, log {proc.log_path}",
                    alive=proc.is_alive,
                )
            except NotReadyError as exc:
                proc.kill()
                if attempt == attempts:
                    raise NotReadyError(f"{exc}; broker log tail:\n{proc.log_tail(2000)}") from exc
                log.warning("local broker did not come up (attempt %d), retrying", attempt)
                continue
            log.info("local broker ready at %s (pid %d, cluster id %s)", self.bootstrap, proc.pid,
                     self.cluster_id)
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``. All topics and offsets are gone afterwards."""
        if self._proc is not None:
            self._proc.stop()

    def kill(self) -> None:
        """Crash the broker (SIGKILL) for fault tests."""
        if self._proc is not None:
            self._proc.kill()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients see timeouts, not refused connections."""
        if self._proc is None:
            raise RuntimeError("LocalBroker is not started")
        self._proc.pause()

    def resume(self) -> None:
        if self._proc is None:
            raise RuntimeError("LocalBroker is not started")
        self._proc.resume()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
