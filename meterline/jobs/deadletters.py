"""Dead letters: list what could not be metered, and re-meter it after the configuration was fixed.

Why replay does NOT re-publish to Kafka: a dead-lettered event was accepted as the first sighting of
its (source, id) -- it is in `events`, and every worker's dedupe state remembers its position -- so a
re-published copy sits at a later position and is dropped as a duplicate (docs/design.md,
"Exactly-once effect" 2). Giving it a new id would break that very rule and double count on a second
replay. Instead replay writes the windows the event would have produced, next to the processor's:

* Rows are built by the processor's own row builder (`meterline.core.rows.message_rows`, with
  `always_accept` as in recompute) from the event rebuilt out of the dead_letters row, at its ORIGINAL
  position: same partition, offset and index, so LATEST's tie-break rank is the original one.
* Their identity is `log_epoch = "replay:<reason_code>:<meter or *>:<original epoch>"` plus the original
  partition and offset. That never collides with a processor row (whose log_epoch is a cluster id), so
  the processor's windows of the same message are untouched, and it is deterministic: replaying the
  same dead letters twice writes byte-identical rows that ReplacingMergeTree collapses.
* One replay group = all dead letters of one (message, reason_code, meter). A group is always rebuilt
  from ALL its dead letters (already replayed or not), so a rewrite replaces the previous rows of that
  group completely; rows of the group that the new config no longer produces (e.g. groupBy changed)
  are deleted, so replaying under a later config converges instead of adding up.
* Per-meter dead letters (`value_missing`, `value_not_numeric`, ...) only contribute windows of that
  meter -- the other meters already metered the event. Whole-event ones (`too_late`, `unknown_type`)
  contribute to every meter of the event type, judged against the late horizon at the original
  `received_at`, so the outcome does not depend on when replay runs.
* Guard against double counting: a dead letter is replayed only while the `events` row of its
  (source, id) still has this position and still records this meter's failure. If the processor itself
  re-processed the message under the new config (a crash before its ack), it already metered the event
  and the dead letter is reported as `superseded` instead.
* `invalid_event` dead letters are never replayed: there is no valid event to rebuild (fix the producer).

Outcomes are recorded in `dead_letter_replays` (meterline.core.schema): `metered`,
`still_rejected` (the config still cannot meter it) or `superseded`. `list` hides metered ones unless
asked. Run replay after the processor runs with the fixed config and has caught up.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from meterline.adapters.clickhouse import create_schema, mutate, storage_errors
from meterline.adapters.compactions import fenced_writes
from meterline.core.access import DEFAULT_NAMESPACE
from meterline.core.meters import MeterSet
from meterline.core.reasons import ReasonCode, rejections_of
from meterline.core.rows import MessagePosition, RowOptions, always_accept, message_rows, stored_event
from meterline.core.schema import (
    DEAD_LETTER_COLUMNS,
    DEAD_LETTER_REPLAYS,
    DEAD_LETTERS,
    EVENTS,
    METER_WINDOWS,
    SINGLE_NODE,
    WINDOW_COLUMNS,
    Topology,
    bind_if,
    mutation_target,
    qualified,
)
from meterline.core.times import as_utc, format_sql_time

logger = logging.getLogger(__name__)

#: (log_epoch, partition, offset, reason_code, meter) of the dead letters replayed as one message.
ReplayGroup = tuple[str, int, int, str, str]

REPLAY_EPOCH_PREFIX = "replay:"
WINDOW_GENERATION = WINDOW_COLUMNS.index("generation")
NOT_REPLAYABLE = frozenset({ReasonCode.INVALID_EVENT})
#: How a whole-event group is spelled in a replay log epoch (part of stored row identities: never change).
WHOLE_EVENT_TAG = "*"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead_letters row (DEAD_LETTER_COLUMNS order)."""

    log_epoch: str
    partition: int
    offset: int
    index: int
    meter: str
    id: str
    source: str
    type: str
    subject: str
    time: datetime
    data: str
    reason_code: str
    reason: str
    received_at: datetime
    generation: int = 0
    namespace: str = DEFAULT_NAMESPACE

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> DeadLetter:
        (epoch, part, off, idx, meter, id_, source, type_, subject, t, data, code, reason, received,
         generation, namespace) = row[:16]
        return cls(str(epoch), int(part), int(off), int(idx), str(meter), str(id_), str(source), str(type_),
                   str(subject), as_utc(t), str(data), str(code), str(reason), as_utc(received), int(generation),
                   str(namespace))

    @property
    def identity(self) -> tuple[str, int, int, int, str]:
        return (self.log_epoch, self.partition, self.offset, self.index, self.meter)

    def event(self) -> dict[str, Any]:
        """The CloudEvent as ingest normalised it ("" data = the event had no data)."""
        return stored_event(self.id, self.source, self.type, self.subject, self.time, self.data, self.namespace)


@dataclass
class ReplayReport:
    metered: int = 0
    still_rejected: int = 0
    superseded: int = 0
    not_replayable: int = 0
    window_rows: int = 0
    stale_rows_deleted: int = 0
    groups: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)



def ensure_replays_table(client: Client, database: str, topology: Topology = SINGLE_NODE) -> None:
    """Databases created before the replays table existed get it on first use (idempotent DDL)."""
    create_schema(client, database, topology)


def replay_epoch(reason_code: str, meter: str, log_epoch: str) -> str:
    """The log_epoch of a replay group's window rows: distinct from any cluster id, deterministic."""
    return f"{REPLAY_EPOCH_PREFIX}{reason_code}:{meter or WHOLE_EVENT_TAG}:{log_epoch}"


def list_dead_letters(client: Client, database: str, *, meter: str | None = None, reason: str | None = None,
                      limit: int | None = 100, include_replayed: bool = False,
                      topology: Topology = SINGLE_NODE) -> list[tuple[DeadLetter, str]]:
    """Newest first: (dead letter, replay outcome or ""); metered ones only with `include_replayed`.

    GLOBAL JOIN: on a cluster both sides are Distributed tables; the replays side is read once and sent
    to every shard (ClickHouse refuses a plain JOIN of two Distributed tables)."""
    ensure_replays_table(client, database, topology)
    where, params = _filters(meter, reason)
    identity = "(log_epoch, kafka_partition, kafka_offset, batch_index, meter)"
    sql = (
        f"SELECT {', '.join('d.' + c for c in DEAD_LETTER_COLUMNS)}, r.outcome "
        f"FROM {qualified(database, DEAD_LETTERS)} AS d FINAL "
        f"GLOBAL LEFT JOIN (SELECT {identity.strip('()')}, outcome FROM {qualified(database, DEAD_LETTER_REPLAYS)} FINAL) AS r "
        "USING (log_epoch, kafka_partition, kafka_offset, batch_index, meter) "
    )
    conds = [f"d.{w}" for w in where]
    if not include_replayed:
        conds.append("r.outcome != 'metered'")
    if conds:
        sql += "WHERE " + " AND ".join(conds) + " "
    sql += "ORDER BY d.received_at DESC, d.log_epoch, d.kafka_partition, d.kafka_offset, d.batch_index, d.meter"
    if limit is not None:
        sql += " LIMIT {limit:UInt32}"
        params["limit"] = int(limit)
    with storage_errors():
        rows = client.query(sql, parameters=params).result_rows
    return [(DeadLetter.from_row(r[:-1]), str(r[-1] or "")) for r in rows]


def _filters(meter: str | None, reason: str | None) -> tuple[list[str], dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    bind_if(params, where, "meter", meter, "meter = {meter:String}")
    bind_if(params, where, "reason", reason, "reason_code = {reason:String}")
    return where, params


def _load(client: Client, database: str, meter: str | None, reason: str | None) -> list[DeadLetter]:
    where, params = _filters(meter, reason)
    sql = f"SELECT {', '.join(DEAD_LETTER_COLUMNS)} FROM {qualified(database, DEAD_LETTERS)} FINAL"
    if where:
        sql += " WHERE " + " AND ".join(where)
    with storage_errors():
        return [DeadLetter.from_row(r) for r in client.query(sql, parameters=params).result_rows]


def _first_sightings(client: Client, database: str,
                     letters: Iterable[DeadLetter]) -> dict[tuple[str, str, str], tuple[Any, ...]]:
    """(namespace, source, id) -> (log_epoch, partition, offset, index, rejections) from `events` FINAL
    (two tenants may send the same (source, id): each is its own event)."""
    letters = list(letters)
    if not letters:
        return {}
    sql = (
        "SELECT source, id, log_epoch, kafka_partition, kafka_offset, batch_index, rejections, namespace "
        f"FROM {qualified(database, EVENTS)} FINAL "
        "WHERE subject IN {subjects:Array(String)} AND id IN {ids:Array(String)}"
    )
    params = {"subjects": sorted({d.subject for d in letters}), "ids": sorted({d.id for d in letters})}
    with storage_errors():
        rows = client.query(sql, parameters=params).result_rows
    return {(str(r[7]), str(r[0]), str(r[1])): (str(r[2]), int(r[3]), int(r[4]), int(r[5]), rejections_of(r[6]))
            for r in rows}


def _still_failing(letter: DeadLetter, sighting: tuple[Any, ...] | None) -> bool:
    """The processor's latest word on this event still says this meter (or the whole event) failed."""
    if sighting is None or tuple(sighting[:4]) != letter.identity[:4]:
        return False
    return any(r.meter == letter.meter for r in sighting[4])  # WHOLE_EVENT ("") for whole-event letters


def replay(client: Client, database: str, meters: MeterSet, options: RowOptions, *, meter: str | None = None,
           reason: str | None = None, topology: Topology = SINGLE_NODE,
           active: Mapping[tuple[str, str], int] | None = None) -> ReplayReport:
    """Re-meter dead letters under the current config (see the module docstring); idempotent.

    `active` maps each (namespace, meter) to the generation queries read (live meters, docs/design.md);
    a dead letter is re-metered by its own namespace's meters only. A changed
    definition already rebuilt its history from every stored event, so a meter's dead letter of any
    other generation, and an `unknown_type` one whose type has a meter now, is `superseded`: replaying
    it would count the event twice. Replayed windows go to the active generation only.
    """
    report = ReplayReport()
    ensure_replays_table(client, database, topology)
    letters = _load(client, database, meter, reason)
    sightings = _first_sightings(client, database, letters)
    groups: dict[ReplayGroup, list[DeadLetter]] = defaultdict(list)
    outcomes: list[list[Any]] = []
    now = datetime.now(UTC)
    for d in letters:
        if d.reason_code in NOT_REPLAYABLE:
            report.not_replayable += 1
            continue
        if not _still_failing(d, sightings.get((d.namespace, d.source, d.id))):
            report.superseded += 1
            outcomes.append([*d.identity, "superseded", "the processor metered or dropped it since", now])
            continue
        if active is not None and (
            (d.meter and active.get((d.namespace, d.meter)) != d.generation)
            or (not d.meter and d.reason_code == ReasonCode.UNKNOWN_TYPE and meters.for_type(d.type, d.namespace))
        ):
            report.superseded += 1
            outcomes.append([*d.identity, "superseded", "rebuilt from stored events under a newer definition", now])
            continue
        groups[(d.log_epoch, d.partition, d.offset, d.reason_code, d.meter)].append(d)

    new_rows: list[list[Any]] = []
    for (epoch, partition, offset, code, slug), members in sorted(groups.items()):
        report.groups += 1
        members.sort(key=lambda d: d.index)
        received = min(d.received_at for d in members)
        rows = message_rows([d.event() for d in members],
                            MessagePosition(replay_epoch(code, slug, epoch), partition, offset), meters,
                            options, always_accept, now=received, indexes=[d.index for d in members])
        windows = [r for r in rows.windows if (not slug or r[0] == slug)
                   and (active is None or r[WINDOW_GENERATION] == active.get((str(r[-1]), str(r[0]))))]
        new_rows.extend(windows)
        rejected = {(int(r[3]), str(r[4])): str(r[11]) for r in rows.dead_letters}
        for d in members:
            again = rejected.get((d.index, d.meter))
            if again is None:
                report.metered += 1
                outcomes.append([*d.identity, "metered", "", now])
            else:
                report.still_rejected += 1
                report.rejected_reasons[again] = report.rejected_reasons.get(again, 0) + 1
                outcomes.append([*d.identity, "still_rejected", again, now])

    # Replayed windows may land in compacted months: fenced like every writer of old partitions.
    with storage_errors(), fenced_writes(client, database, "dead-letter-replay", enabled=topology.cluster is None):
        if new_rows:
            client.insert(qualified(database, METER_WINDOWS), new_rows, column_names=list(WINDOW_COLUMNS),
                          settings={"async_insert": 0})
        report.window_rows = len(new_rows)
        report.stale_rows_deleted = _delete_stale(client, database, groups, new_rows, topology)
        if outcomes:
            client.insert(qualified(database, DEAD_LETTER_REPLAYS), outcomes,
                          column_names=["log_epoch", "kafka_partition", "kafka_offset", "batch_index", "meter",
                                        "outcome", "detail", "replayed_at"])
    logger.info("dead-letter replay done", extra={"report": report})
    return report


def _delete_stale(client: Client, database: str, groups: Mapping[ReplayGroup, Sequence[DeadLetter]],
                  new_rows: Sequence[Sequence[Any]], topology: Topology = SINGLE_NODE) -> int:
    """Delete earlier replay rows of the replayed groups that the current config no longer produces."""
    if not groups:
        return 0
    tags = sorted({(replay_epoch(code, slug, epoch), p, o) for (epoch, p, o, code, slug) in groups})
    keep = {(str(r[0]), str(r[1]), as_utc(r[2]), str(r[3]), str(r[5]), int(r[6]), int(r[7])) for r in new_rows}
    table = qualified(database, METER_WINDOWS)
    existing = client.query(
        f"SELECT DISTINCT meter, subject, window_start, group_key, log_epoch, kafka_partition, kafka_offset "
        f"FROM {table} WHERE log_epoch IN {{tags:Array(String)}}",
        parameters={"tags": sorted({t[0] for t in tags})},
    ).result_rows
    wanted_tags = set(tags)
    stale = [r for r in existing
             if (str(r[4]), int(r[5]), int(r[6])) in wanted_tags
             and (str(r[0]), str(r[1]), as_utc(r[2]), str(r[3]), str(r[4]), int(r[5]), int(r[6])) not in keep]
    for r in stale:
        mutate(
            client,
            f"DELETE FROM {mutation_target(database, METER_WINDOWS, topology)} WHERE meter = {{m:String}} "
            "AND subject = {s:String} AND window_start = {w:DateTime('UTC')} AND group_key = {g:String} "
            "AND log_epoch = {e:String} AND kafka_partition = {p:UInt32} AND kafka_offset = {o:UInt64}",
            topology=topology,
            parameters={"m": r[0], "s": r[1], "w": format_sql_time(r[2]), "g": r[3],
                        "e": r[4], "p": int(r[5]), "o": int(r[6])},
        )
    return len(stale)
