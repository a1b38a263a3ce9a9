"""A job that repeats in a daemon thread of the API process until it is stopped.

Why one base: the meter controller and the periodic windows compaction run beside the API for as long as
it lives, and both need the same three things done right -- a failed pass is logged and tried again
(never kills the thread), a stop interrupts the wait at once, and the API's shutdown waits for a pass in
progress only a bounded time. Written once here, each job is only its pass.
"""

from __future__ import annotations

import logging
import threading

from meterline.core.errors import MeterlineError

logger = logging.getLogger(__name__)


class BackgroundLoop:
    """Call `run_pass()` every `interval` seconds in a thread named `thread_name` (first at start when
    `run_at_start`, else after one interval). Subclasses implement `run_pass` and read `stopping` inside
    long passes to give up early."""

    thread_name = "background-loop"
    #: What is logged when a pass fails ("... failed; retrying").
    what = "background job"

    def __init__(self, interval: float, *, run_at_start: bool, join_seconds: float = 30.0) -> None:
        self.interval = interval
        self.run_at_start = run_at_start
        self.join_seconds = join_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called: a long pass checks it between its steps."""
        return self._stop.is_set()

    def run_pass(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_seconds)

    def _run(self) -> None:
        if not self.run_at_start and self._stop.wait(self.interval):
            return
        while not self._stop.is_set():
            try:
                self.run_pass()
            except MeterlineError:
                logger.warning("%s failed; retrying", self.what, exc_info=True)
            except Exception:
                logger.exception("%s crashed; retrying", self.what)
            self._stop.wait(self.interval)
