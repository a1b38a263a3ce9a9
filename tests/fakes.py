"""In-memory stand-ins for the processor's `Sink`, the ingest `Publisher` and Faust stream events.

They let unit tests drive the real batch and publish logic without a broker or ClickHouse; the
integration, e2e and fault tests run the same logic on the real infrastructure. Each fake keeps a
`journal` of what happened, in order, so tests can assert orderings such as "acked after written".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meterline.core.errors import BrokerUnavailableError, StorageError, StorageRejectedError
from meterline.core.rows import Rows
from meterline.core.schema import EVENT_COLUMNS

_COL = {name: i for i, name in enumerate(EVENT_COLUMNS)}


def _rejected(table: str) -> StorageRejectedError:
    exc = StorageRejectedError(f"fake refusal of {table}")
    exc.table = table  # type: ignore[attr-defined]
    return exc


class FakeSink:
    """`processor.batch.Sink` keeping rows in lists; the `events` rows double as the dedupe store.

    `fail_writes = n` makes the next n writes raise `StorageError` (as `ClickHouseSink.write` does once
    stopped mid-outage) without storing anything. Stored rows are keyed by their table identity, as the
    ReplacingMergeTree tables collapse them, so rewriting a replayed batch changes nothing.
    """

    def __init__(self, journal: list[str] | None = None) -> None:
        self.journal = journal if journal is not None else []
        self.failing = False
        self.stopped = False
        self.fail_writes = 0
        #: `reject(rows)` returning a table name makes a write raise `StorageRejectedError` for that table
        #: (as ClickHouse refusing the data does), storing the tables before it as the real sink would.
        self.reject: Callable[[Rows], str | None] | None = None
        self.writes = 0
        #: dedupe_key -> events row
        self.events: dict[bytes, list[Any]] = {}
        #: (epoch, partition, offset, index, meter) -> dead_letters row
        self.dead_letters: dict[tuple[Any, ...], list[Any]] = {}
        #: (meter, subject, window_start, group_key, epoch, partition, offset) -> meter_windows row
        self.windows: dict[tuple[Any, ...], list[Any]] = {}

    async def write(self, rows: Rows) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            self.failing = True
            self.journal.append("write failed")
            raise StorageError("fake storage outage")
        refused = self.reject(rows) if self.reject is not None else None
        if refused == "events":
            raise _rejected(refused)
        for row in rows.events:
            self.events[row[_COL["dedupe_key"]]] = row
        if refused == "dead_letters":
            raise _rejected(refused)
        for row in rows.dead_letters:
            self.dead_letters[tuple(row[:5])] = row
        if refused == "meter_windows":
            raise _rejected(refused)
        for row in rows.windows:
            self.windows[(*row[:4], *row[5:8])] = row
        self.failing = False
        self.writes += 1
        self.journal.append(f"write {len(rows.events)} events")

    def load_dedupe(self, partition: int, keep_days: int, since: tuple[str, int] | None,
                    merge: Callable[[Iterable[Sequence[Any]]], int]) -> int:
        floor = time.time() - keep_days * 86_400
        found = []
        for row in self.events.values():
            epoch, part, offset = row[_COL["log_epoch"]], row[_COL["kafka_partition"]], row[_COL["kafka_offset"]]
            seen = row[_COL["ingested_at"]].timestamp()
            if part != partition or seen < floor:
                continue
            if since is not None and (epoch != since[0] or offset < since[1]):
                continue
            found.append((row[_COL["dedupe_key"]], epoch, part, offset, row[_COL["batch_index"]], seen))
        self.journal.append(f"load partition {partition}")
        return merge(found)

    def load_dedupe_by_key(self, partition: int, keep_days: int,
                           merge: Callable[[Iterable[Sequence[Sequence[Any]]]], int], *, foreign: bool = False) -> int:
        rows: list[Sequence[Any]] = []
        self.load_dedupe(partition, keep_days, None, lambda found: rows.extend(found) or 0)
        rows.sort(key=lambda r: (bytes(r[0]), r[1], r[3], r[4]))
        rows = [(*r[:5], int(r[5])) for r in rows]  # ClickHouse's toUnixTimestamp: an int
        halves = [h for h in (rows[: len(rows) // 2], rows[len(rows) // 2:]) if h]  # blocks, as ClickHouse streams
        return merge([[list(col) for col in zip(*half)] for half in halves])

    def tail_keys(self, since: dict[int, tuple[str, int] | None], keep_days: int,
                  merge: Callable[[int, Iterable[Sequence[Any]]], int]) -> int:
        floor = time.time() - keep_days * 86_400
        found: dict[int, list[Any]] = {p: [] for p in since}
        for row in self.events.values():
            epoch, part, offset = row[_COL["log_epoch"]], row[_COL["kafka_partition"]], row[_COL["kafka_offset"]]
            seen = row[_COL["ingested_at"]].timestamp()
            marker = since.get(part)
            if part in since and (marker is None or (epoch == marker[0] and offset >= marker[1])) and seen >= floor:
                found[part].append((row[_COL["dedupe_key"]], epoch, part, offset, row[_COL["batch_index"]], seen))
        if since:
            self.journal.append(f"tail partitions {sorted(since)}")
        return sum(merge(p, rows) for p, rows in found.items())

    def write_progress(self, rows: Sequence[Sequence[Any]]) -> None:
        self.journal.append(f"progress {len(rows)} partitions")

    def retract(self, losers: Sequence[Any], rebuild: Callable[..., Any]) -> list[tuple[Any, bool]]:
        """Keyed by dedupe_key, this store never holds two copies of a key: nothing to undo."""
        self.journal.append(f"retract {len(losers)}")
        return [(loser, True) for loser in losers]

    def stop(self) -> None:
        self.stopped = True


@dataclass
class FakeMessage:
    """The Kafka message of a Faust stream event."""

    partition: int
    offset: int
    timestamp: float | None = None
    generation_id: int | None = 1


@dataclass
class FakeStreamEvent:
    """What `stream.noack_take` yields: the raw value and its message."""

    value: bytes
    message: FakeMessage


@dataclass
class Acks:
    """Records acks (by partition and offset) into a shared journal."""

    journal: list[str]
    acked: list[tuple[int, int]] = field(default_factory=list)

    async def __call__(self, event: Any) -> None:
        self.acked.append((event.message.partition, event.message.offset))
        self.journal.append(f"ack {event.message.partition}:{event.message.offset}")


class FakePublisher:
    """`ingest.app.ManagedPublisher` that keeps published `(key, value)` messages in memory.

    `fail_with` makes publish raise that error (a broker that does not acknowledge); `started`/`closed`
    record the lifecycle; `ready` is what `check_ready` answers.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.fail_with: BrokerUnavailableError | None = None
        self.started = False
        self.closed = False
        self.ready = True
        self.calls = 0

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True

    def check_ready(self, timeout: float = 2.0) -> bool:
        return self.ready

    async def publish(self, messages: Sequence[tuple[bytes, bytes]]) -> None:
        self.calls += 1
        await asyncio.sleep(0)  # a real publish always yields to the loop while it waits for acks
        if self.fail_with is not None:
            raise self.fail_with
        self.messages.extend(messages)
