"""One supervised subprocess: started in its own process group, stopped by PID, never leaked.

Why: the local broker and ClickHouse are long-lived children of tests and ``make run``. A crashed test
or a Ctrl-C must not leave them running (they hold ports and, for ClickHouse, a data directory), so
every child is registered for an atexit sweep, gets a GC finalizer, and on Linux is told by the kernel
to die with its parent (``PR_SET_PDEATHSIG``) when started from the main thread.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_live: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGKILL the child when the parent dies (even by SIGKILL, where atexit never runs)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: S110, BLE001 - best effort; the atexit sweep still applies
        pass


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the child's whole process group, but only while the child is still ours.

    ``poll() is None`` means the PID has not been reaped yet, so it cannot have been reused by an
    unrelated process.
    """
    if popen.poll() is not None:
        return
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass


def _group_tasks_stopped(pgid: int) -> bool | None:
    """True when every thread of every process in group `pgid` is stopped ('T'/'t' in /proc), None
    where /proc is missing (not Linux): then nothing can be observed."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # state, ppid, pgrp
                continue
            for task in (entry / "task").iterdir():
                if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "Tt":
                    return False
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return True


def _stop_popen(popen: subprocess.Popen[bytes], timeout: float, name: str) -> None:
    """SIGTERM the group (waking it first if paused), then SIGKILL after ``timeout``; always reap."""
    if popen.poll() is None:
        _signal_group(popen, signal.SIGTERM)
        _signal_group(popen, signal.SIGCONT)  # a SIGSTOPped process only acts on SIGTERM once continued
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.info("%s (pid %d) still running %.1fs after SIGTERM, sending SIGKILL", name, popen.pid, timeout)
            _signal_group(popen, signal.SIGKILL)
            popen.wait()
    else:
        popen.wait()


class ManagedProcess:
    """A child process with start/stop/kill/pause/resume, addressed only by its own PID."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.stop_timeout = stop_timeout
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], float, str], ManagedProcess] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        """True while the child has not exited (a paused child is still running)."""
        return self._popen is not None and self._popen.poll() is None

    def is_alive(self) -> bool:
        """`running` as a callable, for `wait_for(..., alive=proc.is_alive)`."""
        return self.running

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        preexec = (
            _die_with_parent
            if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
            else None
        )
        self._popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: signals never hit the parent, killpg hits all
            preexec_fn=preexec,  # noqa: PLW1509 - only prctl(), which is async-signal-safe
        )
        self._finalizer = weakref.finalize(self, _stop_popen, self._popen, self.stop_timeout, self.name)
        _live.add(self)
        log.info("started %s pid %d (log %s)", self.name, self._popen.pid, self.log_path)

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: SIGTERM, then SIGKILL after ``timeout`` seconds. Safe to call twice."""
        if self._popen is not None:
            _stop_popen(self._popen, self.stop_timeout if timeout is None else timeout, self.name)
            log.info("stopped %s pid %d (rc %s)", self.name, self._popen.pid, self._popen.returncode)
        self._close()

    def kill(self) -> None:
        """Crash on purpose (SIGKILL, no cleanup in the child) for fault tests."""
        if self._popen is not None:
            _signal_group(self._popen, signal.SIGKILL)
            self._popen.wait()
            log.info("killed %s pid %d", self.name, self._popen.pid)
        self._close()

    def pause(self, timeout: float = 5.0) -> None:
        """Freeze the child (SIGSTOP): its sockets stay open but nothing answers, like a hung server.

        Returns once /proc shows every thread of the group stopped: `killpg` only queues the signal,
        and a caller that acts at once (a fault test) must not race a child that still runs.
        """
        if self._popen is None or not self.running:
            raise RuntimeError(f"{self.name} is not running")
        _signal_group(self._popen, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while _group_tasks_stopped(self._popen.pid) is False:  # None: no /proc, nothing to observe
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} (pid {self._popen.pid}) not stopped {timeout:g}s after SIGSTOP")
            time.sleep(0.01)

    def resume(self) -> None:
        """Undo `pause` (SIGCONT)."""
        if self._popen is None or not self.running:
            raise RuntimeError(f"{self.name} is not running")
        _signal_group(self._popen, signal.SIGCONT)

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The end of the child's log, for error messages that say why it did not come up."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def _close(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _live.discard(self)


@atexit.register
def _stop_all() -> None:
    """Last line of defence: stop whatever is still running when the interpreter exits."""
    for proc in list(_live):
        try:
            proc.stop(timeout=2.0)
        except Exception:  # keep stopping the others
            log.exception("could not stop %s", proc.name)
