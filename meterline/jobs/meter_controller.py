"""The meter controller: hot-reloads config.yaml, rebuilds new generations, switches, cleans up.

It runs as a background thread of the API process (wired by `meterline.server`) and drives each meter
through the states recorded in `meter_rebuilds` (durable, so a restarted controller resumes):

    waiting   a new generation exists; some live worker has not applied it yet
    running   every live worker writes it; stored events are being replayed into it (events done/total)
    built     the history is complete (the activate record may not be written yet)
    clean     activated and the other generations' rows are gone (or, for a delete, every row is gone)

Why wait for the workers first: an event stored before a worker applied the new generation has no rows
of it from the live path, so the rebuild must see it; one stored after has. Starting the scan only once
every live worker applied the version makes the two sets cover every event (docs/design.md).

Every step is idempotent: a crash at any point repeats the step with the same deterministic rows.
It drives every namespace's meters; each step touches only the rows of the meter's own namespace.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from clickhouse_connect.driver.client import Client
from prometheus_client import Counter

from meterline.adapters.clickhouse import mutate, storage_errors
from meterline.adapters.compactions import fenced_writes
from meterline.adapters.config_status import CONFIG_ERRORS, CONFIG_RELOADS, ConfigStatus
from meterline.adapters.meter_store import MeterCatalog, Progress, applied_key
from meterline.core.access import DEFAULT_NAMESPACE
from meterline.core.errors import ConfigError, MeterlineError
from meterline.core.meter_records import MeterState
from meterline.core.schema import DEAD_LETTERS, METER_WINDOWS, SINGLE_NODE, Topology, mutation_target
from meterline.jobs.background import BackgroundLoop
from meterline.jobs.recompute import Abandoned, count_query, recompute

logger = logging.getLogger(__name__)

REBUILT_EVENTS = Counter("meterline_rebuild_events_total", "stored events replayed into new meter generations")

PROGRESS_EVERY_SECONDS = 0.5


class MeterController(BackgroundLoop):
    """One loop; `step()` does one pass (tests call it directly), `start()` runs it in a thread."""

    thread_name = "meter-controller"
    what = "meter controller step"

    def __init__(self, catalog: MeterCatalog, client: Client, database: str, *, config_file: str | None,
                 poll_seconds: float = 1.0, worker_ttl_seconds: float = 15.0, window_seconds: int = 60,
                 owner: str = "", topology: Topology = SINGLE_NODE) -> None:
        super().__init__(poll_seconds, run_at_start=True)
        self.topology = topology
        self.catalog = catalog
        self.client = client
        self.database = database
        self.config = ConfigStatus(str(config_file)) if config_file else None
        self.poll_seconds = poll_seconds
        self.worker_ttl_seconds = worker_ttl_seconds
        self.window_seconds = window_seconds
        self.owner = owner or f"controller-{os.getpid()}"

    def run_pass(self) -> None:
        self.step()

    # -- one pass --------------------------------------------------------------------------------
    def step(self) -> None:
        self.reload_config()
        self.catalog.refresh()
        progress = self.catalog.store.progress()
        failed: MeterlineError | None = None
        for (ns, slug), state in sorted(self.catalog.states.items()):
            if self.stopping:
                return
            try:
                if state.deleted:
                    self._purge(state, progress)
                elif state.building is not None:
                    self._build(state, progress)
                elif state.latest.active_generation:
                    self._clean(state, progress)
            except MeterlineError as exc:  # one meter's failing step must not hold up the others' builds
                logger.warning("meter step failed; retrying next pass", extra={"namespace": ns, "meter": slug},
                               exc_info=True)
                failed = failed or exc
        self.catalog.refresh_progress()
        if failed is not None:
            raise failed

    def reload_config(self) -> None:
        """Apply config.yaml when its mtime moved; an invalid file keeps the last good meters."""
        status = self.config
        if status is None:
            return
        path = Path(status.path)
        if not path.exists():  # meters then come only through the API (and the settings given in code)
            status.mark_valid("no config file")
            return
        try:
            mtime = path.stat().st_mtime
        except OSError as exc:
            status.mark_invalid(f"cannot read: {exc.strerror or exc}")
            return
        if mtime == status.mtime:
            return
        try:
            status.problems = self.catalog.sync_file(path, only_if_newer=status.mtime is None)
        except ConfigError as exc:
            status.mtime = mtime
            status.mark_invalid(str(exc))
            CONFIG_ERRORS.inc()
            logger.error("config.yaml is invalid; NOT applied, keeping the last good meters:\n%s", exc)
            return
        first = status.mtime is None
        status.mtime = mtime
        status.mark_valid()
        if not first:
            CONFIG_RELOADS.inc()
            logger.info("config.yaml reloaded", extra={"path": str(path)})
        for problem in status.problems:
            logger.warning("config meter not applied: %s", problem)

    # -- workers ---------------------------------------------------------------------------------
    def workers_applied(self, state: MeterState, version: int) -> bool:
        """Every live worker applies `version` (or later) of this meter."""
        key = applied_key(state.latest.namespace, state.slug)
        workers = self.catalog.store.live_workers(self.worker_ttl_seconds)
        return all(applied.get(key, 0) >= version for applied in workers.values())

    def wait_workers(self, state: MeterState, version: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.workers_applied(state, version):
            if time.monotonic() > deadline or self.stopping:
                return False
            time.sleep(0.2)
        return True

    # -- build, switch, clean --------------------------------------------------------------------
    def _build(self, state: MeterState, progress: dict[tuple[str, str, int], Progress]) -> None:
        assert state.building is not None
        ns, slug, generation = state.latest.namespace, state.slug, state.latest.generation
        known = progress.get((ns, slug, generation))
        if known is None or known.state not in ("built", "clean"):
            if not self.workers_applied(state, generation):
                if known is None:
                    self.catalog.store.set_progress(ns, slug, generation, "waiting", 0, 0, self.owner)
                return
            if not self.rebuild(state):
                return
        if self.catalog.activate(ns, slug, generation, actor=self.owner):
            logger.info("meter switched to its rebuilt generation",
                        extra={"namespace": ns, "meter": slug, "generation": generation})

    def rebuild(self, state: MeterState, on_progress: Callable[[int, int], None] | None = None) -> bool:
        """Replay stored events into the building generation; False if the meter moved on meanwhile."""
        assert state.building is not None
        ns, slug, generation, meter = state.latest.namespace, state.slug, state.latest.generation, state.building.meter
        store = self.catalog.store
        with storage_errors():
            sql, params = count_query(self.database, meter, ns)
            total = int(self.client.query(sql, parameters=params).result_rows[0][0])
        done = 0
        last = 0.0
        store.set_progress(ns, slug, generation, "running", 0, total, self.owner)
        logger.info("rebuilding meter history",
                    extra={"namespace": ns, "meter": slug, "generation": generation, "events": total})

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            REBUILT_EVENTS.inc(n)
            if on_progress is not None:
                on_progress(done, total)
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_SECONDS:
                last = now
                current = self.catalog.states.get((ns, slug))
                if self.stopping or current is None or current.latest.generation != generation:
                    raise Abandoned(slug)
                store.set_progress(ns, slug, generation, "running", done, max(total, done), self.owner)

        try:
            recompute(self.client, self.database, meter, window_seconds=self.window_seconds,
                      on_progress=advance, generation=generation, clear=False, topology=self.topology,
                      namespace=ns)
        except Abandoned:
            logger.info("rebuild abandoned: the meter changed or the controller stops", extra={"meter": slug})
            return False
        store.set_progress(ns, slug, generation, "built", done, max(total, done), self.owner)
        return True

    def _drop(self, namespace: str, slug: str, condition: str, generation: int) -> None:
        """Delete rows of one namespace's meter (another namespace's meter of the same slug is untouched)."""
        # A delete racing a compaction's swap would be undone by it (the merged parts are new parts).
        with storage_errors(), fenced_writes(self.client, self.database, "meter-controller",
                                             enabled=self.topology.cluster is None):
            for table in (METER_WINDOWS, DEAD_LETTERS):
                mutate(
                    self.client,
                    f"DELETE FROM {mutation_target(self.database, table, self.topology)}"
                    f" WHERE namespace = {{ns:String}} AND meter = {{m:String}} AND {condition}",
                    topology=self.topology, parameters={"ns": namespace, "m": slug, "g": generation},
                    settings={"mutations_sync": 2},
                )

    def clean(self, slug: str, timeout: float, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Wait (up to `timeout`) until workers applied the switch, then drop the other generations."""
        self.catalog.refresh()
        state = self.catalog.states[(namespace, slug)]
        if not self.wait_workers(state, state.latest.version, timeout):
            return False
        self._clean(state, self.catalog.store.progress())
        return True

    def _clean(self, state: MeterState, progress: dict[tuple[str, str, int], Progress]) -> None:
        """After a switch, drop the other generations once no worker writes them any more."""
        ns, slug, generation = state.latest.namespace, state.slug, state.latest.active_generation
        known = progress.get((ns, slug, generation))
        if known is not None and known.state == "clean":
            return
        if not self.workers_applied(state, state.latest.version):
            return
        self._drop(ns, slug, "generation != {g:UInt64}", generation)
        done = known.done if known else 0
        self.catalog.store.set_progress(ns, slug, generation, "clean", done, known.total if known else done,
                                        self.owner)

    def _purge(self, state: MeterState, progress: dict[tuple[str, str, int], Progress]) -> None:
        """A deleted meter's rows go once no worker writes them (a re-created slug has higher generations)."""
        ns, slug, version = state.latest.namespace, state.slug, state.latest.version
        known = progress.get((ns, slug, version))
        if known is not None and known.state == "clean":
            return
        if not self.workers_applied(state, version):
            return
        self._drop(ns, slug, "generation < {g:UInt64}", version)
        self.catalog.store.set_progress(ns, slug, version, "clean", 0, 0, self.owner)
        logger.info("deleted meter's windows dropped", extra={"namespace": ns, "meter": slug})
