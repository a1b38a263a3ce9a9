"""A meter answer's `completeUntil`, read from ClickHouse at most once per `max_age_seconds` per process.

Why a cached value is exact: what a value V says -- every event the broker acknowledged before V is written
-- was true when V was read and stays true (written rows stay written). The answer holds it as long as V
was read before the answer's data query started, which `query.routes` ensures by asking for V first. So
a meter query costs no extra round trip for it while queries arrive more often than `max_age_seconds`;
the price is that V may be up to that much older than a fresh read (processors store their progress only
every 5 s, processor/agents.py `LAG_INTERVAL_SECONDS`, so a 1 s older V is rarely a different one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime


class CompleteUntil:
    """The newest `complete_until` read, reused until it is `max_age_seconds` old (0: read every time)."""

    def __init__(self, max_age_seconds: float = 1.0) -> None:
        self.max_age_seconds = max_age_seconds
        self._value: datetime | None = None
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def get(self, read: Callable[[], datetime | None]) -> datetime | None:
        """The cached value, or `read()`'s when it is too old. Age counts from when the read *started*: the
        value is true as of then."""
        if time.monotonic() - self._read_at < self.max_age_seconds:
            return self._value
        with self._lock:
            if time.monotonic() - self._read_at >= self.max_age_seconds:
                started = time.monotonic()
                self._value = read()
                self._read_at = started
            return self._value
