"""A real ClickHouse HTTP server on a free port, backed by embedded chdb, for ``make run`` and tests.

Why: there is no Docker and no ClickHouse binary here, but ``chdb-core`` embeds ClickHouse 26.9; a
subprocess (`meterline.localinfra._chdb_serve`) opens its HTTP listener, so the rest of meterline talks
to it with clickhouse-connect exactly as it would to a production server. The data directory persists
across stop/kill and restart, which the fault tests rely on.

Measured with chdb-core 26.9: ~0.5 s to ``/ping``; servers over different data dirs run side by side;
a second server over the same data dir exits with "Cannot lock file <data_dir>/status" (an flock, so a
kill -9 releases it and a restart reopens the directory with every acknowledged insert); idle CPU <1%.
`url` has no database path; append ``/meterline`` (or a test database) for `Settings.clickhouse_url`.
"""

from __future__ import annotations

import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from meterline.localinfra.ports import HOST, free_port
from meterline.localinfra.process import ManagedProcess
from meterline.localinfra.server import LocalServer

log = logging.getLogger(__name__)

CONFIG_TEMPLATE = """<clickhouse>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>{host}</listen_host>{extra}
</clickhouse>
"""


def ping(url: str, timeout: float = 1.0) -> bool:
    """True if ``GET {url}/ping`` answers ``Ok.`` (ClickHouse's own liveness endpoint)."""
    with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as resp:
        return bool(resp.read().strip() == b"Ok.")


class LocalClickHouse(LocalServer):
    """One chdb-backed ClickHouse server over ``data_dir``; start again after stop/kill to reopen it.

    ``run_dir`` holds ``config.xml`` (read from the server's working directory) and ``server.log``;
    it defaults to a sibling of ``data_dir`` so two servers with different data dirs never share one.
    Data stays in ``data_dir`` across `stop` and `kill`; a later `start` reopens it.
    """

    label = "local ClickHouse"
    log_kind = "server log"

    def __init__(
        self,
        data_dir: str | Path,
        *,
        run_dir: str | Path | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        ports: tuple[int, int] | None = None,
        extra_config: str = "",
    ) -> None:
        super().__init__(start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.data_dir = Path(data_dir).resolve()
        self.run_dir = (
            Path(run_dir).resolve()
            if run_dir is not None
            else self.data_dir.with_name(self.data_dir.name + "-server")
        )
        #: Fixed (http, tcp) ports, e.g. for a cluster whose every node's config names the others' ports.
        self.fixed_ports = ports
        self.http_port: int | None = ports[0] if ports is not None else None
        self.tcp_port: int | None = ports[1] if ports is not None else None
        #: XML appended inside <clickhouse> (a cluster's remote_servers and macros).
        self.extra_config = extra_config
        self._reuse_ports = False

    def restart(self) -> Self:
        """Start again after `stop`/`kill` on the same data dir AND the same ports, as a restarted
        server comes back: processes configured with the old URL reconnect on their own. One attempt,
        since a different port would defeat the purpose."""
        if self.http_port is None:
            raise RuntimeError("LocalClickHouse was never started; use start()")
        self._reuse_ports = True
        try:
            return self.start(attempts=1)
        finally:
            self._reuse_ports = False

    @property
    def url(self) -> str:
        if self.http_port is None:
            raise RuntimeError("LocalClickHouse is not started")
        return f"http://{HOST}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "server.log"

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _new_process(self) -> ManagedProcess:
        if not self._reuse_ports and self.fixed_ports is None:
            self.http_port, self.tcp_port = free_port(), free_port()
            while self.tcp_port == self.http_port:
                self.tcp_port = free_port()
        (self.run_dir / "config.xml").write_text(
            CONFIG_TEMPLATE.format(http_port=self.http_port, tcp_port=self.tcp_port, host=HOST,
                                   extra=self.extra_config)
        )
        return ManagedProcess(
            [sys.executable, "-m", "meterline.localinfra._chdb_serve", str(self.data_dir)],
            name=f"clickhouse[{self.data_dir}]",
            log_path=self.log_path,
            cwd=self.run_dir,
            stop_timeout=self.stop_timeout,
        )

    def _answers(self) -> bool:
        return ping(self.url)

    def _describe(self) -> str:
        return f"local ClickHouse at {self.url} (data {self.data_dir}, log {self.log_path})"

    def _log_ready(self, proc: ManagedProcess) -> None:
        log.info("local ClickHouse ready at %s (pid %d, data %s)", self.url, proc.pid, self.data_dir)
