"""A value reloaded from storage every few seconds in the background: how every process sees new and
revoked API keys and invalidated portal tokens without a restart or a message bus.

Why polling a small table rather than pushing changes: ingest and query processes share nothing but
ClickHouse and Kafka; a reload of a few hundred rows every `interval` seconds costs ~1 ms and bounds
how long a revoked key keeps working. A miss (an unknown key id) may ask for an early reload, at most
every `min_gap` seconds, so a key created a moment ago works on first use without letting random ids
turn into a query per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class ReloadingView(Generic[T]):
    """Holds the last successfully loaded value; `load` is blocking and runs in a worker thread."""

    def __init__(self, load: Callable[[], T], *, interval: float, name: str, min_gap: float = 0.5) -> None:
        self._load = load
        self.interval = interval
        self.min_gap = min_gap
        self.name = name
        self.value: T | None = None
        self.loaded_at = 0.0  # monotonic time of the last successful load
        self._attempted_at = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Load now (one load at a time; callers that waited on a running load reuse its result)."""
        started = time.monotonic()
        async with self._lock:
            if self._attempted_at >= started:
                return
            self._attempted_at = time.monotonic()
            try:
                value = await asyncio.to_thread(self._load)
            except Exception as exc:  # noqa: BLE001 - keep serving the last good value; log once per failure
                log.warning("reloading %s failed (keeping the view from %.0fs ago): %s", self.name,
                            time.monotonic() - self.loaded_at if self.loaded_at else float("nan"), exc)
                return
            self.value = value
            self.loaded_at = time.monotonic()

    async def refresh_after_miss(self) -> None:
        """Reload for a miss, but no sooner than `min_gap` after the last attempt (the caller waits).

        Waiting rather than skipping means a key created a moment ago works on its first use, while a
        flood of unknown ids still costs at most one load per `min_gap` (and each bogus request waits).
        """
        wait = self.min_gap - (time.monotonic() - self._attempted_at)
        if wait > 0:
            await asyncio.sleep(wait)
        await self.refresh()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ReloadingView[T]]:
        """Load once, then keep reloading every `interval` seconds until the block ends."""
        await self.refresh()

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval)
                await self.refresh()

        task = asyncio.create_task(loop(), name=f"reload-{self.name}")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
