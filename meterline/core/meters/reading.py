"""Reading an event once for all the meters of its type: the processor's hot path.

Real configs put many meters on one event type (input, output and cached tokens, requests and
users, by model, feature and region), and those meters share most of their work: SUM, AVG and MAX
of ``$.tokens`` read and parse one value; every meter grouped by ``{model: $.model}`` needs one
group key. An :class:`EventReader` compiles a type's meters into their *distinct* value paths and
*distinct* groupBys, so one event costs one read per distinct path and one key per distinct
groupBy, however many meters use them; meters with the same (value path, groupBy) even share one
window row's arithmetic (``meterline.core.accumulator.MessageWindows``).

The rules are exactly :meth:`MeterSet.measure`'s (the per-meter reference, kept for its clarity and
checked against this path by property tests), with two shortcuts that give the same answers:

* an ``int`` inside ±10^29 is kept as the int (``parse_numeric`` would make it an exact Decimal with 9
  zero decimals); windows convert only the sums, minima, maxima and latest values they store;
* a group key is memoised by the raw strings it was built from (``{"model": "gpt-4o"}`` is one
  dict lookup, not a JSON dump per event).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from itertools import repeat
from operator import itemgetter
from typing import Any

import orjson

from meterline.core.decimals import MAX_ABS_VALUE
from meterline.core.meters.aggregation import Aggregation
from meterline.core.meters.jsonpath import MISSING, Many, compile_path, top_level_key
from meterline.core.meters.model import Meter
from meterline.core.meters.values import NumericValueError, canonical_unique, group_text, parse_numeric
from meterline.core.reasons import ReasonCode

__all__ = ["EMPTY_GROUP_KEY", "EventReader", "Refusal", "Value"]

EMPTY_GROUP_KEY = "{}"
_BOUND = int(MAX_ABS_VALUE)
_STR: frozenset[type] = frozenset({str})
_INT: frozenset[type] = frozenset({int})
_GROUP_MEMO_LIMIT = 65_536
"""Distinct raw groupBy values remembered per groupBy; past it the memo starts again (bounded memory)."""

Refusal = tuple[ReasonCode, str]
"""(dead_letters reason code, reason) of a value no meter on that path can take."""
Value = int | Decimal | str | Refusal | None
"""One path's reading of one event: an in-range int, a 9-decimal Decimal, a unique's canonical text,
a Refusal, or None for a COUNT meter (no value)."""


def _numeric_reader(path: str) -> Callable[[Any], Value]:
    get = compile_path(path)
    bound = _BOUND

    def read(data: Any) -> Value:
        raw = get(data)
        if type(raw) is int and -bound < raw < bound:
            return raw
        return _refuse_or(raw, path, parse_numeric)

    return read


def _unique_reader(path: str) -> Callable[[Any], Value]:
    get = compile_path(path)
    return lambda data: _unique(get(data), path)


def _unique(raw: Any, path: str) -> Value:
    if type(raw) is str:
        return raw
    if isinstance(raw, (dict, list, tuple)) and type(raw) is not Many:
        return ReasonCode.VALUE_NOT_SCALAR, f"valueProperty {path}: {type(raw).__name__} is not a scalar"
    return _refuse_or(raw, path, canonical_unique)


def _refuse_or(raw: Any, path: str, convert: Callable[[Any], Decimal | str]) -> Value:
    """`MeterSet.measure`'s rules for everything but the fast cases."""
    if raw is MISSING:
        return ReasonCode.VALUE_MISSING, f"valueProperty {path}: no value"
    if raw is None:
        return ReasonCode.VALUE_NULL, f"valueProperty {path}: value is null"
    if type(raw) is Many:
        return ReasonCode.VALUE_AMBIGUOUS, f"valueProperty {path}: matched {len(raw)} values"
    try:
        return convert(raw)
    except NumericValueError as exc:
        return exc.code, f"valueProperty {path}: {exc}"


class _GroupReader:
    """One distinct groupBy: its canonical key per event, memoised by the raw strings it came from."""

    __slots__ = ("_all_str", "_getters", "_memo", "groups", "read")

    def __init__(self, spec: tuple[tuple[str, str], ...]) -> None:
        self._getters = tuple((key, compile_path(path)) for key, path in spec)
        self._memo: dict[Any, str] = {}
        self._all_str = (str,) * len(spec)
        #: group key -> the group dict; shared, read-only (rows copy it).
        self.groups: dict[str, dict[str, str]] = {EMPTY_GROUP_KEY: {}}
        if len(self._getters) == 1:
            self.read = self._read_one
        else:
            self.read = self._read_many

    def _read_one(self, data: Any) -> str:
        raw = self._getters[0][1](data)
        if type(raw) is str:
            key = self._memo.get(raw)
            if key is not None:
                return key
            key = self._build(data)
            self._remember(raw, key)
            return key
        return self._build(data)

    def _read_many(self, data: Any) -> str:
        raws = tuple(get(data) for _, get in self._getters)
        if all(type(r) is str for r in raws):
            key = self._memo.get(raws)
            if key is not None:
                return key
            key = self._build(data)
            self._remember(raws, key)
            return key
        return self._build(data)

    def key_of(self, raws: tuple[Any, ...]) -> str:
        """The key from the raw values of the groupBy's paths (sorted by group key), as `_build` would
        make it from the data they came from; memoised when every raw value is a string."""
        if tuple(map(type, raws)) == self._all_str:
            memo = raws[0] if len(raws) == 1 else raws
            key = self._memo.get(memo)
            if key is None:
                key = self._text(raws)
                self._remember(memo, key)
            return key
        return self._text(raws)

    def keys_of_column(self, raws: Sequence[Any], all_str: bool) -> list[str]:
        """`key_of` of many events: ``raws`` holds each event's raw value (one path) or tuple of raw values
        (several paths); ``all_str`` says every raw value is a string, so one C-level pass over the memo
        answers every event seen before."""
        one = len(self._getters) == 1
        if not all_str:
            return [self.key_of((r,) if one else r) for r in raws]
        keys: list[Any] = list(map(self._memo.get, raws))
        if None in keys:
            for j, key in enumerate(keys):
                if key is None:
                    keys[j] = self.key_of((raws[j],) if one else raws[j])
        return keys

    def _remember(self, raw: Any, key: str) -> None:
        if len(self._memo) >= _GROUP_MEMO_LIMIT:
            self._memo.clear()
        self._memo[raw] = key

    def _build(self, data: Any) -> str:
        """The canonical key (sorted keys, present values only) exactly as `MeterSet.measure` builds it."""
        return self._text(tuple(get(data) for _, get in self._getters))

    def _text(self, raws: tuple[Any, ...]) -> str:
        group: dict[str, str] = {}
        for (key, _), v in zip(self._getters, raws, strict=True):
            if v is MISSING or v is None:
                continue
            group[key] = group_text(list(v)) if type(v) is Many else group_text(v)
        text = orjson.dumps(group).decode() if group else EMPTY_GROUP_KEY
        if text not in self.groups:
            if len(self.groups) >= _GROUP_MEMO_LIMIT:
                self.groups = {EMPTY_GROUP_KEY: {}}
            self.groups[text] = group
        return text

    def group(self, key: str) -> dict[str, str]:
        """The group dict of a key this reader produced (rebuilt from the key if the memo moved on)."""
        found = self.groups.get(key)
        return dict(found) if found is not None else dict(orjson.loads(key))


def _slow_value(path: str, unique: bool) -> Callable[[Any], Value]:
    """A raw value's reading by the full rules (the fast path handles in-range ints and strings)."""
    if unique:
        return lambda raw: _unique(raw, path)
    return lambda raw: _refuse_or(raw, path, parse_numeric)


def _tuple_getter(indexes: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """`itemgetter` that always returns a tuple (itemgetter of one index returns the item itself)."""
    if len(indexes) > 1:
        return itemgetter(*indexes)
    if indexes:
        i = indexes[0]
        return lambda raws: (raws[i],)
    return lambda raws: ()


class EventReader:
    """The meters of one event type compiled into shared reads; immutable apart from memos.

    ``read(data)`` returns the readings of every distinct value path (``values``, in ``value_paths``
    order) and the key of every distinct groupBy (``group_keys``, in ``group_specs`` order).
    ``meters`` lists ``(meter, generation, value index or -1, group index, signature index)`` in
    config order; ``signatures`` lists the distinct ``(value index or -1, group index, eventFrom)``:
    meters with equal signatures get equal window rows apart from their slug and generation (a meter's
    active and rebuilding generations usually share one). A signature with an ``eventFrom`` leaves out
    the events before it, as `MeterSet.measure` skips them for that meter.
    """

    __slots__ = ("_all_str", "_combos", "_empty_groups", "_fast", "_group_plan", "_group_raws", "_keys", "_readers", "_slow_values",
                 "_value_plan", "applies_from", "group_readers", "meters", "refusers", "sharing", "signatures", "value_paths")

    def __init__(self, meters: Sequence[tuple[Meter, int]]) -> None:
        value_index: dict[tuple[str, bool], int] = {}
        group_index: dict[tuple[tuple[str, str], ...], int] = {}
        signature_index: dict[tuple[int, int, datetime | None], int] = {}
        readers: list[Callable[[Any], Value]] = []
        self.group_readers: list[_GroupReader] = []
        self.value_paths: list[tuple[str, bool]] = []
        self.meters: list[tuple[Meter, int, int, int, int]] = []
        for m, generation in meters:
            vi = -1
            if m.value_property is not None:
                unique = m.aggregation is Aggregation.UNIQUE_COUNT
                vkey = (m.value_property, unique)
                if vkey not in value_index:
                    value_index[vkey] = len(readers)
                    readers.append(_unique_reader(vkey[0]) if unique else _numeric_reader(vkey[0]))
                    self.value_paths.append(vkey)
                vi = value_index[vkey]
            spec = tuple(sorted(m.group_by.items()))
            if spec not in group_index:
                group_index[spec] = len(self.group_readers)
                self.group_readers.append(_GroupReader(spec))
            gi = group_index[spec]
            si = signature_index.setdefault((vi, gi, m.event_from), len(signature_index))
            self.meters.append((m, generation, vi, gi, si))
        self._readers = tuple(readers)
        # The fast plan, when every path is a top-level key: each distinct key is read once per event
        # (one dict.get), and values and group keys are made from those raw values.
        paths = [p for p, _ in self.value_paths] + [p for g in group_index for _, p in g]
        tops = {p: top_level_key(p) for p in paths}
        self._fast = all(k is not None for k in tops.values())
        keys = list(dict.fromkeys(k for k in tops.values() if k is not None))
        self._keys = tuple(keys)
        self._value_plan = tuple(
            (keys.index(tops[p]) if self._fast else -1, unique) for p, unique in self.value_paths  # type: ignore[arg-type]
        )
        self._slow_values: tuple[Callable[[Any], Value], ...] = tuple(
            _slow_value(p, unique) for p, unique in self.value_paths
        )
        self._group_plan = tuple(
            (tuple(keys.index(tops[p]) for _, p in spec) if self._fast else (), reader)  # type: ignore[arg-type]
            for spec, reader in zip(group_index, self.group_readers, strict=True)
        )
        self._empty_groups = tuple(not spec for spec in group_index)
        # Every groupBy's key at once, memoised by the raw strings of all grouped fields: events of one
        # customer repeat a few (model, feature, region) combinations, so this is one lookup per event.
        grouped = sorted({i for idx, _ in self._group_plan for i in idx})
        self._group_raws: Callable[[Sequence[Any]], tuple[Any, ...]] = _tuple_getter(grouped)
        self._all_str = (str,) * len(grouped)
        self._combos: dict[tuple[Any, ...], tuple[str, ...]] = {}
        self.signatures: list[tuple[int, int, datetime | None]] = list(signature_index)
        #: per signature: (position in ``meters``, slug, generation) of the meters sharing it, in config order.
        self.sharing: list[list[tuple[int, str, int]]] = [[] for _ in self.signatures]
        for pos, (m, generation, _, _, si) in enumerate(self.meters):
            self.sharing[si].append((pos, m.slug, generation))
        #: (slug, generation, value index, eventFrom) of the valued meters, in config order: who refuses
        #: when a value is refused.
        self.refusers = tuple((m.slug, g, vi, m.event_from) for m, g, vi, _, _ in self.meters if vi >= 0)
        froms = [m.event_from for m, *_ in self.meters]
        #: When every meter has an eventFrom: the earliest. An older event meters nothing of this type.
        self.applies_from: datetime | None = (
            min(f for f in froms if f is not None) if all(f is not None for f in froms) else None)

    def read(self, data: Any) -> tuple[list[Value], Sequence[str]]:
        """Every distinct value and group key of one event's ``data`` (MISSING: the event has none)."""
        if data is MISSING:
            return ([(ReasonCode.VALUE_MISSING, f"valueProperty {path}: event has no data") for path, _ in self.value_paths],
                    [EMPTY_GROUP_KEY] * len(self.group_readers))
        if not self._fast or type(data) is not dict:
            return [r(data) for r in self._readers], [g.read(data) for g in self.group_readers]
        get = data.get
        raws = [get(k, MISSING) for k in self._keys]
        values: list[Value] = []
        bound = _BOUND
        for (i, unique), slow in zip(self._value_plan, self._slow_values, strict=True):
            raw = raws[i]
            if unique:
                values.append(raw if type(raw) is str else slow(raw))
            elif type(raw) is int and -bound < raw < bound:
                values.append(raw)
            else:
                values.append(slow(raw))
        combo = self._group_raws(raws)
        if tuple(map(type, combo)) == self._all_str:
            group_keys = self._combos.get(combo)
            if group_keys is None:
                group_keys = self._group_keys(raws)
                if len(self._combos) >= _GROUP_MEMO_LIMIT:
                    self._combos.clear()
                self._combos[combo] = group_keys
            return values, group_keys
        return values, self._group_keys(raws)

    def read_columns(self, datas: Sequence[Any]) -> tuple[list[Sequence[Value]], list[Sequence[str] | None]]:
        """`read` of a message's events of this type at once, as columns: per distinct value path the
        readings of every event, per distinct groupBy the key of every event, or None for an empty groupBy
        (every key is EMPTY_GROUP_KEY). Exactly `read`'s answers (property-tested), for a fraction of the
        cost: one C-level pass per top-level key, and per column a type check that lets the common column
        (all in-range ints, all strings) through untouched, instead of Python work per event."""
        if not self._fast or set(map(type, datas)) != {dict}:
            readings = [self.read(d) for d in datas]
            values: list[Sequence[Value]] = [list(c) for c in zip(*(r[0] for r in readings), strict=True)]
            if not values:
                values = [[] for _ in self.value_paths]
            keyed = [list(c) for c in zip(*(r[1] for r in readings), strict=True)]
            return values, [None if empty else keyed[gi] for gi, empty in enumerate(self._empty_groups)]
        n = len(datas)
        cols: list[list[Any]] = [list(map(dict.get, datas, repeat(k, n), repeat(MISSING, n))) for k in self._keys]
        kinds = [set(map(type, c)) for c in cols]
        bound = _BOUND
        values = []
        for (i, unique), slow in zip(self._value_plan, self._slow_values, strict=True):
            col = cols[i]
            if unique:
                values.append(col if kinds[i] == _STR else [v if type(v) is str else slow(v) for v in col])
            elif kinds[i] == _INT and -bound < min(col) and max(col) < bound:
                values.append(col)
            else:
                values.append([v if type(v) is int and -bound < v < bound else slow(v) for v in col])
        groups: list[Sequence[str] | None] = []
        for (idx, reader), empty in zip(self._group_plan, self._empty_groups, strict=True):
            if empty:
                groups.append(None)
            elif len(idx) == 1:
                groups.append(reader.keys_of_column(cols[idx[0]], kinds[idx[0]] == _STR))
            else:
                raws = list(zip(*(cols[i] for i in idx), strict=True))
                groups.append(reader.keys_of_column(raws, all(kinds[i] == _STR for i in idx)))
        return values, groups

    def _group_keys(self, raws: Sequence[Any]) -> tuple[str, ...]:
        return tuple(
            reader.key_of(tuple(raws[i] for i in idx)) if idx else EMPTY_GROUP_KEY
            for idx, reader in self._group_plan
        )

    def refusals(self, values: Sequence[Value], time: datetime) -> list[tuple[str, int, ReasonCode, str]]:
        """(meter slug, generation, code, reason) for every meter whose value was refused, in config order
        (meters whose ``eventFrom`` is after ``time`` skip the event: they refuse nothing)."""
        out: list[tuple[str, int, ReasonCode, str]] = []
        for slug, generation, vi, event_from in self.refusers:
            v = values[vi]
            if type(v) is tuple and (event_from is None or time >= event_from):
                out.append((slug, generation, v[0], v[1]))
        return out
