"""The window accumulator: one Kafka message's measurements folded into minute-window delta rows.

(Query-time windows, in a zone and of a size, are `query/time_ranges.py`.)

Windows follow **event time**, not arrival: a usage report that arrives late (or is
replayed) must land in the minute it happened, otherwise totals would depend on broker lag.
Storage is always minute windows in UTC; since every IANA zone offset is a multiple of 15
minutes, minute rows roll up exactly into any zone's hours, days and months at query time.

One accumulator is used per Kafka message: all the rows it yields share that message's position
identity ``(log_epoch, partition, offset)``, so re-processing the message rewrites byte-identical
rows that ReplacingMergeTree collapses (exactly-once effect).

Two accumulators give the same rows in the same order. :class:`WindowAccumulator` folds one
`Measurement` per meter per event: the plain statement of the rules, kept as the reference the
property tests check against. :class:`MessageWindows` is what `meterline.core.rows` runs: it takes
a message's `EventReader` readings as columns (one batch per event type), splits them by subject,
window and *distinct* groupBy key, then computes each distinct (value path, groupBy) row once per
message for all the meters sharing it, with C-level `sum`/`min`/`max` over the message's values, so
twenty meters cost little more than three.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from operator import itemgetter
from typing import Any, NamedTuple

from meterline.core.decimals import CONTEXT, MAX_ABS_VALUE, QUANTUM, add, fits_storage
from meterline.core.meters import Measurement
from meterline.core.meters.reading import EMPTY_GROUP_KEY, EventReader, Value

__all__ = ["MessageWindows", "Overflow", "WindowAccumulator", "WindowDelta"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _window_start(event_time: datetime, window: timedelta) -> datetime:
    """The start of the window holding `event_time`: windows are counted from the Unix epoch, in UTC.

    Both accumulators call it (on a new event time only: they cache the last one), so they cannot
    disagree on where a window starts."""
    if event_time.tzinfo is None or event_time.utcoffset() is None:
        raise ValueError("event_time must be an aware datetime")
    return _EPOCH + ((event_time - _EPOCH) // window) * window


@dataclass(slots=True)
class WindowDelta:
    """One meter_windows row minus the position columns (the sink adds those).

    Every numeric measurement updates sum/min/max/latest whatever the meter's aggregation,
    so a row is meaningful for any rollup; ``latest_time`` is the greatest event time seen
    (also for COUNT/UNIQUE_COUNT), ``latest_value`` the numeric value at it (None if none).
    """

    meter: str
    subject: str
    window_start: datetime
    group_key: str
    group: dict[str, str]
    generation: int = 0
    count: int = 0
    sum: Decimal = field(default_factory=Decimal)
    min: Decimal | None = None
    max: Decimal | None = None
    uniques: set[str] = field(default_factory=set)
    latest_time: datetime | None = None
    latest_value: Decimal | None = None
    latest_rank: int = 0


class WindowAccumulator:
    """Folds the measurements of one Kafka message into one delta per
    (meter, subject, window_start, group_key).

    Sums are exact (`meterline.core.decimals`, never rounded to 28 digits) and stay storable.
    LATEST keeps the value with the greatest ``(event_time, rank)``; rank is the event's
    position (``kafka_offset*100000 + batch_index``) so equal timestamps resolve the same way
    on every replay.
    """

    __slots__ = ("_cache_key", "_cache_start", "_rows", "_window")

    def __init__(self, window_seconds: int = 60) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self._window = timedelta(seconds=window_seconds)
        self._rows: dict[tuple[str, int, str, datetime, str], WindowDelta] = {}
        # Events of one message usually share a minute: memoise the last window computation.
        self._cache_key: datetime | None = None
        self._cache_start: datetime = _EPOCH

    def add(self, subject: str, event_time: datetime, m: Measurement, rank: int) -> bool:
        """Fold one measurement of one event (at ``event_time``, position ``rank``).

        Returns False, changing nothing, when the value would take its row's sum out of Decimal128(9)
        (±10^29): ClickHouse cannot store that row, so the caller dead-letters the measurement instead
        of stalling the partition on an insert that can never succeed.
        """
        if event_time is self._cache_key:
            ws = self._cache_start
        else:
            ws = self._cache_start = _window_start(event_time, self._window)
            self._cache_key = event_time
        slug = m.meter.slug
        key = (slug, m.generation, subject, ws, m.group_key)
        row = self._rows.get(key)
        value = m.value
        total = None
        if isinstance(value, Decimal) and row is not None:
            total = add(row.sum, value)
            if not fits_storage(total):
                return False
        if row is None:
            row = WindowDelta(slug, subject, ws, m.group_key, dict(m.group), m.generation)
            self._rows[key] = row
        row.count += 1
        newer = row.latest_time is None or (event_time, rank) > (row.latest_time, row.latest_rank)
        if isinstance(value, Decimal):
            row.sum = add(row.sum, value) if total is None else total
            if row.min is None or value < row.min:
                row.min = value
            if row.max is None or value > row.max:
                row.max = value
            if newer:
                row.latest_value = value
        elif isinstance(value, str):
            row.uniques.add(value)
            if newer:
                row.latest_value = None
        elif newer:
            row.latest_value = None
        if newer:
            row.latest_time = event_time
            row.latest_rank = rank
        return True

    def deltas(self) -> list[WindowDelta]:
        """Rows in first-seen order (deterministic for a given message)."""
        return list(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)


_STORED_INTS: dict[int, Decimal] = {}
_STORED_LIMIT = 65_536
"""Ints remembered as their stored Decimal; past it the memo starts again (bounded memory)."""


def _stored(value: int | Decimal) -> Decimal:
    """A reading as the 9-decimal Decimal `parse_numeric` gives (readers keep in-range ints as ints).

    Memoised: minima, maxima and latest values repeat from row to row (a Decimal is immutable), and a
    quantize costs ~25 dict lookups."""
    if type(value) is Decimal:
        return value
    stored = _STORED_INTS.get(value)  # type: ignore[arg-type]
    if stored is None:
        stored = Decimal(value).quantize(QUANTUM, context=CONTEXT)
        if len(_STORED_INTS) >= _STORED_LIMIT:
            _STORED_INTS.clear()
        _STORED_INTS[value] = stored  # type: ignore[index]
    return stored


_ROW_ORDER = itemgetter(0, 1)  # (first event, meter position)


def _last(slots: Slots) -> int:
    return slots[-1]


def _pick(column: Sequence[Any], slots: Slots) -> Sequence[Any]:
    """``column``'s values at ``slots`` (one C call: `itemgetter` returns a tuple for two or more)."""
    return itemgetter(*slots)(column) if len(slots) > 1 else (column[slots[0]],)


Slots = list[int]
"""Positions of events in one `MessageWindows.add` batch (its columns' indexes), ascending."""


def _by_key(keys: Sequence[str], slots: Slots) -> dict[str, Slots]:
    """`slots` split by their `keys` (a column over the whole batch), keys in first-seen order."""
    picked = keys if len(slots) == len(keys) else _pick(keys, slots)
    distinct = dict.fromkeys(picked)
    if len(distinct) == 1:
        return {picked[0]: slots}
    out: dict[str, Slots] = {k: [] for k in distinct}
    for j, k in zip(slots, picked, strict=True):
        out[k].append(j)
    return out


class MessageWindows:
    """Folds one message's `EventReader` readings into the rows `WindowAccumulator` would give.

    Readings come in as columns, one batch per event type (`EventReader.read_columns`): per message, the
    events are split by (subject, window) and then by each distinct groupBy's key -- with C-level checks
    for the common message (one subject, one window, one key) -- and each distinct (value path, groupBy)
    signature is aggregated once per row and copied to every meter sharing it. Sums run in the wide
    Decimal context (exact); ints stay ints until the stored results.
    """

    __slots__ = ("_batches", "_window")

    def __init__(self, window_seconds: int = 60) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self._window = timedelta(seconds=window_seconds)
        self._batches: list[tuple[EventReader, Sequence[int], Sequence[str], Sequence[tuple[datetime, int]],
                                  list[Sequence[Value]], list[Sequence[str] | None]]] = []

    def add(self, reader: EventReader, numbers: Sequence[int], subjects: Sequence[str],
            times: Sequence[tuple[datetime, int]], values: list[Sequence[Value]],
            group_keys: list[Sequence[str] | None]) -> None:
        """Fold a batch of events read by ``reader``: per event its number in the message (among the events
        metered: row order and `Overflow.event`), subject and (event time, rank); and ``reader.read_columns``'
        two lists of columns over the batch."""
        if times:
            self._batches.append((reader, numbers, subjects, times, values, group_keys))

    def rows(self, log_epoch: str, partition: int, offset: int) -> tuple[list[list[Any]], list[Overflow]]:
        """`meter_windows` rows (WINDOW_COLUMNS order) in `WindowAccumulator`'s order (by the first event
        seen, then by the meter's config order), and the measurements left out because they would have
        taken their row's sum past ±10^29 (`WindowAccumulator.add` returning False), in event order."""
        ordered: list[tuple[int, int, list[Any]]] = []
        overflows: list[Overflow] = []
        with localcontext(CONTEXT):
            for reader, numbers, subjects, times, values, group_keys in self._batches:
                clean = [tuple not in set(map(type, col)) for col in values]  # no refused reading
                # Events usually come in time order: then the latest of any slots is the last (ranks are unique).
                latest_of = _last if sorted(times) == list(times) else functools.partial(max, key=times.__getitem__)
                for (subject, ws), slots in self._cells(subjects, times).items():
                    _fold(reader, subject, ws, slots, numbers, times, values, clean, group_keys, latest_of,
                          (log_epoch, partition, offset), ordered, overflows)
        ordered.sort(key=_ROW_ORDER)
        overflows.sort(key=lambda o: (o.event, o.position))
        return [r for _, _, r in ordered], overflows

    def _cells(self, subjects: Sequence[str], times: Sequence[tuple[datetime, int]]) -> dict[tuple[str, datetime], Slots]:
        """A batch's events by (subject, window start), in first-seen order."""
        window = self._window
        n = len(times)
        ws = _window_start(min(times)[0], window)
        if max(times)[0] < ws + window and subjects.count(subjects[0]) == n:  # one cell: no per-event work
            return {(subjects[0], ws): list(range(n))}
        cells: dict[tuple[str, datetime], Slots] = {}
        ws = end = _EPOCH
        for j, (subject, (t, _)) in enumerate(zip(subjects, times, strict=True)):
            if not ws <= t < end:  # a window start is aligned: the one holding t is t's
                ws = _window_start(t, window)
                end = ws + window
            slots = cells.get((subject, ws))
            if slots is None:
                cells[(subject, ws)] = [j]
            else:
                slots.append(j)
        return cells


def _fold(reader: EventReader, subject: str, ws: datetime, slots: Slots, numbers: Sequence[int],
          times: Sequence[tuple[datetime, int]], values: list[Sequence[Value]], clean: list[bool],
          group_keys: list[Sequence[str] | None], latest_of: Callable[[Slots], int], position: tuple[str, int, int],
          out: list[tuple[int, int, list[Any]]], overflows: list[Overflow]) -> None:
    """The rows of one (event type, subject, window) of a message: per signature, per group key.
    ``latest_of(slots)`` is the slot of the greatest (time, rank) among ``slots``."""
    epoch, partition, offset = position
    cells = [{EMPTY_GROUP_KEY: slots} if keys is None else _by_key(keys, slots) for keys in group_keys]
    latest: list[dict[str, int]] = [{gk: latest_of(s) for gk, s in c.items()} for c in cells]
    for (vi, gi, event_from), sharing in zip(reader.signatures, reader.sharing, strict=True):
        group_of = reader.group_readers[gi].group
        col = values[vi] if vi >= 0 else None
        latest_in = latest[gi]
        for gk, group_slots in cells[gi].items():
            slots = group_slots
            total: Decimal = Decimal()
            low: Decimal | None = None
            high: Decimal | None = None
            uniques: list[Any] = []
            latest_value: Decimal | None = None
            filtered = False
            if event_from is not None:  # these meters skip events before their eventFrom
                slots = [j for j in slots if times[j][0] >= event_from]
                if not slots:
                    continue
                filtered = True
            if col is None:
                li = latest_of(slots) if filtered else latest_in[gk]
            else:
                vals = _pick(col, slots)
                if not clean[vi] and tuple in map(type, vals):  # refused for every meter on this path: not in its rows
                    slots = [j for j in slots if type(col[j]) is not tuple]
                    if not slots:
                        continue
                    vals = _pick(col, slots)
                    filtered = True
                if type(vals[0]) is str:  # a UNIQUE_COUNT path: readings are all text
                    uniques = sorted(set(vals))
                    li = latest_of(slots) if filtered else latest_in[gk]
                else:
                    lo, hi = min(vals), max(vals)
                    if max(-lo, hi) * len(vals) >= MAX_ABS_VALUE:
                        # Some running sum may leave Decimal128(9): replay WindowAccumulator's checks.
                        kept = _storable_prefix_sums(slots, col, numbers, sharing, overflows)
                        if len(kept) != len(slots):
                            slots, filtered = kept, True
                            vals = _pick(col, slots)
                            lo, hi = min(vals), max(vals)
                    total = _stored(sum(vals))
                    low, high = _stored(lo), _stored(hi)
                    li = latest_of(slots) if filtered else latest_in[gk]
                    latest_value = _stored(col[li])  # type: ignore[arg-type]
            first = numbers[slots[0]]
            latest_time, latest_rank = times[li]
            group = group_of(gk)
            count = len(slots)
            for pos, slug, generation in sharing:
                out.append((first, pos, [
                    slug, subject, ws, gk, group, epoch, partition, offset,
                    count, total, low, high, uniques, latest_time, latest_value, latest_rank, generation,
                ]))


class Overflow(NamedTuple):
    """A measurement left out of its row: its value would have taken the row's sum past ±10^29."""

    event: int  # the event's number among those added to the MessageWindows
    position: int  # the meter's position among its type's meters (config order)
    meter: str
    generation: int
    value: Decimal


def _storable_prefix_sums(slots: Slots, col: Sequence[Value], order: Sequence[int],
                          sharing: list[tuple[int, str, int]], overflows: list[Overflow]) -> list[int]:
    """The slots `WindowAccumulator.add` keeps, in order: the first always, then each whose value keeps the
    running sum storable; the others are recorded as overflows of every meter sharing the row."""
    kept = [slots[0]]
    running = _stored(col[slots[0]])  # type: ignore[arg-type]
    for j in slots[1:]:
        value = _stored(col[j])  # type: ignore[arg-type]
        after = add(running, value)
        if fits_storage(after):
            running = after
            kept.append(j)
        else:
            overflows.extend(Overflow(order[j], pos, slug, generation, value) for pos, slug, generation in sharing)
    return kept
