"""The window accumulator: one Kafka message's measurements folded into minute-window delta rows.

(Query-time windows, in a zone and of a size, are `query/windowing.py`.)

Windows follow **event time**, not arrival: a usage report that arrives late (or is
replayed) must land in the minute it happened, otherwise totals would depend on broker lag.
Storage is always minute windows in UTC; since every IANA zone offset is a multiple of 15
minutes, minute rows roll up exactly into any zone's hours, days and months at query time.

One :class:`WindowAccumulator` is used per Kafka message: all the rows it yields share that
message's position identity ``(log_epoch, partition, offset)``, so re-processing the message
rewrites byte-identical rows that ReplacingMergeTree collapses (exactly-once effect).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from meterline.core.decimals import add, fits_storage
from meterline.core.meters import Measurement

__all__ = ["WindowAccumulator", "WindowDelta"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
            if event_time.tzinfo is None or event_time.utcoffset() is None:
                raise ValueError("event_time must be an aware datetime")
            ws = _EPOCH + ((event_time - _EPOCH) // self._window) * self._window
            self._cache_key = event_time
            self._cache_start = ws
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
