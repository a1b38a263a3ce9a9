"""Which closed months have coarse (15-minute) rows, as this query process last read it.

Windows compaction records in `window_compactions` the fingerprint of each month it swapped coarse rows in
for (docs/design.md, "Coarse rows"). Reading that table on every meter query would cost a round trip, so
it is read every `refresh_seconds` (with the months' current fingerprints: a month whose fingerprint
moved is left out, even if the write bypassed the fence that marks it invalid). The query API reads it in
the background (`keep_fresh`), so no request pays those two round trips (they made the p95 of a
compacted month's query 22-29 ms against ~10 ms); a request reads it itself only on the first query, after
`reload()`, or when the copy is three refreshes old (the refresher failing: the bypass safety net
keeps its bound). A stale copy can only cost speed, never exactness, because
each query's own SQL checks that the month is still marked valid for that fingerprint
(`query.sql._valid`) and fails before reading anything if not; the query API then reads that month's
minute rows (query/store.py) and remembers the pair here as `stale`: a month's mark never returns to a
fingerprint it left (0 until the next compaction, whose fingerprint is a new, larger one), so the pair is
left out of every later plan without asking ClickHouse again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from clickhouse_connect.driver.client import Client

from meterline.adapters.compactions import partition_fingerprints, read_claims
from meterline.core.compaction import coarse_fingerprints

log = logging.getLogger(__name__)


class CoarseMonths:
    """Partition -> the fingerprint its coarse rows were built for, reloaded every `refresh_seconds` (by
    `keep_fresh` when it runs, else by the query that finds the copy that old), without the (partition,
    fingerprint) pairs a query found no longer valid."""

    def __init__(self, refresh_seconds: float = 5.0, *, enabled: bool = True) -> None:
        self.refresh_seconds = refresh_seconds
        #: False: every query reads minute rows (a cluster, where compaction is refused; and the bench's A/B
        #: of the two paths on the same data).
        self.enabled = enabled
        self._fingerprints: dict[str, int] = {}
        self._stale: set[tuple[str, int]] = set()
        self._loaded = float("-inf")
        self._lock = threading.Lock()
        #: True while `keep_fresh` runs: queries then leave the reloads to it.
        self.background = False

    def fingerprints(self, client: Client, database: str) -> dict[str, int]:
        if not self.enabled:
            return {}
        if time.monotonic() - self._loaded >= self._max_age():
            self.refresh(client, database, older_than=self._max_age())
        found = self._fingerprints
        if self._stale:
            found = {p: fp for p, fp in found.items() if (p, fp) not in self._stale}
        return found

    def _max_age(self) -> float:
        return 3 * self.refresh_seconds if self.background else self.refresh_seconds

    def refresh(self, client: Client, database: str, *, older_than: float = 0.0) -> None:
        """Read the done records and the months' fingerprints now (unless a copy younger than `older_than`
        seconds was read meanwhile by another thread)."""
        with self._lock:
            if time.monotonic() - self._loaded < older_than:
                return
            built_for = coarse_fingerprints(read_claims(client, database))
            # A safety net for a write that bypassed the fence (which marks the month invalid): its
            # month's fingerprint moved, so it stops answering from coarse rows within a reload.
            current = partition_fingerprints(client, database, list(built_for))
            self._fingerprints = {p: fp for p, fp in built_for.items() if current.get(p) == fp}
            self._stale &= set(self._fingerprints.items())  # pairs no record names any more: gone
            self._loaded = time.monotonic()

    async def keep_fresh(self, client: Client, database: str) -> None:
        """Reload every `refresh_seconds` until cancelled (a task of the query API's lifespan), off the
        requests' path. A failed reload is logged and tried again; meanwhile queries reload themselves once
        the copy is three refreshes old."""
        if not self.enabled:
            return
        self.background = True
        try:
            while True:
                try:
                    await asyncio.to_thread(self.refresh, client, database)
                except Exception:
                    log.warning("reading the compaction records failed", exc_info=True)
                await asyncio.sleep(self.refresh_seconds)
        finally:
            self.background = False

    def stale(self, partition: str, fingerprint: int) -> None:
        """A query found `partition` no longer marked valid for `fingerprint`: never plan that pair again."""
        with self._lock:
            self._stale.add((partition, fingerprint))

    def reload(self) -> None:
        """Read the records again on the next query (tests, and the bench right after compacting)."""
        self._loaded = float("-inf")
