"""Measuring: every meter of an event's type reads the event into a Measurement or a Rejection.

Extraction rules (decided here, relied on by windows and the sink):

* JSONPath is evaluated against the event's ``data``. An absent ``data`` means every path is
  *missing*; a non-object ``data`` (e.g. a string) is still evaluated, so ``$.x`` is missing
  while the root path ``$`` yields the value itself.
* A ``valueProperty`` that matches several values is rejected (``value_ambiguous``): silently
  taking one of them would meter a number nobody chose.
* A ``groupBy`` path that matches several values groups by the compact JSON array of all the
  matches (document order): grouping never drops usage and never silently picks one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

from meterline.core.access import DEFAULT_NAMESPACE
from meterline.core.errors import ConfigError, MeterNotFoundError
from meterline.core.meters.aggregation import Aggregation
from meterline.core.meters.jsonpath import MISSING, Many, compile_path
from meterline.core.meters.model import Meter
from meterline.core.meters.reading import EventReader
from meterline.core.meters.values import NumericValueError, canonical_unique, group_text, parse_numeric
from meterline.core.reasons import ReasonCode
from meterline.core.times import parse_time

__all__ = ["Measurement", "MeterSet", "Rejection"]


class Rejection(NamedTuple):
    """Why one meter could not meter one event; ``code`` is a dead_letters reason_code."""

    meter: str
    code: ReasonCode
    reason: str
    generation: int = 0


class Measurement(NamedTuple):
    """One meter's reading of one event.

    ``value`` is None for COUNT, the distinct-value string for UNIQUE_COUNT and a
    9-fractional-digit Decimal otherwise. ``group`` holds only present keys; ``group_key`` is
    its canonical JSON (sorted keys) so equal groups always land in the same row.
    """

    meter: Meter
    group: dict[str, str]
    group_key: str
    value: Decimal | str | None
    generation: int = 0


_EMPTY_GROUP_KEY = "{}"


class _CompiledMeter:
    """A meter with its JSONPaths compiled, so measuring an event does no parsing."""

    __slots__ = ("agg", "event_from", "generation", "group_getters", "group_spec", "meter", "slug",
                 "value_getter", "value_path")

    def __init__(self, meter: Meter, generation: int = 0) -> None:
        self.meter = meter
        self.generation = generation
        self.event_from = meter.event_from
        self.slug = meter.slug
        self.agg = meter.aggregation
        self.value_path = meter.value_property
        self.value_getter = compile_path(meter.value_property) if meter.value_property else None
        self.group_getters = tuple((key, compile_path(path)) for key, path in sorted(meter.group_by.items()))
        # Meters fed by one event often share a groupBy (OpenMeter's "one request moves three
        # meters" pattern), so measure() computes each distinct groupBy once per event.
        self.group_spec = tuple(sorted(meter.group_by.items()))

    def group(self, data: Any, cache: dict[Any, Any]) -> tuple[dict[str, str], str]:
        """Group values and canonical key; ``cache`` lives for one event (results are read-only)."""
        if not self.group_getters:
            return {}, _EMPTY_GROUP_KEY
        hit = cache.get(self.group_spec)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        group: dict[str, str] = {}
        for key, getter in self.group_getters:
            v = getter(data)
            if v is MISSING or v is None:
                continue
            if type(v) is Many:
                group[key] = group_text(list(v))
            else:
                group[key] = group_text(v)
        # keys are inserted sorted, so a plain dump is canonical.
        result = (group, orjson.dumps(group).decode())
        cache[self.group_spec] = result
        return result

    def measure_absent(self) -> Measurement | Rejection:
        """Events without ``data``: COUNT still counts (no groups), valued meters are missing."""
        if self.value_getter is None:
            return Measurement(self.meter, {}, _EMPTY_GROUP_KEY, None, self.generation)
        return Rejection(self.slug, ReasonCode.VALUE_MISSING, f"valueProperty {self.value_path}: event has no data",
                         self.generation)

    def measure(self, data: Any, cache: dict[Any, Any]) -> Measurement | Rejection:
        if self.value_getter is None:
            group, key = self.group(data, cache)
            return Measurement(self.meter, group, key, None, self.generation)
        # Like groups, a value is read and parsed once per event for every meter sharing its path
        # (SUM, AVG and MAX of $.tokens are one parse, not three).
        value_key = ("value", self.value_path, self.agg is Aggregation.UNIQUE_COUNT)
        outcome: Decimal | str | tuple[ReasonCode, str] | None = cache.get(value_key)
        if outcome is None:
            outcome = cache[value_key] = self._value(data)
        if isinstance(outcome, tuple):
            return Rejection(self.slug, outcome[0], outcome[1], self.generation)
        group, key = self.group(data, cache)
        return Measurement(self.meter, group, key, outcome, self.generation)

    def _value(self, data: Any) -> Decimal | str | tuple[ReasonCode, str]:
        """The metered value, or (rejection code, reason); independent of the meter's slug."""
        assert self.value_getter is not None
        raw = self.value_getter(data)
        path = self.value_path
        if raw is MISSING:
            return ReasonCode.VALUE_MISSING, f"valueProperty {path}: no value"
        if raw is None:
            return ReasonCode.VALUE_NULL, f"valueProperty {path}: value is null"
        if type(raw) is Many:
            return ReasonCode.VALUE_AMBIGUOUS, f"valueProperty {path}: matched {len(raw)} values"
        try:
            if self.agg is Aggregation.UNIQUE_COUNT:
                if isinstance(raw, (dict, list, tuple)):
                    return ReasonCode.VALUE_NOT_SCALAR, f"valueProperty {path}: {type(raw).__name__} is not a scalar"
                return canonical_unique(raw)
            return parse_numeric(raw)
        except NumericValueError as exc:
            return exc.code, f"valueProperty {path}: {exc}"


_NO_READERS: Mapping[str, EventReader] = {}


class MeterSet:
    """All live meters, indexed by namespace, slug and event type; immutable, built once.

    ``generations`` (parallel to ``meters``) lets one slug appear once per generation: while a meter's
    history is rebuilt, the processor meters each event under the active and the building definition
    (docs/design.md, "Live meters"). Without it every meter is generation 0.

    ``namespaces`` (parallel too) says whose meter each is: a meter only ever meters events of its own
    namespace, and two tenants may each have a meter with the same slug (docs/design.md, "Tenants").
    Without it every meter belongs to the default namespace.
    """

    __slots__ = ("_by_slug", "_by_type", "_compiled_by_type", "_meters", "_readers", "_time_bound")

    def __init__(self, meters: Sequence[Meter], generations: Sequence[int] | None = None,
                 namespaces: Sequence[str] | None = None) -> None:
        gens = list(generations) if generations is not None else [0] * len(meters)
        nss = list(namespaces) if namespaces is not None else [DEFAULT_NAMESPACE] * len(meters)
        if len(gens) != len(meters) or len(nss) != len(meters):
            raise ValueError("generations and namespaces must be parallel to meters")
        by_slug: dict[tuple[str, str], Meter] = {}
        seen: set[tuple[str, str, int]] = set()
        for m, g, ns in zip(meters, gens, nss, strict=True):
            if (ns, m.slug, g) in seen:
                raise ConfigError(f"duplicate meter slug {m.slug!r}")
            seen.add((ns, m.slug, g))
            by_slug.setdefault((ns, m.slug), m)
        self._meters = tuple(meters)
        self._by_slug = by_slug
        by_type: dict[tuple[str, str], list[Meter]] = {}
        compiled: dict[tuple[str, str], list[_CompiledMeter]] = {}
        #: namespace -> event type -> its meters' (definition, generation) pairs
        pairs: dict[str, dict[str, list[tuple[Meter, int]]]] = {}
        for m, g, ns in zip(meters, gens, nss, strict=True):
            by_type.setdefault((ns, m.event_type), []).append(m)
            compiled.setdefault((ns, m.event_type), []).append(_CompiledMeter(m, g))
            pairs.setdefault(ns, {}).setdefault(m.event_type, []).append((m, g))
        self._by_type = {k: tuple(ms) for k, ms in by_type.items()}
        self._compiled_by_type = {k: tuple(cs) for k, cs in compiled.items()}
        self._time_bound = {k for k, cs in compiled.items() if any(c.event_from is not None for c in cs)}
        #: namespace -> event type -> the shared reads of its meters (`meterline.core.meters.reading`).
        self._readers: dict[str, dict[str, EventReader]] = {
            ns: {t: EventReader(ps) for t, ps in by_type_.items()} for ns, by_type_ in pairs.items()}

    def __iter__(self) -> Any:
        return iter(self._meters)

    def __len__(self) -> int:
        return len(self._meters)

    @property
    def meters(self) -> tuple[Meter, ...]:
        return self._meters

    def readers_of(self, namespace: str) -> Mapping[str, EventReader]:
        """Event type -> the reader of `namespace`'s meters of that type: the processor's hot path."""
        return self._readers.get(namespace, _NO_READERS)

    def for_type(self, event_type: str, namespace: str = DEFAULT_NAMESPACE) -> Sequence[Meter]:
        """`namespace`'s meters fed by events of this type (empty when none)."""
        return self._by_type.get((namespace, event_type), ())

    def get(self, slug: str, namespace: str = DEFAULT_NAMESPACE) -> Meter:
        """`namespace`'s meter with this slug; raises MeterNotFoundError so callers can map it to 404."""
        try:
            return self._by_slug[(namespace, slug)]
        except KeyError:
            raise MeterNotFoundError(slug) from None

    def measure(
        self, event: Mapping[str, Any], time: datetime | None = None, namespace: str = DEFAULT_NAMESPACE,
    ) -> tuple[list[Measurement], list[Rejection]]:
        """Evaluate every meter of `namespace` whose eventType == event["type"] against event["data"].

        One `Measurement` or `Rejection` per meter: the plain statement of the rules. The processor
        reads through ``readers_of`` instead (same answers, shared work; property-tested against this).

        An event with no matching meter yields ([], []); deciding whether that is an error
        (strict_event_types) is the processor's business. Meters whose ``eventFrom`` is after the
        event's time (``time``, else parsed from ``event["time"]``) skip it: neither measured nor
        rejected.
        """
        etype = event.get("type")
        compiled = self._compiled_by_type.get((namespace, etype))  # type: ignore[arg-type]
        if not compiled:
            return [], []
        if (namespace, etype) in self._time_bound:
            if time is None:
                time = parse_time(event["time"])
            compiled = tuple(c for c in compiled if c.event_from is None or time >= c.event_from)
        data = event.get("data", MISSING)
        measurements: list[Measurement] = []
        rejections: list[Rejection] = []
        cache: dict[Any, Any] = {}
        for cm in compiled:
            r = cm.measure(data, cache) if data is not MISSING else cm.measure_absent()
            if type(r) is Measurement:
                measurements.append(r)
            else:
                rejections.append(r)  # type: ignore[arg-type]
        return measurements, rejections
