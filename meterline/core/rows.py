"""Turn one Kafka message (a batch of CloudEvents) into ClickHouse rows, and stored rows back into events.

Pure on purpose: the worker and `meterline recompute` (which rebuilds a meter's windows from the stored
`events` table with `decide=always_accept`) must produce byte-identical rows for the same message, or
replays would not collapse in ReplacingMergeTree. Nothing here does I/O; dedupe is injected as `decide`.

Row shapes follow `meterline.core.schema` column orders exactly (EVENT_COLUMNS, DEAD_LETTER_COLUMNS,
WINDOW_COLUMNS). Every row carries the namespace of its message (the `meterline_namespace` attribute
ingest sets; absent = `default`), and dedupe keys hash it in: tenants never deduplicate each other.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

import orjson

from meterline.core.access import DEFAULT_NAMESPACE
from meterline.core.accumulator import MessageWindows, Overflow
from meterline.core.attributes import storage_problem
from meterline.core.events.wire import NAMESPACE_ATTRIBUTE, SPECVERSION
from meterline.core.meters import MISSING, MeterSet
from meterline.core.meters.reading import EventReader
from meterline.core.positions import Position, dedupe_key
from meterline.core.reasons import WHOLE_EVENT, ReasonCode, StoredRejection, rejections_of
from meterline.core.schema import EVENT_COLUMNS
from meterline.core.times import MAX_TIME, MIN_TIME, as_utc, format_time, parse_canonical_time

logger = logging.getLogger(__name__)

#: rank = offset * RANK_SCALE + index: LATEST's tie-break for equal event times (design.md).
RANK_SCALE = 100_000
EPOCH_START = datetime(1970, 1, 1, tzinfo=UTC)

Decide = Callable[[bytes, Position], bool]
#: `Position(...)` without NamedTuple's Python-level __new__ (the same tuple, a third of the cost per event).
_position: Callable[[tuple[str, int, int, int]], Position] = functools.partial(tuple.__new__, Position)


def always_accept(key: bytes, position: Position) -> bool:
    """The `decide` of recompute: the stored `events` table already holds only first sightings."""
    return True


class MessagePosition(NamedTuple):
    """Identity of one Kafka message; an event's position adds its index inside the array."""

    log_epoch: str
    partition: int
    offset: int


class RowSettings(Protocol):
    """The fields of `meterline.settings.Settings` that change rows (the core cannot import settings)."""

    late_horizon_days: int | None
    window_size_seconds: int
    strict_event_types: bool


@dataclass(frozen=True, slots=True)
class RowOptions:
    """The settings that change rows; built once from `Settings` so the hot loop reads attributes."""

    window_seconds: int = 60
    late_horizon: timedelta | None = None
    strict_event_types: bool = False

    @classmethod
    def from_settings(cls, settings: RowSettings) -> RowOptions:
        days = settings.late_horizon_days
        return cls(
            window_seconds=settings.window_size_seconds,
            late_horizon=None if days is None else timedelta(days=days),
            strict_event_types=settings.strict_event_types,
        )


@dataclass(slots=True)
class Rows:
    """Rows for the three tables plus counters for metrics; `extend`-able across messages of a batch."""

    events: list[list[Any]] = field(default_factory=list)
    dead_letters: list[list[Any]] = field(default_factory=list)
    windows: list[list[Any]] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.events) + len(self.dead_letters) + len(self.windows)


def _printable(event: Any) -> Mapping[str, Any]:
    """The identity attributes of an invalid event as dead-letter strings (anything else shows as '')."""
    if not isinstance(event, Mapping):
        return {}
    return {k: v for k in ("id", "source", "type", "subject") if type(v := event.get(k)) is str}


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()[:65536]
    except TypeError:
        return repr(value)[:65536]


_CORE_ATTRIBUTES = frozenset({"specversion", "id", "source", "type", "subject", "time", "data", NAMESPACE_ATTRIBUTE})


def _attributes_text(event: Mapping[str, Any]) -> str:
    """The `events.attributes` column: the event's other CloudEvents attributes (`datacontenttype`,
    `dataschema`, extensions) as JSON text, "" when there are none, so the event list shows the event
    as it was sent."""
    extra = {k: v for k, v in event.items() if k not in _CORE_ATTRIBUTES}
    return orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode() if extra else ""


def _data_text(event: Mapping[str, Any]) -> str:
    """The `events.data` column: JSON text, "" when the event had no data (`stored_event` inverts it)."""
    if "data" not in event:
        return ""
    return orjson.dumps(event["data"]).decode()


def stored_event(
    event_id: str, source: str, event_type: str, subject: str, time: datetime, data: str,
    namespace: str = DEFAULT_NAMESPACE,
) -> dict[str, Any]:
    """The event as ingest normalised it, rebuilt from a stored `events` row ("" data = the event had no data).

    Recompute and dead-letter replay feed stored events back through `message_rows`; both must rebuild
    exactly what the worker decoded from Kafka, or rows would not match.
    """
    event: dict[str, Any] = {
        "specversion": SPECVERSION, "id": event_id, "source": source, "type": event_type,
        "subject": subject, "time": format_time(as_utc(time)),
    }
    if data != "":
        event["data"] = orjson.loads(data)
    if namespace != DEFAULT_NAMESPACE:
        event[NAMESPACE_ATTRIBUTE] = namespace
    return event


def stored_messages(
    rows: Iterable[Sequence[Any]], skip: Callable[[list[StoredRejection]], bool],
) -> Iterator[tuple[MessagePosition, list[dict[str, Any]], list[int]]]:
    """Group position-ordered `STORED_EVENT_COLUMNS` rows into (message position, events, their original
    indexes), for `message_rows(..., indexes=...)`; an event whose stored rejections `skip` is left out.

    Recompute, dead-letter replay and the query's edge minutes re-meter stored events this way, so the
    rows they build carry the identities and ranks the worker's would.
    """
    current: MessagePosition | None = None
    batch: list[dict[str, Any]] = []
    indexes: list[int] = []
    for row in rows:
        if skip(rejections_of(row[10])):
            continue
        pos = MessagePosition(str(row[0]), int(row[1]), int(row[2]))
        if pos != current:
            if current is not None:
                yield current, batch, indexes
            current, batch, indexes = pos, [], []
        batch.append(stored_event(row[4], row[5], row[6], row[7], row[8], row[9], namespace=row[11]))
        indexes.append(int(row[3]))
    if current is not None:
        yield current, batch, indexes


def message_namespace(events: Sequence[Any]) -> str:
    """The namespace of a message: its first event's (ingest gives every event of a message the same);
    `default` when absent or not a string (a foreign producer's message)."""
    first = events[0] if events else None
    ns = first.get(NAMESPACE_ATTRIBUTE, DEFAULT_NAMESPACE) if isinstance(first, Mapping) else DEFAULT_NAMESPACE
    return ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE


def _dead(
    rows: Rows, pos: MessagePosition, index: int, meter: str, event: Mapping[str, Any],
    t: datetime, data: str, code: ReasonCode, reason: str, now: datetime, generation: int = 0,
    namespace: str = DEFAULT_NAMESPACE,
) -> None:
    rows.dead_letters.append([
        pos.log_epoch, pos.partition, pos.offset, index, meter,
        str(event.get("id", "")), str(event.get("source", "")), str(event.get("type", "")),
        str(event.get("subject", "")), t, data, code, reason, now, generation, namespace,
    ])
    rows.dead_by_reason[code] = rows.dead_by_reason.get(code, 0) + 1


def _metering_dead_letters(out: Rows, pos: MessagePosition, refusals: Mapping[int, list[tuple[str, int, ReasonCode, str]]],
                           overflows: Sequence[Overflow], metered: Sequence[tuple[int, int]], now: datetime,
                           namespace: str = DEFAULT_NAMESPACE) -> None:
    """Dead letters (and event errors) of metered events, found once the whole message was read: the
    meters that refused an event's value (`EventReader.refusals`), then the measurements whose value would
    have taken their window row's sum past ±10^29 (ClickHouse cannot store that row, so they are refused
    like any unstorable value). Each event's go where it was metered: after the dead letters of the events
    before it, in the order they would have had if written while the event was metered."""
    errors_at = EVENT_COLUMNS.index("validation_errors")
    rejected_at = EVENT_COLUMNS.index("rejections")
    by_event: dict[int, list[tuple[str, int, ReasonCode, str]]] = {n: list(r) for n, r in refusals.items()}
    for o in overflows:
        reason = f"{o.value} would take the sum of its window in this message past ±10^29"
        by_event.setdefault(o.event, []).append((o.meter, o.generation, ReasonCode.VALUE_OUT_OF_RANGE, reason))
    for number in sorted(by_event, reverse=True):  # inserting from the end keeps earlier places valid
        row_at, dead_at = metered[number]
        row = out.events[row_at]
        identity = {"id": row[1], "source": row[2], "type": row[3], "subject": row[4]}
        index = row[EVENT_COLUMNS.index("batch_index")]
        letters = Rows()
        errors, rejected = row[errors_at], row[rejected_at]
        for slug, generation, code, reason in by_event[number]:
            _dead(letters, pos, index, slug, identity, row[5], row[6], code, reason, now, generation, namespace)
            error = f"{slug}: {reason}"
            if error not in errors:  # a meter's active and building generation may both refuse
                errors.append(error)
            if (slug, code) not in rejected:
                rejected.append(StoredRejection(slug, code))
        out.dead_letters[dead_at:dead_at] = letters.dead_letters
        for counted, n in letters.dead_by_reason.items():
            out.dead_by_reason[counted] = out.dead_by_reason.get(counted, 0) + n


def undecodable_rows(pos: MessagePosition, payload: bytes, reason: str, now: datetime, rows: Rows) -> Rows:
    """A message that is not a JSON array of events becomes one dead letter (never a worker crash)."""
    text = payload[:65536].decode("utf-8", "replace")
    _dead(rows, pos, 0, WHOLE_EVENT, {}, EPOCH_START, text, ReasonCode.INVALID_EVENT, reason, now)
    return rows


#: `batch_index` of a dead letter standing for a whole message (no event of it has this index).
WHOLE_MESSAGE_INDEX = 2**32 - 1


def quarantined_rows(pos: MessagePosition, payload: bytes, reason: str, now: datetime,
                     namespace: str = DEFAULT_NAMESPACE) -> Rows:
    """The one dead letter (`invalid_event`) of a message whose rows ClickHouse refused, in the message's
    namespace (its payload is that tenant's data).

    Its index is WHOLE_MESSAGE_INDEX so it never replaces a per-event dead letter of the same message.
    """
    rows = Rows()
    text = payload[:65536].decode("utf-8", "replace")
    _dead(rows, pos, WHOLE_MESSAGE_INDEX, WHOLE_EVENT, {}, EPOCH_START, text, ReasonCode.INVALID_EVENT, reason, now,
          namespace=namespace)
    return rows


def message_rows(
    events: Sequence[Mapping[str, Any]],
    pos: MessagePosition,
    meters: MeterSet,
    options: RowOptions,
    decide: Decide,
    *,
    now: datetime | None = None,
    keys: Sequence[bytes] | None = None,
    rows: Rows | None = None,
    indexes: Sequence[int] | None = None,
) -> Rows:
    """Rows for one message: `events` rows for accepted first sightings, `dead_letters` for what could
    not be metered (invalid, too late, unknown type in strict mode, per-meter rejections), and one
    `meter_windows` delta row per (meter, subject, minute, group) carrying the message's position.

    `keys` may carry precomputed dedupe keys (the worker hashes them once for its RocksDB lookups).
    `rows` accumulates several messages into one set of lists (one ClickHouse insert per batch).
    `indexes` gives each event's original index in its message when `events` is a subset of it
    (recompute and dead-letter replay rebuild from stored rows), so positions and LATEST ranks are
    the ones the worker produced.
    """
    if keys is not None and indexes is not None:
        raise ValueError("keys are positional: pass them only with the whole message")
    out = Rows() if rows is None else rows
    now = datetime.now(UTC) if now is None else now
    late_floor = None if options.late_horizon is None else now - options.late_horizon
    strict = options.strict_event_types
    epoch, partition, offset = pos
    ns = message_namespace(events)
    rank_base = offset * RANK_SCALE
    acc = MessageWindows(options.window_seconds)
    readers = meters.readers_of(ns)
    ev_append = out.events.append
    dumps = orjson.dumps
    core_attributes = _CORE_ATTRIBUTES
    #: per event type: its metered events' (number, subject, (time, rank), data), read once the loop is done
    pending: dict[EventReader, list[tuple[int, str, tuple[datetime, int], Any]]] = {}
    #: per metered event (by number): (its events row, where its dead letters go)
    metered: list[tuple[int, int]] = []
    for index, event in (enumerate(events) if indexes is None else zip(indexes, events, strict=True)):
        try:
            source = event["source"]
            event_id = event["id"]
            subject = event["subject"]
            etype = event["type"]
            t = parse_canonical_time(event["time"])
            if not (type(source) is str and type(event_id) is str and type(subject) is str and type(etype) is str
                    and source and event_id and subject and etype and MIN_TIME <= t < MAX_TIME):
                problem = storage_problem(event, t)  # says which rule, in the order it checks them
                if problem is not None:
                    raise ValueError(f"{problem[0]} {problem[1]}")
            if event.get(NAMESPACE_ATTRIBUTE, DEFAULT_NAMESPACE) != ns:
                raise ValueError(f"{NAMESPACE_ATTRIBUTE} differs from the message's ({ns!r})")
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            # Ingest validates every event, so this is a foreign producer: keep it visible, never crash,
            # and never hand ClickHouse a row it must refuse (that batch would be retried for ever).
            _dead(out, pos, index, WHOLE_EVENT, _printable(event), EPOCH_START,
                  _json_text(event), ReasonCode.INVALID_EVENT, f"invalid event: {exc}", now, namespace=ns)
            continue
        key = keys[index] if keys is not None else dedupe_key(source, event_id, ns)
        if not decide(key, _position((epoch, partition, offset, index))):
            out.duplicates += 1
            continue
        out.accepted += 1
        content = event.get("data", MISSING)
        data = "" if content is MISSING else dumps(content).decode()  # _data_text, inline
        # Per event, for the `events` row: what people read, and what logic reads (reasons.py).
        errors: list[str] = []
        rejected: list[StoredRejection] = []
        if late_floor is not None and t < late_floor:
            out.late += 1
            reason = f"event time is older than the late horizon ({options.late_horizon})"
            _dead(out, pos, index, WHOLE_EVENT, event, t, data, ReasonCode.TOO_LATE, reason, now, namespace=ns)
            errors.append(f"*: {reason}")
            rejected.append(StoredRejection(WHOLE_EVENT, ReasonCode.TOO_LATE))
        else:
            reader = readers.get(etype)
            if reader is not None and (reader.applies_from is None or t >= reader.applies_from):
                batch = pending.get(reader)
                if batch is None:
                    batch = pending[reader] = []
                batch.append((len(metered), subject, (t, rank_base + index), content))
                metered.append((len(out.events), len(out.dead_letters)))
            elif strict:
                reason = f"no meter has eventType {etype!r}"
                _dead(out, pos, index, WHOLE_EVENT, event, t, data, ReasonCode.UNKNOWN_TYPE, reason, now, namespace=ns)
                errors.append(f"*: {reason}")
                rejected.append(StoredRejection(WHOLE_EVENT, ReasonCode.UNKNOWN_TYPE))
        ev_append([key, event_id, source, etype, subject, t, data, now, epoch, partition, offset, index, errors,
                   "" if event.keys() <= core_attributes else _attributes_text(event), rejected, ns])
    refusals: dict[int, list[tuple[str, int, ReasonCode, str]]] = {}
    for reader, batch in pending.items():
        numbers, subjects, times, contents = zip(*batch, strict=True)
        values, group_keys = reader.read_columns(contents)
        acc.add(reader, numbers, subjects, times, values, group_keys)
        if reader.refusers:
            refused = sorted({j for col in values if tuple in set(map(type, col))
                              for j, v in enumerate(col) if type(v) is tuple})
            for j in refused:
                found = reader.refusals([col[j] for col in values], times[j][0])
                if found:
                    refusals[numbers[j]] = found
    window_rows, overflows = acc.rows(epoch, partition, offset)
    for row in window_rows:
        row.append(ns)
    out.windows.extend(window_rows)
    if refusals or overflows:
        _metering_dead_letters(out, pos, refusals, overflows, metered, now, ns)
    return out
