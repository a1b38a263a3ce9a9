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
from typing import Self

from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from meterline.adapters.kafka import create_topic_if_missing
from meterline.localinfra.fetch_tansu import tansu_path
from meterline.localinfra.ports import HOST, free_port
from meterline.localinfra.process import ManagedProcess
from meterline.localinfra.server import LocalServer

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
    metadata = create_topic_if_missing(bootstrap, name, partitions, timeout).topics.get(name)
    actual = len(metadata.partitions) if metadata is not None and metadata.error is None else None
    if actual != partitions:
        raise TopicMismatchError(f"topic {name} has {actual} partitions, expected {partitions}")


class LocalBroker(LocalServer):
    """One tansu broker subprocess; ``with LocalBroker() as b: b.bootstrap``.

    Every `start` is a new, empty broker with a new port and cluster id (memory storage only), so after
    `stop` or `kill` all topics and offsets are gone.
    """

    label = "local broker"
    log_kind = "broker log"

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        binary: str | Path | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 2.0,
    ) -> None:
        super().__init__(start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
        self.binary = Path(binary) if binary is not None else None
        self.port: int | None = None
        self.cluster_id: str | None = None
        self._binary: Path | None = None
        self._reuse_port = False

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalBroker is not started")
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self._proc.log_path if self._proc is not None else None

    def restart(self) -> Self:
        """After `stop`/`kill`: a new, empty broker on the SAME port with a new cluster id -- what clients
        meet when a broker is re-created (its log lost, offsets from 0 again under a new log epoch). Processes
        configured with the old bootstrap reconnect on their own. One attempt: another port would defeat
        the purpose. Topics are gone; call `ensure_topic` again."""
        if self.port is None:
            raise RuntimeError("LocalBroker was never started; use start()")
        self._reuse_port = True
        try:
            return self.start(attempts=1)
        finally:
            self._reuse_port = False

    def _prepare(self) -> None:
        self._binary = self.binary if self.binary is not None else tansu_path()

    def _new_process(self) -> ManagedProcess:
        if not self._reuse_port or self.port is None:
            self.port = free_port()
        self.cluster_id = new_cluster_id()
        url = f"tcp://{HOST}:{self.port}"
        return ManagedProcess(
            [str(self._binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--cluster-id", self.cluster_id],
            name=f"tansu[{self.port}]",
            log_path=self.log_dir / f"tansu-{self.port}.log",
            stop_timeout=self.stop_timeout,
        )

    def _answers(self) -> bool:
        return broker_answers(self.bootstrap)

    def _describe(self) -> str:
        return f"local broker (tansu) at {self.bootstrap}, log {self.log_path}"

    def _log_ready(self, proc: ManagedProcess) -> None:
        log.info("local broker ready at %s (pid %d, cluster id %s)", self.bootstrap, proc.pid, self.cluster_id)
