"""The API's background-job loop: a failing pass never ends the thread, and stop() is prompt."""

from __future__ import annotations

import threading

from meterline.core.errors import MeterlineError
from meterline.jobs.background import BackgroundLoop


class Flaky(BackgroundLoop):
    """Fails on its first two passes (a known and an unknown error), then counts."""

    def __init__(self, interval: float, run_at_start: bool) -> None:
        super().__init__(interval, run_at_start=run_at_start, join_seconds=5)
        self.passes = 0
        self.third = threading.Event()

    def run_pass(self) -> None:
        self.passes += 1
        if self.passes == 1:
            raise MeterlineError("storage down")
        if self.passes == 2:
            raise RuntimeError("bug")
        self.third.set()


def test_failing_passes_are_retried_and_stop_ends_the_thread() -> None:
    loop = Flaky(0.01, run_at_start=True)
    loop.start()
    assert loop.third.wait(5), "the loop died after a failed pass"
    loop.stop()
    assert loop._thread is not None and not loop._thread.is_alive()
    assert loop.stopping


def test_stop_interrupts_the_first_wait_of_a_delayed_loop() -> None:
    loop = Flaky(3600, run_at_start=False)
    loop.start()
    loop.stop()  # joins for at most join_seconds (5): alive after it means the wait was not interrupted
    assert loop._thread is not None and not loop._thread.is_alive()
    assert loop.passes == 0
