"""Meter records: what the meter store keeps about a meter, and the pure rules for changing it.

A meter's history is a list of records, one per change (`version` 1, 2, ... per slug). The newest
record is the meter's state. A change that alters what the meter counts (`DEFINITION_FIELDS`) starts a
new *generation* (= the version of that change); windows are stored per generation, and queries read
the `active_generation` only, so a rebuilt history replaces the old one atomically (docs/design.md,
"Live meters").

Everything here is deterministic given the previous state and the change, so two processes applying
the same change (e.g. syncing the same config.yaml at once) produce identical records that the store
collapses instead of forking the history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meterline.core.errors import (
    InvalidMeterChangeError,
    MeterConflictError,
    MeterNotFoundError,
    MeterVersionConflictError,
)
from meterline.core.meters import Meter
from meterline.core.times import as_utc

__all__ = [
    "API",
    "DEFAULT_NAMESPACE",
    "DEFINITION_FIELDS",
    "MeterAction",
    "MeterCreate",
    "MeterRecord",
    "MeterState",
    "MeterUpdate",
    "activate",
    "check_version",
    "create",
    "delete",
    "derive_states",
    "file_id",
    "live_meters",
    "update",
]

DEFAULT_NAMESPACE = "default"
API = "api"
"""`managed_by` of meters created through the HTTP API; file-managed ones say `file:<path>`."""

DEFINITION_FIELDS = ("event_type", "value_property", "aggregation", "group_by", "event_from")
"""Fields whose change rewrites history (a new generation); name/description/metadata do not."""


class MeterAction(str, Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    ACTIVATE = "activate"


@dataclass(frozen=True, slots=True)
class MeterRecord:
    """One row of the meter store: the meter after one change."""

    namespace: str
    slug: str
    version: int
    action: MeterAction
    id: str
    meter: Meter
    name: str
    metadata: dict[str, str] | None
    managed_by: str
    actor: str
    changed_at: datetime
    created_at: datetime
    generation: int
    active_generation: int
    file_mtime: float = 0.0

    @property
    def deleted(self) -> bool:
        return self.action is MeterAction.DELETE

    def definition(self) -> dict[str, Any]:
        """The JSON document the store keeps (the definition plus name and metadata)."""
        doc = self.meter.model_dump(by_alias=True, mode="json", exclude_none=True)
        doc["name"] = self.name
        if self.metadata is not None:
            doc["metadata"] = dict(self.metadata)
        return doc


def same_definition(a: Meter, b: Meter) -> bool:
    """Whether two meters count the same thing (a differing one needs its history rebuilt)."""
    return all(getattr(a, f) == getattr(b, f) for f in DEFINITION_FIELDS)


@dataclass(frozen=True, slots=True)
class MeterState:
    """A meter's newest record plus the records that define its active and building generations."""

    latest: MeterRecord
    active: MeterRecord | None
    building: MeterRecord | None

    @property
    def slug(self) -> str:
        return self.latest.slug

    @property
    def deleted(self) -> bool:
        return self.latest.deleted

    @property
    def status(self) -> str:
        if self.deleted:
            return "deleted"
        return "building" if self.building is not None else "ready"


def derive_states(records: Iterable[MeterRecord]) -> dict[tuple[str, str], MeterState]:
    """Every meter's state from its full history (records in any order)."""
    by_meter: dict[tuple[str, str], dict[int, MeterRecord]] = {}
    for r in records:
        by_meter.setdefault((r.namespace, r.slug), {})[r.version] = r
    out: dict[tuple[str, str], MeterState] = {}
    for key, versions in by_meter.items():
        latest = versions[max(versions)]
        active = versions.get(latest.active_generation) if latest.active_generation else None
        building = None
        if not latest.deleted and latest.generation != latest.active_generation:
            building = versions.get(latest.generation)
        out[key] = MeterState(latest, None if latest.deleted else active, building)
    return out


def live_meters(states: Iterable[MeterState]) -> list[tuple[Meter, int]]:
    """(definition, generation) of every generation a processor must write: active and building."""
    out: list[tuple[Meter, int]] = []
    for s in states:
        if s.deleted:
            continue
        if s.active is not None:
            out.append((s.active.meter, s.latest.active_generation))
        if s.building is not None:
            out.append((s.building.meter, s.latest.generation))
    return out


# -------------------------------------------------------------------------------------------------
# Requests (OpenMeter's MeterCreate / MeterUpdate, plus meterline's definition fields on update)
# -------------------------------------------------------------------------------------------------


class MeterCreate(BaseModel):
    """OpenMeter's `MeterCreate` body."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    slug: str
    name: str | None = Field(default=None, min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, str] | None = None
    event_type: str = Field(alias="eventType", min_length=1)
    event_from: datetime | None = Field(default=None, alias="eventFrom")
    aggregation: str
    value_property: str | None = Field(default=None, alias="valueProperty")
    group_by: dict[str, str] | None = Field(default=None, alias="groupBy")


class MeterUpdate(BaseModel):
    """OpenMeter's `MeterUpdate` (name, description, metadata, groupBy). meterline also accepts
    eventType, eventFrom, aggregation and valueProperty: its history follows any definition."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(default=None, min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, str] | None = None
    group_by: dict[str, str] | None = Field(default=None, alias="groupBy")
    event_type: str | None = Field(default=None, alias="eventType", min_length=1)
    event_from: datetime | None = Field(default=None, alias="eventFrom")
    aggregation: str | None = None
    value_property: str | None = Field(default=None, alias="valueProperty")


_ALIASES = {"event_type": "eventType", "event_from": "eventFrom", "value_property": "valueProperty",
            "group_by": "groupBy"}


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc:
            loc[0] = _ALIASES.get(loc[0], loc[0])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "extra_forbidden":
            msg = "is not a meter field"
        out.append({"field": ".".join(loc) or "body", "message": msg})
    return out


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a request body into `model`; InvalidMeterChangeError names every bad field."""
    if not isinstance(body, Mapping):
        raise InvalidMeterChangeError([{"field": "body", "message": "must be a JSON object"}])
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidMeterChangeError(_field_errors(exc)) from None


def build_meter(fields: Mapping[str, Any]) -> Meter:
    """A Meter from snake_case fields; InvalidMeterChangeError names each bad field (camelCase)."""
    data = {k: v for k, v in fields.items() if v is not None or k == "value_property"}
    try:
        return Meter.model_validate(data)
    except ValidationError as exc:
        raise InvalidMeterChangeError(_field_errors(exc)) from None


# -------------------------------------------------------------------------------------------------
# Changes
# -------------------------------------------------------------------------------------------------


def file_id(namespace: str, slug: str, version: int) -> str:
    """A deterministic ULID-shaped id, so every process syncing one file derives the same id."""
    digest = hashlib.blake2b(f"{namespace}\x00{slug}\x00{version}".encode(), digest_size=16).digest()
    return _crockford(int.from_bytes(digest, "big"))


_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _crockford(value: int) -> str:
    """128 bits as 26 Crockford base32 characters (the ULID text form; the first is 0-7)."""
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def check_version(prev: MeterState, expected: Collection[int] | None) -> None:
    """Optimistic concurrency: refuse a change made against a version that is no longer the newest
    (`expected` None: the caller read no version, and the change applies to whatever is newest)."""
    if expected is not None and prev.latest.version not in expected:
        raise MeterVersionConflictError(prev.slug, sorted(expected), prev.latest.version)


def create(
    prev: MeterState | None, meter: Meter, *, namespace: str = DEFAULT_NAMESPACE, id: str, name: str | None,
    metadata: dict[str, str] | None, managed_by: str, actor: str, now: datetime, file_mtime: float = 0.0,
) -> MeterRecord:
    """The first record of a meter (or of a slug whose previous meter was deleted)."""
    if prev is not None and not prev.deleted:
        where = "" if prev.latest.managed_by == API else f" (managed by {prev.latest.managed_by})"
        raise MeterConflictError(meter.slug, f"a meter with slug {meter.slug!r} already exists{where}",
                                 prev.latest.managed_by)
    version = 1 if prev is None else prev.latest.version + 1
    return MeterRecord(
        namespace=namespace, slug=meter.slug, version=version, action=MeterAction.CREATE, id=id, meter=meter,
        name=name or meter.slug, metadata=metadata, managed_by=managed_by, actor=actor, changed_at=now,
        created_at=now, generation=version, active_generation=0, file_mtime=file_mtime,
    )


def update(
    prev: MeterState, meter: Meter, *, name: str | None, metadata: dict[str, str] | None, actor: str,
    now: datetime, file_mtime: float = 0.0,
) -> MeterRecord | None:
    """The record after changing `prev` to `meter`; None when nothing changes.

    A definition change starts generation = this version, unless it returns to the active definition
    (then the pending rebuild is simply cancelled).
    """
    last = prev.latest
    name = name or last.name
    current = prev.building.meter if prev.building is not None else (prev.active or last).meter
    if meter == last.meter and name == last.name and metadata == last.metadata and same_definition(meter, current):
        return None
    version = last.version + 1
    generation = last.generation
    active = last.active_generation
    if not same_definition(meter, current):
        if prev.active is not None and same_definition(meter, prev.active.meter):
            generation = active
        else:
            generation = version
    return replace(last, version=version, action=MeterAction.UPDATE, meter=meter, name=name, metadata=metadata,
                   actor=actor, changed_at=now, generation=generation, active_generation=active,
                   file_mtime=file_mtime or last.file_mtime)


def delete(prev: MeterState, *, actor: str, now: datetime) -> MeterRecord:
    if prev.deleted:
        raise MeterNotFoundError(prev.slug)
    last = prev.latest
    return replace(last, version=last.version + 1, action=MeterAction.DELETE, actor=actor, changed_at=now)


def activate(prev: MeterState, generation: int, *, actor: str, now: datetime) -> MeterRecord | None:
    """Make `generation` the one queries read; None if the meter moved on (deleted or redefined)."""
    last = prev.latest
    if prev.deleted or last.generation != generation or last.active_generation == generation:
        return None
    return replace(last, version=last.version + 1, action=MeterAction.ACTIVATE, actor=actor, changed_at=now,
                   active_generation=generation)


# -------------------------------------------------------------------------------------------------
# Store rows
# -------------------------------------------------------------------------------------------------

RECORD_COLUMNS: tuple[str, ...] = (
    "namespace", "slug", "version", "action", "id", "managed_by", "actor", "changed_at", "created_at",
    "generation", "active_generation", "file_mtime", "definition",
)


def to_row(r: MeterRecord) -> list[Any]:
    """A `meter_versions` row in RECORD_COLUMNS order."""
    return [r.namespace, r.slug, r.version, r.action.value, r.id, r.managed_by, r.actor, r.changed_at,
            r.created_at, r.generation, r.active_generation, r.file_mtime,
            orjson.dumps(r.definition(), option=orjson.OPT_SORT_KEYS).decode()]


def from_row(row: Mapping[str, Any]) -> MeterRecord:
    """The record of a `meter_versions` row (the inverse of `to_row`)."""
    doc = orjson.loads(row["definition"])
    name = doc.pop("name", row["slug"])
    metadata = doc.pop("metadata", None)
    return MeterRecord(
        namespace=row["namespace"], slug=row["slug"], version=int(row["version"]),
        action=MeterAction(row["action"]), id=row["id"], meter=Meter.model_validate(doc), name=name,
        metadata=metadata, managed_by=row["managed_by"], actor=row["actor"], changed_at=as_utc(row["changed_at"]),
        created_at=as_utc(row["created_at"]), generation=int(row["generation"]),
        active_generation=int(row["active_generation"]), file_mtime=float(row["file_mtime"]),
    )
