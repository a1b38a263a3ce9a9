"""Undoing a stored copy that lost to another copy of its key: the window rows that replace its message's.

Two workers that decide copies of one key before either is written both store and count theirs; once
both are stored, `positions.first_sighting` says which one stays, and the owner of the loser's partition
retracts the loser (`ClickHouseSink.retract`, processor/sink.py). Its `events` row can simply be deleted, but its usage sits
inside window rows shared with the other events of its message, one row per (meter, subject, minute,
group) keyed by the message's position. Those rows are *replaced*, never deleted: ReplacingMergeTree
keeps the last row written for an identity, so a replacement swaps a row in one step, and a query never
sees the message without its windows.

The replacement is what the worker would have written had it dropped the loser in the first place:
`message_rows` over the message's stored events minus the losers, at the message's broker time (so the
late horizon decides as it did). A row that only losers fed has nothing to be rebuilt from; it is
replaced by a zero row (count 0, no sum, min, max, uniques or latest value), which every answer skips
(queries read `count > 0`: query/sql.py; real rows always count at least one event). Since the result
depends only on stored rows and the meters, retracting twice writes the same rows: a crash part-way is
repaired by doing it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

from meterline.core.meters import MeterSet
from meterline.core.positions import Sighting
from meterline.core.rows import (
    EPOCH_START,
    MessagePosition,
    RowOptions,
    Rows,
    always_accept,
    message_rows,
    stored_messages,
)
from meterline.core.times import as_utc

#: What a retraction reads of the loser's message's stored window rows: enough to write a zero row.
WINDOW_IDENTITY_COLUMNS: tuple[str, ...] = (
    "meter", "subject", "window_start", "group_key", "group", "generation", "namespace",
)


class Loser(NamedTuple):
    """A stored copy of `key` that lost to `winner` (`positions.first_sighting`): it must stop counting."""

    key: bytes
    loser: Sighting
    winner: Sighting

    @property
    def message(self) -> MessagePosition:
        return MessagePosition(self.loser.log_epoch, self.loser.partition, self.loser.offset)

    @property
    def position(self) -> tuple[str, int, int, int]:
        """The loser's (log_epoch, partition, offset, index): its rows' identity in events, dead_letters
        and dedupe_keys."""
        return self.loser.log_epoch, self.loser.partition, self.loser.offset, self.loser.index

    @property
    def winner_position(self) -> tuple[str, int, int, int]:
        return self.winner.log_epoch, self.winner.partition, self.winner.offset, self.winner.index


def _identity(meter: str, subject: str, window_start: Any, group_key: str, generation: int) -> tuple[Any, ...]:
    start = int(as_utc(window_start).timestamp()) if isinstance(window_start, datetime) else int(window_start)
    return meter, subject, start, group_key, int(generation)


def zero_row(message: MessagePosition, meter: str, subject: str, window_start: datetime, group_key: str,
             group: Any, generation: int, namespace: str) -> list[Any]:
    """A `meter_windows` row (WINDOW_COLUMNS order) that replaces a row and contributes nothing."""
    return [meter, subject, as_utc(window_start), group_key, group, message.log_epoch, message.partition, message.offset,
            0, Decimal(0), None, None, [], EPOCH_START, None, 0, generation, namespace]


def replacement_windows(
    message: MessagePosition,
    stored_events: Iterable[Sequence[Any]],
    stored_windows: Iterable[Sequence[Any]],
    meters: MeterSet,
    options: RowOptions,
    received: datetime | None,
) -> list[list[Any]]:
    """The window rows that replace `message`'s once its losers are left out.

    `stored_events`: the message's `events` rows that stay (STORED_EVENT_COLUMNS, losers excluded), in
    index order; `stored_windows`: its stored window rows (WINDOW_IDENTITY_COLUMNS); `received`: its broker
    time (None when none of its events stays: then only zero rows are written). A stored row of a meter
    generation the meters no longer hold is left alone: nothing here can rebuild it, and no query reads it.
    """
    rows = Rows()
    if received is not None:
        for pos, events, indexes in stored_messages(stored_events, skip=lambda _: False):
            message_rows(events, pos, meters, options, always_accept, now=received, rows=rows, indexes=indexes)
    built = {_identity(r[0], r[1], r[2], r[3], r[16]) for r in rows.windows}
    zeros = []
    for meter, subject, window_start, group_key, group, generation, namespace in stored_windows:
        if _identity(meter, subject, window_start, group_key, generation) in built:
            continue
        held = {(m.slug, g) for reader in meters.readers_of(namespace).values() for m, g, *_ in reader.meters}
        if (meter, int(generation)) in held:
            zeros.append(zero_row(message, meter, subject, window_start, group_key, group, int(generation), namespace))
    return rows.windows + zeros
