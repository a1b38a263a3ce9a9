"""Which closed months have coarse (15-minute) rows, as this query process last read it.

Windows compaction records in `window_compactions` the fingerprint of each month it swapped coarse rows in
for (docs/design.md, "Coarse rows"). Reading that table on every meter query would cost a round trip, so
it is read at most every `refresh_seconds`: a stale copy can only cost speed, never exactness, because
each query reads the months' current fingerprints first and compares them with the ones given here
(query/store.py), reading a month's minute rows when they differ.
"""

from __future__ import annotations

import threading
import time

from clickhouse_connect.driver.client import Client

from meterline.adapters.compactions import read_claims
from meterline.core.compaction import coarse_fingerprints


class CoarseMonths:
    """Partition -> the fingerprint its coarse rows were built for, reloaded every `refresh_seconds`."""

    def __init__(self, refresh_seconds: float = 5.0, *, enabled: bool = True) -> None:
        self.refresh_seconds = refresh_seconds
        #: False: every query reads minute rows (the bench's A/B of the two paths on the same data).
        self.enabled = enabled
        self._fingerprints: dict[str, int] = {}
        self._loaded = float("-inf")
        self._lock = threading.Lock()

    def fingerprints(self, client: Client, database: str) -> dict[str, int]:
        if not self.enabled:
            return {}
        if time.monotonic() - self._loaded >= self.refresh_seconds:
            with self._lock:
                if time.monotonic() - self._loaded >= self.refresh_seconds:
                    self._fingerprints = coarse_fingerprints(read_claims(client, database))
                    self._loaded = time.monotonic()
        return self._fingerprints

    def reload(self) -> None:
        """Read the records again on the next query (tests, and the bench right after compacting)."""
        self._loaded = float("-inf")
