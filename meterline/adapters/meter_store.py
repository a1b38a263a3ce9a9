"""The durable meter store (ClickHouse `meter_versions`) and the in-memory catalog every process keeps.

`MeterStore` runs the SQL: records, a cheap change fingerprint, rebuild progress and worker heartbeats.
`MeterCatalog` holds the last loaded states, refreshes them when the fingerprint moves, and applies
changes (API and config.yaml) through the pure rules of `meterline.core.meter_records`, one at a time per
process (a lock), so a process always sees its own change at once (docs/design.md, "Live meters").

Meters belong to a namespace (docs/design.md, "Tenants"): a process loads every namespace's meters (the
processor meters every tenant's events, the controller rebuilds every tenant's meters), and every
method an API request reaches takes the caller's namespace, so one tenant can neither see nor change
another's meter, and each may use any slug. config.yaml's meters belong to the default namespace.

Across processes there is no lock: each change is appended as the meter's next version with
compare-and-set semantics (`MeterStore.append`), and a change that lost the version to another writer is
recomputed on the newer state (or refused, when the caller named the version it read: HTTP If-Match).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
from clickhouse_connect.driver.client import Client
from ulid import ULID

from meterline.adapters.clickhouse import mutate, storage_errors
from meterline.core import meter_records as mr
from meterline.core.errors import MeterBuildingError, MeterConflictError, MeterNotFoundError
from meterline.core.meter_records import API, DEFAULT_NAMESPACE, MeterRecord, MeterState
from meterline.core.meters import Meter, MeterSet, load_meters
from meterline.core.schema import (
    METER_REBUILDS,
    METER_VERSIONS,
    METER_WORKERS,
    SINGLE_NODE,
    Topology,
    mutation_target,
    qualified,
)
from meterline.settings import Settings

logger = logging.getLogger(__name__)

REBUILD_COLUMNS = ("namespace", "slug", "generation", "state", "events_done", "events_total", "owner", "updated_at")


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the rebuild of one generation got (`state`: waiting, running, done, abandoned)."""

    state: str
    done: int
    total: int
    owner: str
    updated_at: datetime


def _now() -> datetime:
    return datetime.now(UTC)


class MeterStore:
    """SQL of the meter tables on one client (guarded by a lock: the client is shared by threads)."""

    def __init__(self, client: Client, database: str, topology: Topology = SINGLE_NODE) -> None:
        self.client = client
        self.database = database
        self.topology = topology
        self._lock = threading.Lock()

    def _query(self, sql: str, **params: Any) -> Any:
        with self._lock, storage_errors():
            return self.client.query(sql, parameters=params)

    def _insert(self, table: str, rows: list[list[Any]], columns: Sequence[str]) -> None:
        with self._lock, storage_errors():
            self.client.insert(qualified(self.database, table), rows, column_names=list(columns),
                               settings={"async_insert": 0})

    def fingerprint(self) -> tuple[int, int]:
        """Changes whenever a record is added (count and sum of versions, every namespace)."""
        r = self._query(f"SELECT count(), sum(version) FROM {qualified(self.database, METER_VERSIONS)} FINAL")
        count, total = r.result_rows[0]
        return int(count), int(total or 0)

    def records(self) -> list[MeterRecord]:
        r = self._query(f"SELECT {', '.join(mr.RECORD_COLUMNS)} FROM {qualified(self.database, METER_VERSIONS)}"
                        " FINAL ORDER BY namespace, slug, version")
        return [mr.from_row(dict(zip(r.column_names, row, strict=True))) for row in r.result_rows]

    def append(self, record: MeterRecord) -> bool:
        """Store `record` as its meter's version `record.version` unless that version is taken; True if
        the stored version is this record.

        ClickHouse has no transactions, so the version number is the lock: the insert's
        insert_deduplication_token names (namespace, slug, version), and meter_versions keeps a
        deduplication window (core/schema.py), so when two writers computed the same next version only
        the first insert is stored and the second is dropped as a duplicate (a retried insert of the
        same record likewise). Reading the version back then tells each writer whether it won.
        """
        token = orjson.dumps([record.namespace, record.slug, record.version]).decode()
        with self._lock, storage_errors():
            self.client.insert(qualified(self.database, METER_VERSIONS), [mr.to_row(record)],
                               column_names=list(mr.RECORD_COLUMNS),
                               settings={"async_insert": 0, "insert_deduplicate": 1,
                                         "insert_deduplication_token": token})
        stored = self.record_at(record.namespace, record.slug, record.version)
        return stored is not None and mr.to_row(stored) == mr.to_row(record)

    def record_at(self, namespace: str, slug: str, version: int) -> MeterRecord | None:
        r = self._query(f"SELECT {', '.join(mr.RECORD_COLUMNS)} FROM {qualified(self.database, METER_VERSIONS)}"
                        " FINAL WHERE namespace = {ns:String} AND slug = {slug:String} AND version = {v:UInt64}",
                        ns=namespace, slug=slug, v=version)
        rows = [mr.from_row(dict(zip(r.column_names, row, strict=True))) for row in r.result_rows]
        return rows[0] if rows else None

    def progress(self) -> dict[tuple[str, str, int], Progress]:
        """Rebuild progress by (namespace, slug, generation)."""
        r = self._query(f"SELECT namespace, slug, generation, state, events_done, events_total, owner, updated_at"
                        f" FROM {qualified(self.database, METER_REBUILDS)} FINAL")
        return {(ns, s, int(g)): Progress(st, int(d), int(t), o, u) for ns, s, g, st, d, t, o, u in r.result_rows}

    def set_progress(self, namespace: str, slug: str, generation: int, state: str, done: int, total: int,
                     owner: str) -> None:
        self._insert(METER_REBUILDS, [[namespace, slug, generation, state, done, total, owner, _now()]],
                     REBUILD_COLUMNS)

    def heartbeat(self, worker: str, applied: dict[str, int]) -> None:
        """Record which meter versions `worker` applies (keys are `namespace/slug`)."""
        self._insert(METER_WORKERS, [[worker, applied, _now()]], ("worker", "applied", "seen_at"))

    def live_workers(self, ttl_seconds: float) -> dict[str, dict[str, int]]:
        r = self._query(f"SELECT worker, applied FROM {qualified(self.database, METER_WORKERS)} FINAL"
                        " WHERE seen_at >= now64(6) - toIntervalMillisecond({ms:UInt64})", ms=int(ttl_seconds * 1000))
        return {w: {k: int(v) for k, v in a.items()} for w, a in r.result_rows}

    def forget_worker(self, worker: str) -> None:
        """A worker that stops cleanly stops counting at once (instead of after its TTL)."""
        with self._lock, storage_errors():
            mutate(self.client, f"DELETE FROM {mutation_target(self.database, METER_WORKERS, self.topology)}"
                   " WHERE worker = {w:String}", topology=self.topology, parameters={"w": worker})


class _LostVersion(Exception):  # a signal between _apply and _retrying, never raised out of the catalog
    """Another writer stored the version this change computed first (`MeterStore.append`)."""

    def __init__(self, slug: str, version: int) -> None:
        self.slug = slug
        self.version = version
        super().__init__(f"{slug} version {version}")


#: How often a change is recomputed after losing its version before it is refused (409): each loss means
#: another change of the same meter landed in between, so this many in a row is a hot spot, not a race.
CHANGE_ATTEMPTS = 8

_Change = TypeVar("_Change", bound=Callable[..., Any])


def _retrying(change: _Change) -> _Change:
    """Re-run a catalog change on the newer state when another writer took its version.

    The change is then applied on top of the other one (without If-Match the later writer wins, as in
    one process, but no version is ever written twice and neither change is silently dropped), or
    refused by a check inside it that the newer state fails (If-Match, slug taken, meter deleted).
    """

    @functools.wraps(change)
    def run(self: MeterCatalog, *args: Any, **kwargs: Any) -> Any:
        lost: _LostVersion | None = None
        for _ in range(CHANGE_ATTEMPTS):
            try:
                return change(self, *args, **kwargs)
            except _LostVersion as exc:
                lost = exc
                logger.info("meter change lost its version to another writer; recomputing on the newer state",
                            extra={"meter": exc.slug, "version": exc.version})
        assert lost is not None
        raise MeterConflictError(lost.slug, f"meter {lost.slug!r} kept changing under this change "
                                 f"({CHANGE_ATTEMPTS} attempts lost the version to other writers): try again")

    return cast(_Change, run)


def applied_key(namespace: str, slug: str) -> str:
    return f"{namespace}/{slug}"


def file_tag(path: str | Path) -> str:
    """`managed_by` of meters synced from a config file: the file's absolute path."""
    return f"file:{Path(path).resolve()}"


class MeterCatalog:
    """The meters as this process knows them; `refresh` reloads when the store changed."""

    def __init__(self, store: MeterStore) -> None:
        self.store = store
        self._lock = threading.RLock()
        self._fingerprint: tuple[int, int] | None = None
        self._states: dict[tuple[str, str], MeterState] = {}
        self._progress: dict[tuple[str, str, int], Progress] = {}
        self.listeners: list[Callable[[], None]] = []

    # -- reading ---------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> bool:
        """Reload the states if the store changed (or `force`); True if they changed."""
        fingerprint = self.store.fingerprint()
        with self._lock:
            if not force and fingerprint == self._fingerprint:
                return False
            records = self.store.records()
            self._states = mr.derive_states(records)
            self._fingerprint = fingerprint
        for listener in self.listeners:
            listener()
        return True

    def refresh_progress(self) -> None:
        self._progress = self.store.progress()

    @property
    def states(self) -> dict[tuple[str, str], MeterState]:
        """Every namespace's meters by (namespace, slug): for the processor and the controller, never
        for an API request (those read `in_namespace`)."""
        return self._states

    def in_namespace(self, namespace: str) -> dict[str, MeterState]:
        """One namespace's meters by slug."""
        return {slug: s for (ns, slug), s in self._states.items() if ns == namespace}

    def applied(self) -> dict[str, int]:
        """`{namespace/slug: version}` of every meter as loaded: what a worker reports it applies."""
        return {applied_key(ns, slug): s.latest.version for (ns, slug), s in self._states.items()}

    def meter_set(self) -> MeterSet:
        """Every live generation (active and building) of every namespace, for the processor's row builder."""
        meters: list[Meter] = []
        generations: list[int] = []
        namespaces: list[str] = []
        for (ns, _), state in self._states.items():
            for meter, generation in mr.live_meters([state]):
                meters.append(meter)
                generations.append(generation)
                namespaces.append(ns)
        return MeterSet(meters, generations, namespaces)

    def find(self, id_or_slug: str, *, namespace: str, include_deleted: bool = False) -> MeterState:
        """`namespace`'s meter by slug or id. Another namespace's meter is not found, exactly as a meter
        that does not exist, so the answer never tells whether another tenant has it."""
        state = self._states.get((namespace, id_or_slug))
        if state is None:
            state = next((s for (ns, _), s in self._states.items()
                          if ns == namespace and s.latest.id == id_or_slug and not s.deleted), None)
        if state is None or (state.deleted and not include_deleted):
            raise MeterNotFoundError(id_or_slug)
        return state

    def queryable(self, id_or_slug: str, *, namespace: str) -> tuple[Meter, int]:
        """The definition and generation a query answers from; 503-worthy while a new meter builds."""
        state = self.find(id_or_slug, namespace=namespace)
        if state.active is None:
            progress = self._progress.get((namespace, state.slug, state.latest.generation))
            raise MeterBuildingError(state.slug, progress.done if progress else 0, progress.total if progress else 0)
        return state.active.meter, state.latest.active_generation

    def progress(self, namespace: str, slug: str, generation: int) -> Progress | None:
        return self._progress.get((namespace, slug, generation))

    # -- changing --------------------------------------------------------------------------------
    def _apply(self, record: MeterRecord | None) -> MeterRecord | None:
        """Append `record`; _LostVersion if another writer took its version first (see `_retrying`)."""
        if record is not None:
            won = self.store.append(record)
            self.refresh(force=True)
            if not won:
                raise _LostVersion(record.slug, record.version)
        return record

    @_retrying
    def create(self, meter: Meter, *, namespace: str, name: str | None, metadata: dict[str, str] | None,
               actor: str) -> MeterState:
        with self._lock:
            self.refresh()
            prev = self._states.get((namespace, meter.slug))
            record = mr.create(prev, meter, namespace=namespace, id=str(ULID()), name=name, metadata=metadata,
                               managed_by=API, actor=actor, now=_now())
            self._apply(record)
            return self._states[(namespace, meter.slug)]

    def _writable(self, state: MeterState) -> None:
        if state.latest.managed_by != API:
            path = state.latest.managed_by.removeprefix("file:")
            raise MeterConflictError(state.slug, f"meter {state.slug!r} is managed by the config file {path}: "
                                     "change it there", state.latest.managed_by)

    @_retrying
    def update(self, id_or_slug: str, change: dict[str, Any], *, namespace: str, actor: str,
               expected_version: Collection[int] | None = None) -> MeterState:
        """Apply a MeterUpdate (`change`: snake_case fields that were given), if the meter is still at one
        of `expected_version` (the version the caller read; None: whatever is newest)."""
        with self._lock:
            self.refresh()
            state = self.find(id_or_slug, namespace=namespace)
            self._writable(state)
            mr.check_version(state, expected_version)
            last = state.latest
            fields = last.meter.model_dump()
            for key in ("description", "group_by", "event_type", "event_from", "aggregation", "value_property"):
                if key in change:
                    fields[key] = change[key]
            if change.get("aggregation") == "COUNT" and "value_property" not in change:
                fields["value_property"] = None
            meter = mr.build_meter(fields)
            metadata = change.get("metadata", last.metadata)
            self._apply(mr.update(state, meter, name=change.get("name"), metadata=metadata, actor=actor, now=_now()))
            return self._states[(namespace, state.slug)]

    @_retrying
    def delete(self, id_or_slug: str, *, namespace: str, actor: str,
               expected_version: Collection[int] | None = None) -> None:
        with self._lock:
            self.refresh()
            state = self.find(id_or_slug, namespace=namespace)
            self._writable(state)
            mr.check_version(state, expected_version)
            self._apply(mr.delete(state, actor=actor, now=_now()))

    @_retrying
    def activate(self, namespace: str, slug: str, generation: int, *, actor: str) -> bool:
        """Switch queries to `generation` if the meter still wants it; True if switched."""
        with self._lock:
            self.refresh()
            state = self._states.get((namespace, slug))
            if state is None:
                return False
            return self._apply(mr.activate(state, generation, actor=actor, now=_now())) is not None

    def sync_file(self, path: str | Path, *, only_if_newer: bool = False, actor: str = "") -> list[str]:
        """Make the meters managed by config file `path` equal its `meters:` list.

        Raises ConfigError (nothing applied) for an invalid file. Returns the problems of meters that
        could not be applied (a slug owned by the API). With `only_if_newer`, a file whose mtime is not
        newer than the last one synced from it is left alone, so a stale copy never reverts a change.
        """
        mtime = os.stat(path).st_mtime
        return self.sync_meters(load_meters(path), path, mtime, only_if_newer=only_if_newer, actor=actor)

    def sync_settings(self, settings: Settings, actor: str = "") -> list[str]:
        """At startup: the meters `settings` carry (config.yaml's, or given in code), as that file's, unless
        the store already has a newer sync of it. ConfigError for invalid meters."""
        path = Path(settings.config_file)
        mtime = path.stat().st_mtime if path.exists() else 0.0
        return self.sync_meters(settings.meters(), path, mtime, only_if_newer=True, actor=actor)

    def sync_meters(self, meters: Sequence[Meter], path: str | Path, mtime: float, *, only_if_newer: bool = False,
                    actor: str = "") -> list[str]:
        """`sync_file` with the meters already read, into the default namespace (a config file is the
        operator's, not a tenant's: tenants manage their meters through the API with an admin key)."""
        tag = file_tag(path)
        problems: list[str] = []
        with self._lock:
            self.refresh()
            states = self.in_namespace(DEFAULT_NAMESPACE)
            synced = max((s.latest.file_mtime for s in states.values() if s.latest.managed_by == tag),
                         default=None)
            if only_if_newer and synced is not None and mtime <= synced:
                return []
            now = _now()
            actor = actor or tag
            wanted = {m.slug: m for m in meters}
            for meter in wanted.values():
                problems += self._sync_one(meter, path, tag, mtime, actor=actor, now=now)
            for slug, state in self.in_namespace(DEFAULT_NAMESPACE).items():
                if state.latest.managed_by == tag and not state.deleted and slug not in wanted:
                    self._unsync_one(slug, tag, actor=actor, now=now)
        return problems

    @_retrying
    def _sync_one(self, meter: Meter, path: str | Path, tag: str, mtime: float, *, actor: str,
                  now: datetime) -> list[str]:
        """Make one meter of file `path` current (each its own change: retried alone on a lost version)."""
        self.refresh()
        slug = meter.slug
        prev = self._states.get((DEFAULT_NAMESPACE, slug))
        if prev is not None and not prev.deleted and prev.latest.managed_by != tag:
            return [f"{path}: meter {slug!r} exists, managed by {prev.latest.managed_by}; not applied"]
        if prev is None or prev.deleted:
            version = 1 if prev is None else prev.latest.version + 1
            record: MeterRecord | None = mr.create(
                prev, meter, id=mr.file_id(DEFAULT_NAMESPACE, slug, version), name=None, metadata=None,
                managed_by=tag, actor=actor, now=now, file_mtime=mtime)
        else:
            record = mr.update(prev, meter, name=prev.latest.name, metadata=prev.latest.metadata,
                               actor=actor, now=now, file_mtime=mtime)
        self._apply(record)
        return []

    @_retrying
    def _unsync_one(self, slug: str, tag: str, *, actor: str, now: datetime) -> None:
        """Delete a meter the file no longer lists (unless another writer already did, or took it over)."""
        self.refresh()
        state = self._states.get((DEFAULT_NAMESPACE, slug))
        if state is not None and state.latest.managed_by == tag and not state.deleted:
            self._apply(mr.delete(state, actor=actor, now=now))

