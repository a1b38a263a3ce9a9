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
one `EventReader` reading per event and pays per *distinct* groupBy per event, then computes each
distinct (value path, groupBy) row once per message for all the meters sharing it, with C-level
`sum`/`min`/`max` over the message's values, so twenty meters cost little more than three.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any, NamedTuple

from meterline.core.decimals import CONTEXT, MAX_ABS_VALUE, QUANTUM, add, fits_storage
from meterline.core.meters import Measurement
from meterline.core.meters.reading import EventReader, Value

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


def _stored(value: int | Decimal) -> Decimal:
    """A reading as the 9-decimal Decimal `parse_numeric` gives (readers keep in-range ints as ints)."""
    if type(value) is Decimal:
        return value
    return Decimal(value).quantize(QUANTUM, context=CONTEXT)


class _CellState:
    """One event type's readings for one (subject, window) of one message: a slot per event, and the
    slots of each distinct groupBy's group keys."""

    __slots__ = ("cells", "order", "readings", "times")

    def __init__(self, groups: int) -> None:
        self.times: list[tuple[datetime, int]] = []  # (event time, rank) per slot
        self.order: list[int] = []  # the slot's event number in the message (row order)
        self.readings: list[list[Value]] = []
        #: per distinct groupBy: group key -> slots, in first-seen order
        self.cells: list[defaultdict[str, list[int]]] = [defaultdict(list) for _ in range(groups)]


class MessageWindows:
    """Folds one message's `EventReader` readings into the rows `WindowAccumulator` would give.

    Per event: one slot, and one append per distinct groupBy. Per message: each distinct
    (value path, groupBy) signature is aggregated once per row and copied to every meter sharing it.
    Sums run in the wide Decimal context (exact); ints stay ints until the stored results.
    """

    __slots__ = ("_cache_key", "_cache_start", "_events", "_states", "_window")

    def __init__(self, window_seconds: int = 60) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self._window = timedelta(seconds=window_seconds)
        self._states: dict[tuple[EventReader, str, datetime], _CellState] = {}
        self._events = 0
        self._cache_key: datetime | None = None
        self._cache_start: datetime = _EPOCH

    def add(self, reader: EventReader, subject: str, event_time: datetime, rank: int,
            values: list[Value], group_keys: Sequence[str]) -> None:
        """Fold one event read by ``reader`` (``reader.read``'s two lists) at ``event_time``, ``rank``."""
        if event_time is self._cache_key:
            ws = self._cache_start
        else:
            ws = self._cache_start = _window_start(event_time, self._window)
            self._cache_key = event_time
        key = (reader, subject, ws)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _CellState(len(reader.group_readers))
        slot = len(st.times)
        st.times.append((event_time, rank))
        st.order.append(self._events)
        self._events += 1
        st.readings.append(values)
        for cells, gk in zip(st.cells, group_keys, strict=True):
            cells[gk].append(slot)

    def rows(self, log_epoch: str, partition: int, offset: int) -> tuple[list[list[Any]], list[Overflow]]:
        """`meter_windows` rows (WINDOW_COLUMNS order) in `WindowAccumulator`'s order (by the first event
        seen, then by the meter's config order), and the measurements left out because they would have
        taken their row's sum past ±10^29 (`WindowAccumulator.add` returning False), in event order."""
        ordered: list[tuple[int, int, list[Any]]] = []
        overflows: list[Overflow] = []
        with localcontext(CONTEXT):
            for (reader, subject, ws), st in self._states.items():
                self._fold(reader, subject, ws, st, (log_epoch, partition, offset), ordered, overflows)
        ordered.sort(key=lambda o: (o[0], o[1]))
        overflows.sort(key=lambda o: (o.event, o.position))
        return [r for _, _, r in ordered], overflows

    @staticmethod
    def _fold(reader: EventReader, subject: str, ws: datetime, st: _CellState, position: tuple[str, int, int],
              out: list[tuple[int, int, list[Any]]], overflows: list[Overflow]) -> None:
        epoch, partition, offset = position
        columns: list[tuple[Value, ...]] = list(zip(*st.readings, strict=True)) if st.readings[0] else []
        times, order = st.times, st.order
        latest_of = times.__getitem__
        latest: list[dict[str, int]] = [
            {gk: max(slots, key=latest_of) for gk, slots in cells.items()} for cells in st.cells
        ]
        for (vi, gi, event_from), sharing in zip(reader.signatures, reader.sharing, strict=True):
            group_of = reader.group_readers[gi].group
            col = columns[vi] if vi >= 0 else None
            latest_in = latest[gi]
            for gk, slots in st.cells[gi].items():
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
                    li = max(slots, key=latest_of) if filtered else latest_in[gk]
                else:
                    vals = [col[j] for j in slots]
                    if tuple in map(type, vals):  # refused for every meter on this path: not in its rows
                        slots = [j for j in slots if type(col[j]) is not tuple]
                        if not slots:
                            continue
                        vals = [col[j] for j in slots]
                        filtered = True
                    if type(vals[0]) is str:  # a UNIQUE_COUNT path: readings are all text
                        uniques = sorted(set(vals))
                        li = max(slots, key=latest_of) if filtered else latest_in[gk]
                    else:
                        lo, hi = min(vals), max(vals)  # type: ignore[type-var]
                        if max(-lo, hi) * len(vals) >= MAX_ABS_VALUE:  # type: ignore[operator,type-var]
                            # Some running sum may leave Decimal128(9): replay WindowAccumulator's checks.
                            kept = _storable_prefix_sums(slots, col, order, sharing, overflows)
                            if len(kept) != len(slots):
                                slots, filtered = kept, True
                                vals = [col[j] for j in slots]
                                lo, hi = min(vals), max(vals)  # type: ignore[type-var]
                        total = _stored(sum(vals))  # type: ignore[arg-type]
                        low, high = _stored(lo), _stored(hi)  # type: ignore[arg-type]
                        li = max(slots, key=latest_of) if filtered else latest_in[gk]
                        latest_value = _stored(col[li])  # type: ignore[arg-type]
                first = order[slots[0]]
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


def _storable_prefix_sums(slots: list[int], col: tuple[Value, ...], order: list[int],
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
