"""The whole pipeline as local processes: what `make run`, the end-to-end and fault tests and the
benchmarks start.

Infrastructure comes from the environment when given (`KAFKA_BOOTSTRAP`, `CLICKHOUSE_URL`) and is
otherwise started here (tansu broker, chdb ClickHouse). meterline's own processes (processor workers and
the HTTP server) always run as separate OS processes, so a test can kill -9 one of them exactly as a
crash would, and every one is stopped by its PID when the stack stops, even after a failure.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from meterline.localinfra.broker import LocalBroker, ensure_topic
from meterline.localinfra.clickhouse_cluster import LocalClickHouseCluster
from meterline.localinfra.clickhouse_server import LocalClickHouse
from meterline.localinfra.ports import free_port, wait_for
from meterline.localinfra.process import ManagedProcess
from meterline.localinfra.server import Started

logger = logging.getLogger(__name__)


@dataclass
class LocalStack(Started):
    """Broker + ClickHouse + `processors` Faust workers + one HTTP server (ingest and query).

    `config_file` is the config.yaml the services read; `data_dir` holds ClickHouse data (when started
    here), worker state and logs. Topic and database names are unique per stack unless given, so
    stacks in one test session never see each other's data.
    """

    data_dir: Path
    config_file: Path
    processors: int = 1
    http_port: int | None = None
    http_workers: int = 1
    #: What the HTTP server serves (`meterline serve all|ingest|query`): bench P1 measures the ingest process
    #: README "Scaling out" recommends beside the combined one.
    http_app: str = "all"
    topic: str | None = None
    database: str | None = None
    partitions: int = 4
    #: Default: `meterline-processor` when the topic is given (a stable deployment: its committed offsets
    #: must survive restarts), else one group per stack beside its generated topic, so stacks sharing a
    #: broker (the test session's) never share a group: stale members of a stopped stack and members
    #: subscribed to other topics would otherwise keep every later stack's group rebalancing.
    consumer_group: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    kafka_bootstrap: str | None = None
    clickhouse_url: str | None = None
    #: A started local cluster to use instead of one server (the caller starts and stops it).
    clickhouse_cluster: LocalClickHouseCluster | None = None

    broker: LocalBroker | None = None
    clickhouse: LocalClickHouse | None = None
    workers: list[ManagedProcess] = field(default_factory=list)
    #: index -> web port of that processor worker (/healthz /readyz /metrics)
    worker_ports: dict[int, int] = field(default_factory=dict)
    server: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        suffix = uuid.uuid4().hex[:8]
        if not self.consumer_group:
            self.consumer_group = "meterline-processor" if self.topic else f"meterline-processor-{suffix}"
        self.topic = self.topic or f"meterline-events-{suffix}"
        self.database = self.database or f"meterline_{suffix}"
        if not self.auth_secret_file.exists():  # the servers' HMAC secret for API keys, kept with the data
            self.auth_secret_file.touch(mode=0o600)
            self.auth_secret_file.write_text(secrets.token_urlsafe(32) + "\n")

    @property
    def auth_secret_file(self) -> Path:
        return self.data_dir / "auth-secret"

    @property
    def drain_file(self) -> Path:
        """While it exists, ingest answers 503 (created by `supervisor.drain`, removed on start)."""
        return self.data_dir / "run" / "draining"

    @property
    def status_file(self) -> Path:
        """The supervisor's view of every process (`meterline run`), read by the API's /readyz."""
        return self.data_dir / "run" / "status.json"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        self.drain_file.unlink(missing_ok=True)  # a drain of an earlier run must not refuse this one's ingest
        self.status_file.unlink(missing_ok=True)
        try:
            self._start_infra()
            for index in range(self.processors):
                self.add_processor(index)
            self._start_server()
            wait_for(self._meters_ready, timeout=180,
                     what=f"every meter built from stored events (see {self.data_dir / 'logs'})")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything this stack started, newest first; never raises for a dead process."""
        for proc in [self.server, *reversed(self.workers)]:
            if proc is not None:
                try:
                    proc.stop()
                except Exception:  # pragma: no cover - best effort cleanup
                    logger.exception("could not stop %s", proc.name)
        for infra in (self.clickhouse, self.broker):
            if infra is not None:
                try:
                    infra.stop()
                except Exception:  # pragma: no cover
                    logger.exception("could not stop %r", infra)

    def assert_running(self) -> None:
        """Raise with the log tail of any meterline process that has exited, so waits fail fast."""
        for proc in [self.server, *self.workers]:
            if proc is not None and not proc.is_alive():
                raise RuntimeError(f"{proc.name} exited (rc {proc.returncode}):\n{proc.log_tail()}")

    # -- pieces ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def clickhouse_db_url(self) -> str:
        assert self.clickhouse_url is not None
        return self.clickhouse_url.rstrip("/") + "/" + str(self.database)

    def env(self) -> dict[str, str]:
        """The environment every meterline process of this stack runs with."""
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP=str(self.kafka_bootstrap),
            CLICKHOUSE_URL=self.clickhouse_db_url,
            METERLINE_CONFIG=str(self.config_file),
            METERLINE_EVENTS_TOPIC=str(self.topic),
            METERLINE_TOPIC_PARTITIONS=str(self.partitions),
            METERLINE_DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",
            # The dev stack serves on 127.0.0.1 in local mode: keyless requests act in the default
            # namespace, presented keys are checked. extra_env may turn it off to test keys alone.
            METERLINE_AUTH_LOCAL_MODE="true",
            METERLINE_AUTH_SECRET_FILE=str(self.auth_secret_file),
            METERLINE_CONSUMER_GROUP=self.consumer_group,
            # One broker: one replica (the stack creates the topic itself; see _start_infra).
            METERLINE_TOPIC_REPLICATION_FACTOR="1",
            METERLINE_TOPIC_MIN_INSYNC_REPLICAS="1",
            METERLINE_DRAIN_FILE=str(self.drain_file),
            METERLINE_SUPERVISOR_STATUS_FILE=str(self.status_file),
        )
        if self.clickhouse_cluster is not None:
            env.update(METERLINE_CLICKHOUSE_CLUSTER=self.clickhouse_cluster.name,
                       METERLINE_CLICKHOUSE_REPLICATED="false",
                       # no keeper, so no ON CLUSTER: mutations run on each node (adapters.clickhouse.mutate)
                       METERLINE_CLICKHOUSE_NODE_URLS=",".join(n.url for n in self.clickhouse_cluster.nodes))
        env.update(self.extra_env)
        return env

    def _start_infra(self) -> None:
        self.kafka_bootstrap = self.kafka_bootstrap or os.environ.get("KAFKA_BOOTSTRAP")
        if self.clickhouse_cluster is not None:
            self.clickhouse_url = self.clickhouse_cluster.url
        self.clickhouse_url = self.clickhouse_url or os.environ.get("CLICKHOUSE_URL")
        if not self.kafka_bootstrap:
            self.broker = LocalBroker(log_dir=self.data_dir / "logs")
            self.broker.start()
            self.kafka_bootstrap = self.broker.bootstrap
        if not self.clickhouse_url:
            self.clickhouse = LocalClickHouse(data_dir=self.data_dir / "clickhouse")
            self.clickhouse.start()
            self.clickhouse_url = self.clickhouse.url
        ensure_topic(self.kafka_bootstrap, str(self.topic), self.partitions)
        if self.clickhouse_cluster is not None:
            self.clickhouse_cluster.create_schema(str(self.database))
            return
        from meterline.adapters.clickhouse import connect, create_schema

        client = connect(self.clickhouse_url)
        try:
            create_schema(client, str(self.database))
        finally:
            client.close()

    def add_processor(self, index: int | None = None) -> ManagedProcess:
        """Start one more Faust worker (same consumer group) and return it."""
        index = len(self.workers) if index is None else index
        env = self.env()
        env["METERLINE_STATE_DIR"] = str(self.data_dir / f"processor-{index}")
        self.worker_ports[index] = free_port()
        proc = ManagedProcess(
            [sys.executable, "-m", "processor", "--web-port", str(self.worker_ports[index])],
            name=f"processor-{index}",
            env=env,
            log_path=self.data_dir / "logs" / f"processor-{index}.log",
            stop_timeout=15.0,
        )
        proc.start()
        if index < len(self.workers):
            self.workers[index] = proc
        else:
            self.workers.append(proc)
        return proc

    def processor_url(self, index: int) -> str:
        """Base URL of worker `index`'s web server (`/healthz`, `/readyz`, `/metrics`)."""
        return f"http://127.0.0.1:{self.worker_ports[index]}"

    def restart_processor(self, index: int) -> ManagedProcess:
        """Start worker `index` again on its own state dir (after a kill or stop)."""
        self.workers[index].stop()
        return self.add_processor(index)

    def restart_server(self) -> ManagedProcess:
        """Start the HTTP server again on the same port (after it exited); does not wait for it."""
        if self.server is not None:
            self.server.stop()
        self._start_server(wait=False)
        assert self.server is not None
        return self.server

    def _start_server(self, *, wait: bool = True) -> None:
        self.http_port = self.http_port or free_port()
        self.server = ManagedProcess(
            [
                sys.executable, "-m", "meterline.cli", "serve", self.http_app,
                "--host", "127.0.0.1", "--port", str(self.http_port), "--workers", str(self.http_workers),
            ],
            name="http",
            env=self.env(),
            log_path=self.data_dir / "logs" / "http.log",
        )
        self.server.start()
        if wait:
            wait_for(self._healthy, timeout=60, what=f"meterline HTTP server on {self.url} (see {self.server.log_path})")

    def _meters_ready(self) -> bool:
        """Up means answering: a meter the controller is still building would answer 503 "building".
        An ingest-only server builds no meters."""
        if self.http_app == "ingest":
            return True
        try:
            resp = httpx.get(self.url + "/api/v1/meters", timeout=5)
        except httpx.HTTPError:
            return False
        if resp.status_code in (401, 403):  # keys required (no local mode): the caller checks with its key
            return True
        return resp.status_code == 200 and all(
            (m.get("annotations") or {}).get("meterline.state") == "ready" for m in resp.json()
        )

    def _healthy(self) -> bool:
        if self.server is not None and not self.server.is_alive():
            raise RuntimeError(f"HTTP server exited; see {self.server.log_path}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
