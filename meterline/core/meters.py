"""Meters: definitions, config.yaml validation, JSONPath extraction and value rules.

A meter turns the ``data`` of every event whose ``type`` equals its ``eventType`` into a
:class:`Measurement` (or a :class:`Rejection` saying why it could not). Everything here is
pure so the processor, the query service and the ``recompute`` CLI all meter identically;
the only I/O is :func:`load_meters` reading the YAML file.

Extraction rules (decided here, relied on by windows.py and the sink):

* JSONPath is evaluated against the event's ``data``. An absent ``data`` means every path is
  *missing*; a non-object ``data`` (e.g. a string) is still evaluated, so ``$.x`` is missing
  while the root path ``$`` yields the value itself.
* A ``valueProperty`` that matches several values is rejected (``value_ambiguous``): silently
  taking one of them would meter a number nobody chose.
* A ``groupBy`` path that matches several values groups by the compact JSON array of all the
  matches (document order): grouping never drops usage and never silently picks one.
* Simple paths (``$.a.b``, ``$.a[0]``, ``$['a']``) are compiled to a plain dict/list walk
  because jsonpath-ng costs ~20µs per lookup, far beyond the processor's >100k events/s
  budget; anything else falls back to jsonpath-ng (``jsonpath_ng.ext``). Both agree exactly
  (see tests/unit/test_meters.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Context, Decimal, InvalidOperation
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import yaml
from jsonpath_ng import jsonpath as _jp
from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext.parser import parse as _jsonpath_parse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from meterline.core.errors import ConfigError, MeterNotFoundError

__all__ = [
    "DECIMAL_CONTEXT",
    "MAX_ABS_VALUE",
    "SCALE",
    "Aggregation",
    "Measurement",
    "Meter",
    "MeterSet",
    "NumericValueError",
    "Rejection",
    "WindowSize",
    "compile_path",
    "load_meters",
    "parse_numeric",
    "validate_meters",
]


class Aggregation(str, Enum):
    """How a meter folds values; every one rolls up exactly from minute windows."""

    SUM = "SUM"
    COUNT = "COUNT"
    AVG = "AVG"
    MIN = "MIN"
    MAX = "MAX"
    UNIQUE_COUNT = "UNIQUE_COUNT"
    LATEST = "LATEST"


class WindowSize(str, Enum):
    """Query window sizes (OpenMeter names); storage is always minute windows."""

    MINUTE = "MINUTE"
    HOUR = "HOUR"
    DAY = "DAY"
    MONTH = "MONTH"


# --------------------------------------------------------------------------------------
# Numeric values
# --------------------------------------------------------------------------------------

SCALE = 9
"""Fractional digits of ClickHouse Decimal128(9), where sums are stored."""
MAX_ABS_VALUE = Decimal(10) ** 29
"""Decimal128(9) holds 38 digits, 9 of them fractional: |value| must stay below 10**29."""
DECIMAL_CONTEXT = Context(prec=120, Emax=999_999, Emin=-999_999)
"""Wide enough that adding thousands of Decimal128(9) values never rounds; the default
28-digit context would silently round 38-digit values, which is exactly what we must avoid."""

_QUANTUM = Decimal(1).scaleb(-SCALE)
_NUMERIC_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class NumericValueError(ValueError):
    """A value that cannot be metered as a number; ``code`` is the dead-letter reason code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _to_decimal(value: Any) -> Decimal:
    """Exact Decimal of a JSON number or numeric string, without range checks.

    Floats go through ``repr`` so 0.1 is 0.1 (what the sender wrote), not
    0.1000000000000000055511151231257827.
    """
    if isinstance(value, bool):
        raise NumericValueError("value_not_numeric", "boolean is not numeric")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NumericValueError("value_not_finite", f"{value!r} is not finite")
        return Decimal(repr(value))
    if isinstance(value, str):
        if _NUMERIC_RE.fullmatch(value) is None:
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise NumericValueError("value_not_numeric", f"string {shown!r} is not numeric")
        return Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise NumericValueError("value_not_finite", f"{value} is not finite")
        return value
    if value is None:
        raise NumericValueError("value_null", "value is null")
    raise NumericValueError("value_not_numeric", f"{type(value).__name__} is not numeric")


def parse_numeric(value: Any) -> Decimal:
    """Parse a meter value into a Decimal with exactly 9 fractional digits.

    Accepts JSON ints/floats and strings matching
    ``^[+-]?(\\d+(\\.\\d*)?|\\.\\d+)([eE][+-]?\\d+)?$`` (ASCII digits only). Rejects bools,
    null, NaN/Infinity, objects and lists, and any value that Decimal128(9) cannot hold
    exactly (|v| >= 10**29 or more than 9 significant fractional digits): billing must never
    round silently. Raises :class:`NumericValueError` (a ``ValueError``) with a human reason.
    """
    d = _to_decimal(value)
    if d.copy_abs() >= MAX_ABS_VALUE:  # abs() would round to the 28-digit context
        raise NumericValueError("value_out_of_range", f"{value!r} is outside ±10^29")
    try:
        q = d.quantize(_QUANTUM, context=DECIMAL_CONTEXT)
    except InvalidOperation as exc:  # pragma: no cover - guarded by the range check
        raise NumericValueError("value_out_of_range", f"{value!r} cannot be stored") from exc
    if q != d:
        raise NumericValueError("value_out_of_range", f"{value!r} has more than {SCALE} fractional digits")
    return q


def _canonical_unique(value: Any) -> str:
    """The distinct-value string of a UNIQUE_COUNT value.

    Strings are taken as-is; numbers become their canonical decimal text so 1, 1.0 and 1e0
    (and the string "1") are one value; bools are ``true``/``false``. Numbers are not range
    limited here because they are identifiers, not amounts.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    d = _to_decimal(value)
    if d.is_zero():
        return "0"
    return format(d.normalize(DECIMAL_CONTEXT), "f")


def _group_text(value: Any) -> str:
    """groupBy value as text: strings as-is, scalars as JSON text, containers compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except (orjson.JSONEncodeError, TypeError):
        # >64-bit ints or non-string keys: orjson refuses, the stdlib does not.
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------
# JSONPath
# --------------------------------------------------------------------------------------


class _Missing:
    """Sentinel: the path matched nothing (distinct from a JSON null)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class _Many(tuple[Any, ...]):
    """Several matches of one path (only jsonpath-ng paths can produce this)."""

    __slots__ = ()


Getter = Callable[[Any], Any]
"""data -> value | MISSING | _Many(values)."""


def _simple_steps(expr: Any) -> list[str | int] | None:
    """Flatten a jsonpath-ng AST made only of Root/Fields(one name)/Index(one index) children.

    Returns None for anything else (wildcards, filters, slices, unions, descendants...).
    """
    if type(expr) is _jp.Root:
        return []
    if type(expr) is _jp.Fields:
        fields = expr.fields
        if (
            len(fields) != 1
            or getattr(expr, "_deprecated_wildcard_use", False)
            or fields[0] == "*"
            or fields[0] == _jp.auto_id_field
        ):
            return None
        return [fields[0]]
    if type(expr) is _jp.Index:
        if len(expr.indices) != 1:
            return None
        return [int(expr.indices[0])]
    if type(expr) is _jp.Child:
        left = _simple_steps(expr.left)
        if left is None:
            return None
        right = _simple_steps(expr.right)
        if right is None or (type(expr.right) is _jp.Root):
            return None
        return left + right
    return None


def _fast_getter(steps: Sequence[str | int]) -> Getter:
    """A plain dict/list walk with jsonpath-ng's semantics for Fields and Index."""
    steps = tuple(steps)
    if not steps:
        return lambda data: data
    if len(steps) == 1 and isinstance(steps[0], str):
        key = steps[0]

        def get1(data: Any) -> Any:
            if isinstance(data, dict):
                return data.get(key, MISSING)
            return MISSING

        return get1

    def get(data: Any) -> Any:
        cur = data
        for step in steps:
            if isinstance(step, str):
                if not isinstance(cur, dict):
                    return MISSING
                cur = cur.get(step, MISSING)
                if cur is MISSING:
                    return MISSING
            else:
                if not isinstance(cur, (list, tuple)) or not -len(cur) <= step < len(cur):
                    return MISSING
                cur = cur[step]
        return cur

    return get


def _slow_getter(expr: Any) -> Getter:
    def get(data: Any) -> Any:
        found = expr.find(data)
        if not found:
            return MISSING
        if len(found) == 1:
            return found[0].value
        return _Many(m.value for m in found)

    return get


@lru_cache(maxsize=4096)
def compile_path(path: str) -> Getter:
    """Compile a JSONPath once (cached) into a getter ``data -> value | MISSING``.

    Raises ValueError carrying the parser's message for an invalid path.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError("JSONPath must be a non-empty string")
    try:
        expr = _jsonpath_parse(path)
    except (JsonPathLexerError, JsonPathParserError, Exception) as exc:
        # jsonpath-ng raises bare Exception subclasses for some inputs; all are "invalid".
        raise ValueError(f"invalid JSONPath {path!r}: {exc}") from exc
    steps = _simple_steps(expr)
    if steps is not None:
        return _fast_getter(steps)
    return _slow_getter(expr)


def _jsonpath_ng_getter(path: str) -> Getter:
    """Always the jsonpath-ng evaluation; tests compare the fast path against it."""
    return _slow_getter(_jsonpath_parse(path))


# --------------------------------------------------------------------------------------
# Meter model
# --------------------------------------------------------------------------------------

SLUG_RE = re.compile(r"^[a-z0-9]+(?:[_-][a-z0-9]+)*$")
GROUP_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_SLUG_LENGTH = 63
RESERVED_GROUP_KEYS = frozenset({"subject"})


class Meter(BaseModel):
    """One meter definition, shaped like OpenMeter's (aliases) so config.yaml files port as-is.

    Validation runs on construction, so a Meter in memory is always usable by MeterSet.
    """

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="forbid")

    slug: str
    description: str = ""
    event_type: str = Field(alias="eventType")
    aggregation: Aggregation
    value_property: str | None = Field(default=None, alias="valueProperty", validate_default=True)
    group_by: dict[str, str] = Field(default_factory=dict, alias="groupBy")

    @field_validator("slug")
    @classmethod
    def _check_slug(cls, v: str) -> str:
        if len(v) > MAX_SLUG_LENGTH:
            raise ValueError(f"must be at most {MAX_SLUG_LENGTH} characters (got {len(v)})")
        if SLUG_RE.match(v) is None:
            raise ValueError(
                f"{v!r} must match {SLUG_RE.pattern} (lowercase letters and digits "
                "separated by single '_' or '-')"
            )
        return v

    @field_validator("description", mode="before")
    @classmethod
    def _none_description(cls, v: Any) -> Any:
        return "" if v is None else v

    @field_validator("event_type")
    @classmethod
    def _check_event_type(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v

    @field_validator("aggregation", mode="before")
    @classmethod
    def _check_aggregation(cls, v: Any) -> Any:
        if isinstance(v, Aggregation):
            return v
        if not isinstance(v, str) or v not in Aggregation.__members__:
            valid = ", ".join(a.value for a in Aggregation)
            raise ValueError(f"unknown aggregation {v!r}; valid: {valid}")
        return Aggregation(v)

    @field_validator("value_property")
    @classmethod
    def _check_value_property(cls, v: str | None, info: ValidationInfo) -> str | None:
        agg = info.data.get("aggregation")
        if agg is Aggregation.COUNT and v is not None:
            raise ValueError("must not be set for COUNT (COUNT counts events)")
        if agg is not None and agg is not Aggregation.COUNT and v is None:
            raise ValueError(f"is required for {agg.value}")
        if v is not None:
            compile_path(v)  # raises ValueError with the parser's message
        return v

    @field_validator("group_by", mode="before")
    @classmethod
    def _none_group_by(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("group_by")
    @classmethod
    def _check_group_by(cls, v: dict[str, str]) -> dict[str, str]:
        problems: list[str] = []
        for key, path in v.items():
            if key in RESERVED_GROUP_KEYS:
                problems.append(f"key {key!r} is reserved")
            elif GROUP_KEY_RE.match(key) is None:
                problems.append(f"key {key!r} must match {GROUP_KEY_RE.pattern}")
            try:
                compile_path(path)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return v


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


class Rejection(NamedTuple):
    """Why one meter could not meter one event; ``code`` is a dead_letters reason_code."""

    meter: str
    code: str
    reason: str


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


_EMPTY_GROUP_KEY = "{}"


class _CompiledMeter:
    """A meter with its JSONPaths compiled, so measuring an event does no parsing."""

    __slots__ = ("agg", "group_getters", "group_spec", "meter", "slug", "value_getter", "value_path")

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
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
            if type(v) is _Many:
                group[key] = _group_text(list(v))
            else:
                group[key] = _group_text(v)
        # keys are inserted sorted, so a plain dump is canonical.
        result = (group, orjson.dumps(group).decode())
        cache[self.group_spec] = result
        return result

    def measure_absent(self) -> Measurement | Rejection:
        """Events without ``data``: COUNT still counts (no groups), valued meters are missing."""
        if self.value_getter is None:
            return Measurement(self.meter, {}, _EMPTY_GROUP_KEY, None)
        return Rejection(self.slug, "value_missing", f"valueProperty {self.value_path}: event has no data")

    def measure(self, data: Any, cache: dict[Any, Any]) -> Measurement | Rejection:
        if self.value_getter is None:
            group, key = self.group(data, cache)
            return Measurement(self.meter, group, key, None)
        # Like groups, a value is read and parsed once per event for every meter sharing its path
        # (SUM, AVG and MAX of $.tokens are one parse, not three).
        value_key = ("value", self.value_path, self.agg is Aggregation.UNIQUE_COUNT)
        outcome: Decimal | str | tuple[str, str] | None = cache.get(value_key)
        if outcome is None:
            outcome = cache[value_key] = self._value(data)
        if isinstance(outcome, tuple):
            return Rejection(self.slug, *outcome)
        group, key = self.group(data, cache)
        return Measurement(self.meter, group, key, outcome)

    def _value(self, data: Any) -> Decimal | str | tuple[str, str]:
        """The metered value, or (rejection code, reason); independent of the meter's slug."""
        assert self.value_getter is not None
        raw = self.value_getter(data)
        path = self.value_path
        if raw is MISSING:
            return "value_missing", f"valueProperty {path}: no value"
        if raw is None:
            return "value_null", f"valueProperty {path}: value is null"
        if type(raw) is _Many:
            return "value_ambiguous", f"valueProperty {path}: matched {len(raw)} values"
        try:
            if self.agg is Aggregation.UNIQUE_COUNT:
                if isinstance(raw, (dict, list, tuple)):
                    return "value_not_scalar", f"valueProperty {path}: {type(raw).__name__} is not a scalar"
                return _canonical_unique(raw)
            return parse_numeric(raw)
        except NumericValueError as exc:
            return exc.code, f"valueProperty {path}: {exc}"


class MeterSet:
    """All configured meters, indexed by slug and event type; immutable, built once."""

    __slots__ = ("_by_slug", "_by_type", "_compiled_by_type", "_meters")

    def __init__(self, meters: Sequence[Meter]) -> None:
        by_slug: dict[str, Meter] = {}
        for m in meters:
            if m.slug in by_slug:
                raise ConfigError(f"duplicate meter slug {m.slug!r}")
            by_slug[m.slug] = m
        self._meters = tuple(meters)
        self._by_slug = by_slug
        by_type: dict[str, list[Meter]] = {}
        for m in meters:
            by_type.setdefault(m.event_type, []).append(m)
        self._by_type = {t: tuple(ms) for t, ms in by_type.items()}
        self._compiled_by_type = {t: tuple(_CompiledMeter(m) for m in ms) for t, ms in by_type.items()}

    def __iter__(self) -> Any:
        return iter(self._meters)

    def __len__(self) -> int:
        return len(self._meters)

    @property
    def meters(self) -> tuple[Meter, ...]:
        return self._meters

    def for_type(self, event_type: str) -> Sequence[Meter]:
        """Meters fed by events of this type (empty when none)."""
        return self._by_type.get(event_type, ())

    def get(self, slug: str) -> Meter:
        """The meter with this slug; raises MeterNotFoundError so callers can map it to 404."""
        try:
            return self._by_slug[slug]
        except KeyError:
            raise MeterNotFoundError(slug) from None

    def measure(self, event: Mapping[str, Any]) -> tuple[list[Measurement], list[Rejection]]:
        """Evaluate every meter whose eventType == event["type"] against event["data"].

        An event with no matching meter yields ([], []); deciding whether that is an error
        (strict_event_types) is the processor's business.
        """
        compiled = self._compiled_by_type.get(event.get("type"))  # type: ignore[arg-type]
        if not compiled:
            return [], []
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


# --------------------------------------------------------------------------------------
# config.yaml
# --------------------------------------------------------------------------------------

_IGNORED_KEYS = frozenset({"windowSize"})
"""Legacy OpenMeter key; meterline always stores minute windows and picks the size per query."""


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "meter"


def validate_meters(raw: Any, source: str) -> list[Meter]:
    """Validate the ``meters`` list of a config file and return Meter objects.

    ``raw`` is the value of the ``meters`` key (a whole config mapping is also accepted).
    Every problem in every meter is collected, then one ConfigError lists them all as
    ``"<source>: meters[<i>] (<slug>).<field>: <message>"`` so an operator fixes the file
    in one pass instead of one error per restart.
    """
    if isinstance(raw, Mapping):
        raw = raw.get("meters")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: meters: must be a list, got {type(raw).__name__}")
    problems: list[str] = []
    meters: list[Meter] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            problems.append(f"{source}: meters[{i}]: must be a mapping, got {type(item).__name__}")
            continue
        slug = item.get("slug")
        where = f"{source}: meters[{i}] ({slug if isinstance(slug, str) else '?'})"
        data = {k: v for k, v in item.items() if k not in _IGNORED_KEYS}
        try:
            meter = Meter.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "missing":
                    msg = "is required"
                problems.append(f"{where}.{_fmt_loc(tuple(err['loc']))}: {msg}")
            continue
        if meter.slug in seen:
            problems.append(f"{where}.slug: duplicate slug (first defined at meters[{seen[meter.slug]}])")
        else:
            seen[meter.slug] = i
            meters.append(meter)
    if problems:
        raise ConfigError("\n".join(problems))
    return meters


def load_meters(path: str | Path) -> list[Meter]:
    """Read ``meters`` from a config.yaml (other top-level keys are service settings)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    if doc is None:
        return []
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(doc).__name__}")
    return validate_meters(doc.get("meters"), source)
