"""The lifecycle shared by the local servers (`LocalBroker`, `LocalClickHouse`).

Why a base class: both are one `ManagedProcess` on freshly picked free ports, and a port can be taken
between picking it and the child binding it, so both start the same way: spawn, wait until the server
answers, and on failure kill it and try again on new ports. Stopping, crashing and freezing are the
same signals for both. A subclass says only how to spawn its process and how to tell it is ready.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from types import TracebackType
from typing import ClassVar, Self

from meterline.localinfra.ports import NotReadyError, wait_for
from meterline.localinfra.process import ManagedProcess

log = logging.getLogger(__name__)


class Started(ABC):
    """Something the dev stack starts and stops as a whole; `with` starts it and stops it even on failure.

    Servers, the ClickHouse cluster and the whole `LocalStack` are all used this way by tests and
    `meterline run`, so the context-manager half is written once here.
    """

    @abstractmethod
    def start(self) -> Self:
        """Start everything and return self once it answers."""

    @abstractmethod
    def stop(self) -> None:
        """Stop everything that runs (by PID); never raises for what is already down."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalServer(Started):
    """One local server subprocess with start (retried on new ports), stop, kill, pause and resume."""

    label: ClassVar[str]
    """What log lines call the server, e.g. ``"local broker"``."""
    log_kind: ClassVar[str]
    """What the final start error calls the child's log, e.g. ``"broker log"``."""

    def __init__(self, *, start_timeout: float, stop_timeout: float) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: ManagedProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def _prepare(self) -> None:
        """Once per `start`, before the first attempt."""

    @abstractmethod
    def _new_process(self) -> ManagedProcess:
        """Pick fresh ports and build (not start) the child for one start attempt."""

    @abstractmethod
    def _answers(self) -> bool:
        """True once the started child serves requests (exceptions count as "not yet")."""

    @abstractmethod
    def _describe(self) -> str:
        """The server in a "did not come up" error: where it listens and where its log is."""

    @abstractmethod
    def _log_ready(self, proc: ManagedProcess) -> None:
        """Log that ``proc`` is ready, with what a reader needs to connect to it."""

    def start(self, attempts: int = 3) -> Self:
        """Start on free ports and wait until the server answers; retry if a port was taken meanwhile."""
        if self.running:
            raise RuntimeError(f"{type(self).__name__} already running (pid {self.pid})")
        self._prepare()
        for attempt in range(1, attempts + 1):
            proc = self._new_process()
            self._proc = proc
            proc.start()
            try:
                wait_for(self._answers, self.start_timeout, self._describe(), alive=proc.is_alive)
            except NotReadyError as exc:
                proc.kill()
                if attempt == attempts:
                    # The log says why, e.g. ClickHouse's "Cannot lock file .../status" (data dir in use).
                    raise NotReadyError(f"{exc}; {self.log_kind} tail:\n{proc.log_tail(2000)}") from exc
                log.warning("%s did not come up (attempt %d), retrying", self.label, attempt)
                continue
            self._log_ready(proc)
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Graceful stop: SIGTERM, then SIGKILL after ``stop_timeout``. Safe to call twice."""
        if self._proc is not None:
            self._proc.stop()

    def kill(self) -> None:
        """Crash the server (SIGKILL, no cleanup in the child) for fault tests."""
        if self._proc is not None:
            self._proc.kill()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): clients see timeouts and hanging connections, not refusals."""
        if self._proc is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        self._proc.pause()

    def resume(self) -> None:
        """Undo `pause` (SIGCONT)."""
        if self._proc is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        self._proc.resume()
