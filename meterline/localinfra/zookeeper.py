"""A standalone Apache ZooKeeper (Debian's `zookeeper` package) on a free port, for cluster-mode tests.

Why: ClickHouse keeps replicated tables' metadata and its ON CLUSTER queue in ZooKeeper (or its
compatible clickhouse-keeper). `make install` installs the Debian package when it is missing
(`/usr/share/java/zookeeper.jar`, Java 17); `available()` says whether it is there, so a test can skip
naming the missing package instead of failing obscurely. Measured: ~2 s to answer `ruok`, ~60 MB RSS.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

from meterline.localinfra.ports import HOST, free_port
from meterline.localinfra.process import ManagedProcess
from meterline.localinfra.server import LocalServer

log = logging.getLogger(__name__)

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")  # its manifest's Class-Path names its dependencies
MAIN_CLASS = "org.apache.zookeeper.server.ZooKeeperServerMain"

CONFIG_TEMPLATE = """tickTime=2000
dataDir={data_dir}
clientPort={port}
clientPortAddress={host}
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
"""


def available() -> str | None:
    """None if ZooKeeper can run here, else what is missing (for a skip reason)."""
    if shutil.which("java") is None:
        return "java is not installed (Debian: apt-get install -y zookeeper brings it)"
    if not ZOOKEEPER_JAR.is_file():
        return f"{ZOOKEEPER_JAR} missing: apt-get install -y zookeeper (make install does it as root)"
    return None


def ruok(host: str, port: int, timeout: float = 1.0) -> bool:
    """ZooKeeper's own liveness probe: the four-letter word `ruok` answers `imok`."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"ruok")
        return sock.recv(16) == b"imok"


class LocalZooKeeper(LocalServer):
    """One standalone ZooKeeper over `data_dir` (kept across stop/start)."""

    label = "local ZooKeeper"
    log_kind = "ZooKeeper log"

    def __init__(self, data_dir: str | Path, *, start_timeout: float = 60.0, stop_timeout: float = 10.0) -> None:
        super().__init__(start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.data_dir = Path(data_dir).resolve()
        self.port: int | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "zookeeper.log"

    def _prepare(self) -> None:
        missing = available()
        if missing is not None:
            raise RuntimeError(missing)
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)

    def _new_process(self) -> ManagedProcess:
        self.port = free_port()
        config = self.data_dir / "zoo.cfg"
        config.write_text(CONFIG_TEMPLATE.format(data_dir=self.data_dir / "data", port=self.port, host=HOST))
        return ManagedProcess(
            ["java", "-Xmx256m", "-cp", str(ZOOKEEPER_JAR), f"-Dzookeeper.log.dir={self.data_dir}",
             MAIN_CLASS, str(config)],
            name=f"zookeeper[{self.port}]",
            log_path=self.log_path,
            stop_timeout=self.stop_timeout,
        )

    def _answers(self) -> bool:
        assert self.port is not None
        return ruok(HOST, self.port)

    def _describe(self) -> str:
        return f"local ZooKeeper on {HOST}:{self.port} (log {self.log_path})"

    def _log_ready(self, proc: ManagedProcess) -> None:
        log.info("local ZooKeeper ready on %s:%s (pid %d)", HOST, self.port, proc.pid)
