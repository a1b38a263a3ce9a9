"""The processor's view of the meter store: load at start, poll, report what it applies.

Order matters (docs/design.md, "Live meters"): a worker records a heartbeat *before* it first reads the
store, so a rebuild that starts after that read sees this worker and waits until it applies the new
version; from then on every batch it writes carries the building generation too.

A broken config.yaml does not stop a worker whose store has meters: it meters with those and reports the
file (log, `meterline_config_valid`, /readyz `config`) until it is fixed; the meter controller applies the
fixed file and the worker picks it up from the store (`meterline.adapters.config_status`).
"""

from __future__ import annotations

import logging
import time

from meterline.adapters.clickhouse import connect
from meterline.adapters.config_status import ConfigStatus, recheck, start_meters
from meterline.adapters.meter_store import MeterCatalog, MeterStore
from meterline.core.errors import MeterlineError
from meterline.settings import Settings

logger = logging.getLogger(__name__)


class LiveMeters:
    """One worker's catalog, heartbeat and staleness clock."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        assert settings.clickhouse_url is not None
        self.settings = settings
        self.worker_id = worker_id
        self.client = connect(settings.clickhouse_url, database=settings.clickhouse_database,
                              topology=settings.clickhouse_topology)
        self.store = MeterStore(self.client, settings.clickhouse_database,
                                topology=settings.clickhouse_topology)
        self.catalog = MeterCatalog(self.store)
        self.applied: dict[str, int] = {}
        self.config = ConfigStatus(settings.config_file)
        self._last_ok = 0.0

    def start(self) -> None:
        """Register, sync config.yaml if it is newer than the store's copy, load, report.

        ConfigError only for a broken file on a first start (no meter in the store)."""
        self.store.heartbeat(self.worker_id, {})
        self.config = start_meters(self.catalog, self.settings, actor=f"processor:{self.worker_id}")
        self.applied = self.catalog.applied()
        self._last_ok = time.monotonic()
        self.beat()

    def refresh(self) -> bool:
        recheck(self.config)
        changed = self.catalog.refresh()
        self._last_ok = time.monotonic()
        return changed

    def stale(self) -> bool:
        return time.monotonic() - self._last_ok > self.settings.meter_worker_ttl_seconds / 2

    def beat(self) -> None:
        try:
            self.store.heartbeat(self.worker_id, self.applied)
        except MeterlineError:
            logger.warning("meter heartbeat failed", exc_info=True)

    def stop(self) -> None:
        try:
            self.store.forget_worker(self.worker_id)
        except MeterlineError:
            pass
        self.client.close()
