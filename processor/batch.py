"""One processor batch without Faust: Kafka messages -> dedupe -> meters -> one sink write -> acks.

The rules that make the processor exactly-once live here, behind two small Protocols, so they have
fast unit tests with in-memory fakes (tests/fakes.py) besides the real-infrastructure ones:

* `Sink` is where rows go and where first sightings come back from (`processor.sink.ClickHouseSink`).
* `StreamEvent` is what a Faust stream yields (`faust.EventT`): a value and its Kafka message.

Order per batch (docs/design.md, "Exactly-once effect"): load the dedupe state of newly assigned
partitions, decide every event in log order, persist the decisions locally, write the rows, and only
then ack the messages, in offset order. Events of a stale consumer generation (a rebalance happened
since they were fetched) are dropped *unacked*: another worker may own their partition now, and an ack
could commit an offset past rows nobody wrote (see processor/agents.py for Faust's holes).

Pipelining (`dispatch`): the worker decides batch N+1 while batch N's rows are being inserted -- the
insert is mostly ClickHouse's time, the decisions Python's, and doing them one after the other left one
idle while the other ran. The order above holds per batch, and between batches: N+1's decisions are
taken after N's were persisted (so they see N's first sightings) but persisted only once N is written
and acked, so a crash loses or acks nothing out of order. Should storage refuse N (its messages are then
written one by one and refused ones quarantined, which forgets their first sightings), N+1's decisions
are dropped and taken again, as a replay would take them. A batch no other follows is settled (acked)
as soon as its write returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from meterline.core.errors import InvalidEventError, StorageError, StorageRejectedError
from meterline.core.events import decode_batch
from meterline.core.meters import MeterSet
from meterline.core.positions import Position, dedupe_key, message_keys
from meterline.core.retraction import Loser, replacement_windows
from meterline.core.rows import (
    MessagePosition,
    RowOptions,
    Rows,
    message_namespace,
    message_rows,
    quarantined_rows,
    undecodable_rows,
)
from meterline.core.schema import EVENTS
from meterline.settings import Settings
from processor import metrics
from processor.dedupe import DedupeState
from processor.live_meters import LiveMeters
from processor.progress import Progress

logger = logging.getLogger(__name__)

_NO_KEY = b"\x00" * 16

#: (partition, offset, value, broker timestamp in epoch seconds or None): what a batch is made of.
Message = tuple[int, int, bytes, float | None]

#: (message, its stored events that stay, its stored window identities, its broker time) -> window rows.
Rebuild = Callable[[MessagePosition, list[Sequence[Any]], list[Sequence[Any]], datetime | None], list[list[Any]]]


class LogRestartedError(RuntimeError):
    """The topic's log restarted (new cluster or topic id) while this worker ran: its positions would
    collide with the old log's, so the worker stops; started again, it works under the new epoch."""


class OffsetResetError(RuntimeError):
    """A partition's offsets went back within one assignment under an unchanged log epoch: the consumer
    hit an out-of-range offset and auto-reset to the earliest one. The worker stops loudly instead of
    silently re-reading (or, past retention, skipping) what the committed offset said was next."""


class RetentionLossError(OffsetResetError):
    """Offsets jumped forward past messages retention deleted before they were processed: they are lost.
    The worker stops loudly instead of going on as if they had never existed (README, "Kafka offsets")."""


class Sink(Protocol):
    """Durable storage of a batch's rows and of the first sightings they record."""

    #: True while the last storage operation failed (drives the worker's /readyz).
    failing: bool

    async def write(self, rows: Rows) -> None:
        """Store events, then dead letters, then windows; return only once all are stored.

        Retries storage errors itself until it succeeds or `stop()` was called (then it raises):
        the batch stays unacked either way, so nothing is lost. Raises `StorageRejectedError` (with
        `table` set) at once when storage refuses the rows themselves: retrying cannot help.
        """

    def load_dedupe(self, partition: int, keep_days: int, since: tuple[str, int] | None,
                    merge: Callable[[Iterable[Sequence[Any]]], int]) -> int:
        """Feed the stored first sightings of `partition` (of the last `keep_days`, after `since`) to `merge`
        as `(dedupe_key, log_epoch, partition, offset, index, ingested_at unix s)`; blocking. Keys are
        computed with the current `dedupe_key` from the stored `(source, id)` (see KEY_VERSION)."""

    def load_dedupe_by_key(self, partition: int, keep_days: int,
                           merge: Callable[[Iterable[Sequence[Sequence[Any]]]], int], *, foreign: bool = False) -> int:
        """`load_dedupe` of all of `partition` (since=None), sorted by key, as blocks of those six columns
        (ints as ints); blocking. `foreign`: a partition another worker owns (read like `tail_keys`)."""

    def tail_keys(self, since: dict[int, tuple[str, int] | None], keep_days: int,
                  merge: Callable[[int, Iterable[Sequence[Any]]], int]) -> int:
        """Feed the first sightings stored for each partition of `since` after its marker `(log_epoch,
        next_offset)` (None: all of the last `keep_days`, any epoch) to `merge(partition, rows)`, rows as in
        `load_dedupe`; blocking. Cheap (a range per partition): it runs before every batch to see what
        other workers stored."""

    def write_progress(self, rows: Sequence[Sequence[Any]]) -> None:
        """Store `partition_progress` rows once (no retry; blocking). Raises StorageError."""

    def retract(self, losers: Sequence[Loser], rebuild: Rebuild) -> list[tuple[Loser, bool]]:
        """Make stored copies that lost to another copy of their key stop counting: replace their messages'
        window rows with `rebuild`'s, then delete their rows; blocking, retried. Returns each loser with
        whether it is undone (False: it can no longer be, e.g. its windows were compacted)."""

    def stop(self) -> None:
        """Make pending retries give up (shutdown)."""


class KafkaMessage(Protocol):
    """The parts of `faust.types.tuples.Message` a batch reads."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> float | None: ...
    @property
    def generation_id(self) -> int | None: ...


class StreamEvent(Protocol):
    """The parts of `faust.EventT` a batch reads."""

    @property
    def value(self) -> Any: ...
    @property
    def message(self) -> KafkaMessage: ...


Ack = Callable[[StreamEvent], Awaitable[Any]]


async def _no_ack(event: StreamEvent) -> None:
    """What `process` acks with when its caller acks nothing (the events are then empty anyway)."""


@dataclass
class _InFlight:
    """A batch whose rows are being written: what settling it (acks included) needs."""

    messages: list[Message]
    events: list[StreamEvent]
    ack: Ack
    rows: Rows
    write: asyncio.Task[None]
    #: Per partition, the offset after the batch's last one: `_next_seen` once it is acked, unless the
    #: partition was assigned again since the batch was dispatched (`assignment`): its late acks are never
    #: committed, so the new assignment starts again from the group's commit (`BatchProcessor.assigned`).
    next_offsets: dict[int, int]
    #: `BatchProcessor._assignment` when the batch was dispatched.
    assignment: int


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic cyclic GC while a batch is built; the next allocation after it collects as usual.

    Why: a build allocates a few containers per event (decoded events, `events` rows and their lists)
    that all live until the build ends or the rows are written. The collector, triggered by allocation
    counts, traversed them again and again within the batch: ~2 µs an event, a sixth of a worker's build
    (measured in process with the worker's thresholds, batch N's rows alive while N+1 is built). None of
    them is cyclic garbage; after the build the decoded events are gone and there is far less to walk.
    """
    if not gc.isenabled():  # someone else paused it: leave it so
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


_KEY_ERRORS = (KeyError, TypeError, AttributeError, UnicodeError)


def _key(event: Any, namespace: str) -> bytes:
    try:
        return dedupe_key(event["source"], event["id"], namespace)
    except _KEY_ERRORS:
        return _NO_KEY  # invalid event: rows.message_rows dead-letters it before using the key


def _keys(events: list[Any], namespace: str) -> list[bytes]:
    """`_key` of each event of a message: `message_keys`, or event by event when one is invalid."""
    try:
        return message_keys(events, namespace)
    except _KEY_ERRORS:
        return [_key(e, namespace) for e in events]


class BatchProcessor:
    """Everything one batch needs, without Faust: the agent drives it, unit tests drive it with fakes."""

    def __init__(self, settings: Settings, meters: MeterSet, state: DedupeState, sink: Sink,
                 log_epoch: str, live: LiveMeters | None = None) -> None:
        self.settings = settings
        self.meters = meters
        self.state = state
        self.sink = sink
        self.log_epoch = log_epoch
        self.options = RowOptions.from_settings(settings)
        #: Days of stored keys a load reads: as long as the state keeps them (the horizon plus the maximum lag).
        self.keep_days = math.ceil(state.keep_seconds / 86_400)
        #: Per partition, the offset after the last one seen in this assignment (see `_offsets_went_back`).
        self._next_seen: dict[int, int] = {}
        #: Set by the agent: compares the broker's log epoch with `log_epoch` (raises LogRestartedError).
        self.check_epoch: Callable[[], Awaitable[None]] | None = None
        #: Set by the agent: a partition's log start offset now (None when the broker cannot say).
        self.log_start: Callable[[int], Awaitable[int | None]] | None = None
        self.progress = Progress()
        #: Partitions this worker owns now, and how many the topic has: the keys of every other partition
        #: are merged into the dedupe state before each batch (`merge_foreign`: global dedupe).
        self.owned: set[int] = set()
        self.partitions = settings.topic_partitions
        #: The meter store view; None when meters are fixed (benchmarks, unit tests).
        self.live = live
        #: Held while a batch is built and while one is settled: meters change only between batches
        #: (`poll_meters` settles the batch in flight before it swaps them).
        self.batch_lock = asyncio.Lock()
        #: The batch being written while the next one is decided (see module doc, "Pipelining").
        self._inflight: _InFlight | None = None
        #: Counts `assigned` calls; `_assigned_at[p]` is the count at partition p's latest assignment. A
        #: batch dispatched before it must not set p's expected offset (`_expected_after`).
        self._assignment = 0
        self._assigned_at: dict[int, int] = {}
        #: The `_settle_when_idle` tasks not yet done (the loop keeps only weak references to tasks).
        self._settlers: set[asyncio.Future[None]] = set()
        #: Set by the agent: stops the worker when settling a batch in the background failed.
        self.crash: Callable[[BaseException], Awaitable[Any]] | None = None
        #: Why settling a batch in the background failed: the next batch raises it instead of going on.
        self._failure: BaseException | None = None

    async def poll_meters(self) -> None:
        """Swap in changed meters between batches, then report the applied versions (docs/design.md)."""
        if self.live is None:
            return
        try:
            changed = await asyncio.to_thread(self.live.refresh)
        except Exception:
            logger.warning("meter store refresh failed", exc_info=True)
            return
        if changed:
            async with self.batch_lock:
                await self._settle_aside()  # rows built with the old meters are written before they go
                self.meters = self.live.catalog.meter_set()
                self.live.applied = self.live.catalog.applied()
            logger.info("meters reloaded", extra={"meters": len(self.meters), "applied": self.live.applied})
        await asyncio.to_thread(self.live.beat)

    async def handle(self, events: Sequence[StreamEvent], generation: int | None, ack: Ack) -> Rows | None:
        """Process the events of the current consumer `generation`, then `ack` each of them in order.

        Stale-generation events are neither processed nor acked (they are redelivered to whoever owns
        the partition now). If processing raises, nothing is acked and the error propagates.
        """
        rows = await self.dispatch(events, generation, ack)
        await self.settle()
        return rows

    async def dispatch(self, events: Sequence[StreamEvent], generation: int | None, ack: Ack) -> Rows | None:
        """`handle` without waiting for the write: returns once the batch's decisions are persisted and
        its write started, after the batch before it was written and acked (module doc, "Pipelining").
        Its events are acked when the next batch is dispatched, `settle` is called, or -- when neither
        comes first -- as soon as the write returns. Raises what the previous batch's write raised."""
        assignment = self._assignment  # before any await: a rebalance may land during one
        live = [e for e in events if e.message.generation_id == generation]
        if len(live) != len(events):
            metrics.STALE.inc(len(events) - len(live))
        if not live:
            return None
        went_back = self._offsets_went_back(live)
        if went_back:
            if self.check_epoch is not None:
                await self.check_epoch()  # raises LogRestartedError when the log restarted under us
            partition, previous, offset = went_back
            logger.error("offset out of range: the consumer reset the partition to an earlier offset; stopping",
                         extra={"partition": partition, "expected_offset": previous, "offset": offset})
            raise OffsetResetError(f"partition {partition}: expected offset {previous}, the consumer "
                                   f"delivered {offset} (out-of-range reset) under the same log epoch")
        await self._check_skipped(live)
        messages = [(e.message.partition, e.message.offset, e.value, e.message.timestamp) for e in live]
        wall = time.time()
        for m in messages:
            if m[3]:
                metrics.MESSAGE_AGE_SECONDS.observe(max(0.0, wall - m[3]))
        return await self._start(messages, live, ack, assignment)

    async def settle(self) -> None:
        """Wait for the batch in flight to be written, then ack it (raises what its write raised)."""
        async with self.batch_lock:
            if self._inflight is not None:
                await self._settle(self._inflight)

    async def _settle(self, inflight: _InFlight) -> None:
        """Finish `inflight` (the batch lock held, no undecided batch in the state): its write (messages
        one by one if storage refused the batch), the written markers and metrics, then its acks."""
        try:
            try:
                await inflight.write
            except StorageRejectedError as exc:
                logger.error("storage refused a batch; writing its messages one by one",
                             extra={"messages": len(inflight.messages), "error": str(exc)[:500]})
                await self._write_each(inflight.messages)
            self._written(inflight.messages, inflight.rows)
            for e in inflight.events:
                await inflight.ack(e)
            # A failed batch is replayed from the same offsets: only what was acked counts as seen.
            self._next_seen.update(self._expected_after(inflight))
        finally:
            if self._inflight is inflight:
                self._inflight = None

    async def _settle_aside(self) -> None:
        """Settle the batch in flight (batch lock held) for a caller other than the agent's next batch (a
        timer, a meter swap): a failure is also kept, for the next batch to raise instead of going on."""
        if self._inflight is None:
            return
        try:
            await self._settle(self._inflight)
        except Exception as exc:
            self._failure = exc
            raise

    async def _settle_when_idle(self, inflight: _InFlight) -> None:
        """Settle `inflight` as soon as its write returned, unless the next batch settles it first."""
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(self._settlers.discard)
        try:
            async with self.batch_lock:
                if self._inflight is inflight:
                    await self._settle_aside()
        except Exception as exc:
            logger.exception("batch failed; stopping the worker so the batch is replayed",
                             extra={"messages": len(inflight.messages)})
            if self.crash is not None:
                await self.crash(exc)

    def assigned(self, partitions: Iterable[int], committed: Mapping[int, int] | None = None) -> None:
        """A new assignment: offsets may legitimately start below what this worker saw before (replay),
        but never below the group's `committed` offset: a first offset under it is an out-of-range
        auto-reset to the earliest (e.g. a commit of a re-created log), which `handle` stops on."""
        self.owned.update(partitions)
        self._assignment += 1
        for p in partitions:
            self._next_seen.pop(p, None)
            self._assigned_at[p] = self._assignment
            if committed is not None and p in committed:
                self._next_seen[p] = committed[p]

    def revoked(self, partitions: Iterable[int]) -> None:
        """Partitions another worker may own now: their keys are merged from storage from now on.

        Their expected offsets go too, also those a batch in flight would set when it is acked: acks after
        the revoke are not committed, and when a partition comes back its first batch may be delivered
        from the group's commit before `assigned` has run (the agent's hook awaits the committed offsets
        first) -- an expectation left over from the old assignment made that look like an out-of-range
        reset ('expected offset 129, the consumer delivered 108', fault test two workers, kill one)."""
        partitions = set(partitions)
        self.owned.difference_update(partitions)
        self.state.forget_partitions(partitions)
        self._assignment += 1
        for p in partitions:
            self._next_seen.pop(p, None)
            self._assigned_at[p] = self._assignment

    async def _check_skipped(self, events: Sequence[StreamEvent]) -> None:
        """Stop when offsets jumped forward over messages retention deleted before they were processed.

        A gap between the offset expected (after the last acked one, or the group's committed offset on a
        new assignment) and the one delivered is harmless when those offsets hold no data (transaction
        markers, compacted records) and a loss when the consumer fell out of the log's start and was
        reset to the earliest offset, past unprocessed messages. The log start tells the two apart: if
        it is now above the expected offset, the messages in between are gone.
        """
        if self.log_start is None:
            return
        for partition, expected, offset in self._offsets_skipped(events):
            start = await self.log_start(partition)
            if start is None or start <= expected:
                logger.info("offsets skipped without data loss (transaction markers or compaction)",
                            extra={"partition": partition, "expected_offset": expected, "offset": offset,
                                   "log_start": start})
                continue
            metrics.RETENTION_LOST.labels(partition=str(partition)).inc(start - expected)
            logger.error("messages deleted by retention before they were processed: stopping",
                         extra={"partition": partition, "expected_offset": expected, "offset": offset,
                                "log_start": start, "lost_offsets": start - expected})
            raise RetentionLossError(
                f"partition {partition}: offsets {expected}..{start - 1} were deleted by retention before "
                f"being processed (the consumer reset to {offset}); see README 'Kafka offsets' to go on")

    def _offsets_skipped(self, events: Sequence[StreamEvent]) -> list[tuple[int, int, int]]:
        """`(partition, expected offset, delivered offset)` of every forward gap, where the expected
        offset is known (after an acked offset, or the committed offset of a new assignment)."""
        next_seen = self._seen()
        gaps = []
        for e in events:
            p, off = e.message.partition, e.message.offset
            if p in next_seen and off > next_seen[p]:
                gaps.append((p, next_seen[p], off))
            next_seen[p] = off + 1
        return gaps

    def _offsets_went_back(self, events: Sequence[StreamEvent]) -> tuple[int, int, int] | None:
        """The first `(partition, expected offset, delivered offset)` whose offsets went backwards within
        one assignment -- which a consumer does when its position fell out of the log (a restarted log,
        or an offset out of range) and it was reset to the earliest offset -- else None."""
        next_seen = self._seen()
        for e in events:
            p, off = e.message.partition, e.message.offset
            expected = next_seen.get(p, 0)
            if off < expected:
                return p, expected, off
            next_seen[p] = off + 1
        return None

    def _seen(self) -> dict[int, int]:
        """Per partition, the offset expected next: after the last acked one (`_next_seen`, advanced only
        once a batch is acked) or after the batch in flight."""
        seen = dict(self._next_seen)
        if self._inflight is not None:
            seen.update(self._expected_after(self._inflight))
        return seen

    def _expected_after(self, inflight: _InFlight) -> dict[int, int]:
        """The offsets `inflight` leaves expected next, without the partitions assigned again since it was
        dispatched: a rebalance during its write (any await of it) means the new assignment replays from
        the group's commit, which must not look like an out-of-range reset."""
        return {p: o for p, o in inflight.next_offsets.items() if self._assigned_at.get(p, 0) <= inflight.assignment}

    async def ensure_loaded(self, partitions: set[int]) -> None:
        """Merge the sink's first sightings of newly assigned partitions before deciding anything."""
        for p in sorted(partitions):
            if self.state.is_loaded(p):
                continue
            started = time.perf_counter()
            marker = self.state.marker(p)
            since = None
            if marker is not None and marker[0] == self.state.epoch_no(self.log_epoch):
                since = (self.log_epoch, marker[1])
            # Taken on the event loop, before the load: a revoke while it runs voids its "loaded" mark.
            generation = self.state.generation(p)
            if since is None and self.settings.dedupe_bulk_load:
                # A whole partition (a takeover by a worker that has no marker of it): sorted by key,
                # written as SST files; a load after a marker is small and merged key by key.
                n = await asyncio.to_thread(
                    self.sink.load_dedupe_by_key, p, self.keep_days,
                    functools.partial(self.state.load_sorted, self.log_epoch, p, generation=generation))
            else:
                n = await asyncio.to_thread(
                    self.sink.load_dedupe, p, self.keep_days, since,
                    functools.partial(self.state.load_rows, self.log_epoch, p, generation=generation))
            metrics.DEDUPE_LOADED.inc(n)
            logger.info("dedupe state loaded", extra={"partition": p, "keys": n, "since": since,
                                                     "seconds": round(time.perf_counter() - started, 3)})

    async def merge_foreign(self, skip: set[int]) -> None:
        """Merge the keys other workers stored for every partition this worker does not own (nor has in
        `skip`), so a copy of an event on another partition is a duplicate here too (global dedupe).

        One query reads `dedupe_keys` (a range of its sorting key per partition) past each partition's
        `foreign_marker`; a partition met for the first time (or under another epoch) is all of it within
        the kept days, streamed sorted by key into SST files (`DedupeState.load_sorted`) unless
        `dedupe_bulk_load` is off, when the one query reads it too."""
        foreign = set(range(self.partitions)) - self.owned - skip
        if not foreign:
            return
        epoch_no = self.state.epoch_no(self.log_epoch)
        since: dict[int, tuple[str, int] | None] = {}
        for p in sorted(foreign):
            marker = self.state.foreign_marker(p)
            since[p] = (self.log_epoch, marker[1]) if marker is not None and marker[0] == epoch_no else None
        conflicts = self.state.conflicts
        started = time.perf_counter()
        n = 0
        first = sorted(p for p, marker in since.items() if marker is None)
        if self.settings.dedupe_bulk_load:
            # A partition met for the first time is its whole history: streamed sorted into SST files
            # like a takeover's, not held in memory whole by the tail's one query (millions of rows).
            for p in first:
                del since[p]
                n += await asyncio.to_thread(functools.partial(
                    self.sink.load_dedupe_by_key, p, self.keep_days,
                    functools.partial(self.state.load_sorted, self.log_epoch, p, owned=False), foreign=True))
        n += await asyncio.to_thread(
            self.sink.tail_keys, since, self.keep_days,
            lambda p, rows: self.state.load_rows(self.log_epoch, p, rows, owned=False))
        metrics.DEDUPE_LOADED.inc(n)
        metrics.DEDUPE_CONFLICTS.inc(self.state.conflicts - conflicts)
        seconds = time.perf_counter() - started
        if seconds >= 1:  # a partition met for the first time: its whole history holds up the batch
            logger.info("foreign dedupe keys merged", extra={
                "partitions": first, "keys": n,
                "seconds": round(seconds, 3)})

    async def retract_losers(self) -> int:
        """Undo the stored copies this worker's cache found losing to another copy of their key
        (`DedupeState.pending_retractions`), on the partitions it owns; returns how many were undone.

        Runs from `reconcile` (a timer), under the batch lock, after the batch in flight is settled: the
        loser's partition is written by this worker only, so nothing of its messages is written meanwhile. Not before every batch: the cache
        already decides as the retraction does (a replay of the loser's message drops it), so nothing waits
        for it, and a retraction that keeps failing costs a try per tick, not per batch. Copies on
        partitions other workers own stay pending here (their owner finds the same conflict); they are done
        here if this worker comes to own the partition first. Each is forgotten only once the sink says it
        is done.
        """
        pending = self.state.pending_retractions(self.owned)
        if not pending:
            return 0
        await self._settle_aside()  # this worker's own batch in flight is written before anything is read
        meters, options = self.meters, self.options

        def rebuild(message: MessagePosition, events: list[Sequence[Any]], windows: list[Sequence[Any]],
                    received: datetime | None) -> list[list[Any]]:
            return replacement_windows(message, events, windows, meters, options, received)

        results = await asyncio.to_thread(self.sink.retract, pending, rebuild)
        for loser, undone in results:
            extra = {"dedupe_key": loser.key.hex(), "loser": list(loser.loser), "winner": list(loser.winner)}
            if undone:
                metrics.DEDUPE_RETRACTED.inc()
                logger.info("a copy stored after another copy of its key was retracted", extra=extra)
            else:
                metrics.DEDUPE_UNREPAIRED.inc()
                logger.error("a copy stored after another copy of its key cannot be retracted (its month's "
                             "windows were compacted first): it stays counted", extra=extra)
            self.state.retracted(loser)
        return sum(1 for _, undone in results if undone)

    async def reconcile(self) -> None:
        """Between batches (a timer): load the owned partitions, merge the other workers' keys and retract
        losers, so a conflict is repaired even when no more messages come to this worker."""
        if not self.owned:
            return
        async with self.batch_lock:
            conflicts = self.state.conflicts
            await self.ensure_loaded(set(self.owned))  # a partition that gets no message still is checked
            metrics.DEDUPE_CONFLICTS.inc(self.state.conflicts - conflicts)
            await self.merge_foreign(set())
            await self.retract_losers()

    def build(self, messages: list[Message], now: datetime | None = None) -> Rows:
        """Rows of a batch of messages, deciding dedupe in log order.

        "Now" for the late horizon and `ingested_at` is each message's broker timestamp, not the clock:
        a replay after a crash must decide "too late" exactly as the first pass did, or an event near
        the horizon could be both metered (first pass) and dead-lettered (replay). `now` overrides it
        (tests, benchmarks) and stands in for messages without a timestamp.

        The cyclic GC is paused meanwhile (`_gc_paused`).
        """
        with _gc_paused():
            return self._build(messages, now)

    def _build(self, messages: list[Message], now: datetime | None) -> Rows:
        fallback = datetime.now(UTC) if now is None else now
        decoded: list[tuple[int, int, Any, list[bytes], datetime]] = []
        all_keys: list[bytes] = []
        rows = Rows()
        for partition, offset, value, timestamp in messages:
            received = fallback if now is not None or not timestamp else datetime.fromtimestamp(timestamp, UTC)
            try:
                events = decode_batch(value)
            except InvalidEventError as exc:
                undecodable_rows(MessagePosition(self.log_epoch, partition, offset), value,
                                 exc.errors[0]["message"] if exc.errors else str(exc), received, rows)
                continue
            ns = message_namespace(events)
            keys = _keys(events, ns)
            all_keys.extend(keys)
            decoded.append((partition, offset, events, keys, received))
        self.state.prefetch(all_keys)
        n_events = 0
        for partition, offset, events, keys, received in decoded:
            n_events += len(events)
            # Dedupe expiry is judged on the message's broker time, like the late horizon (DedupeState.decide).
            decide = self.state.decider(self.log_epoch, int(received.timestamp()))
            message_rows(events, MessagePosition(self.log_epoch, partition, offset), self.meters,
                         self.options, decide, now=received, keys=keys, rows=rows)
        metrics.EVENTS.inc(n_events)
        return rows

    async def process(self, messages: list[Message]) -> Rows:
        """Load, decide, persist decisions locally, write to the sink; returns once written (the caller
        acks afterwards)."""
        rows = await self._start(messages, [], None, self._assignment)
        await self.settle()
        return rows

    async def _start(self, messages: list[Message], events: Sequence[StreamEvent], ack: Ack | None,
                     assignment: int) -> Rows:
        """Load, decide, settle the batch in flight, persist the decisions locally, start the write;
        `events` are acked with `ack` once it is written (`settle`)."""
        if self.live is not None and self.live.stale():
            # This worker may have been silent past its TTL (paused, starved): a rebuild may have started
            # without it, so catch up with the store before writing (docs/design.md). When the store is
            # unreachable the batch goes on to the sink, which stalls on the same ClickHouse anyway.
            await self.poll_meters()
        async with self.batch_lock:
            return await self._process(messages, list(events), ack, assignment)

    async def _process(self, messages: list[Message], events: list[StreamEvent], ack: Ack | None,
                       assignment: int) -> Rows:
        if self._failure is not None:
            raise self._failure
        partitions = {m[0] for m in messages}
        conflicts = self.state.conflicts
        await self.ensure_loaded(partitions)
        metrics.DEDUPE_CONFLICTS.inc(self.state.conflicts - conflicts)
        await self.merge_foreign(partitions)
        started = time.perf_counter()
        rows = self.build(messages)
        built = time.perf_counter()
        metrics.BUILD_SECONDS.observe(built - started)
        inflight = self._inflight
        if inflight is not None:
            await asyncio.wait([inflight.write])
            metrics.WRITE_WAIT_SECONDS.observe(time.perf_counter() - built)
            refused = not inflight.write.cancelled() and isinstance(inflight.write.exception(), StorageRejectedError)
            if refused:  # its messages are rebuilt one by one: decide this batch again afterwards
                self.state.discard_batch()
            try:
                await self._settle(inflight)
            except BaseException:
                self.state.discard_batch()  # this batch's decisions were never persisted: a replay takes them
                raise
            if refused:
                rows = self.build(messages)
        flushing = time.perf_counter()
        self.state.flush()
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - flushing)
        next_offsets: dict[int, int] = {}
        for e in events:
            next_offsets[e.message.partition] = e.message.offset + 1
        write = asyncio.ensure_future(self.sink.write(rows))
        inflight = self._inflight = _InFlight(messages, events, ack or _no_ack, rows, write, next_offsets,
                                                      assignment)
        write.add_done_callback(lambda _: self._settlers.add(asyncio.ensure_future(self._settle_when_idle(inflight))))
        return rows

    def _written(self, messages: list[Message], rows: Rows) -> None:
        """After a batch's rows are stored: its partitions' written markers, progress and metrics."""
        last: dict[int, int] = {}
        for p, off, _, _ in messages:
            if off >= last.get(p, -1):
                last[p] = off
        now = time.time()
        for p, off in last.items():
            self.state.mark_written(self.log_epoch, p, off + 1)
            broker_time = max((ts for q, o, _, ts in messages if q == p and o == off and ts), default=None)
            self.progress.written(p, off + 1, broker_time, now)
        metrics.MESSAGES.inc(len(messages))
        metrics.ACCEPTED.inc(rows.accepted)
        metrics.DUPLICATES.inc(rows.duplicates)
        metrics.LATE.inc(rows.late)
        for code, n in rows.dead_by_reason.items():
            metrics.DEAD_LETTERS.labels(reason_code=code).inc(n)
        metrics.BATCHES.inc()

    async def record_progress(self, topic: str, complete: dict[int, tuple[int, float]]) -> None:
        """Store each partition's written offset and complete_until (best effort: a failure only delays
        queries' completeUntil, which then stays at an older, still true, instant)."""
        now = datetime.now(UTC)
        rows = [[topic, p, self.log_epoch, next_offset, datetime.fromtimestamp(until, UTC), now]
                for p, (next_offset, until) in sorted(complete.items())]
        try:
            await asyncio.to_thread(self.sink.write_progress, rows)
        except StorageError as exc:
            logger.info("partition progress not stored", extra={"error": str(exc)[:300]})

    async def _write_each(self, messages: list[Message]) -> None:
        """Write each message alone; quarantine the ones storage refuses (never stall the partition).

        Rebuilding a message repeats its decisions exactly (every first sighting of the batch is
        recorded at the message's own position, and a recorded position is accepted again), so each
        message yields the rows it had inside the batch.
        """
        for message in messages:
            rows = self.build([message])
            self.state.flush()  # as in `process`: decisions are persisted before their rows are written
            try:
                await self.sink.write(rows)
            except StorageRejectedError as exc:
                await self._quarantine(message, exc)

    async def _quarantine(self, message: Message, exc: StorageRejectedError) -> None:
        """One `invalid_event` dead letter for the whole message, so it is visible and the log moves on.

        When storage refused its `events` rows nothing of the message was stored (events are written
        first), so its first sightings are forgotten as well: the cache then agrees with ClickHouse, and
        a later copy of one of its events is accepted on any worker, as a replay of this one would be.
        """
        partition, offset, value, timestamp = message
        table = getattr(exc, "table", "")
        received = datetime.fromtimestamp(timestamp, UTC) if timestamp else datetime.now(UTC)
        reason = f"ClickHouse refused this message's {table or 'rows'}: {str(exc)[:2000]}"
        logger.error("message quarantined as a dead letter", extra={
            "partition": partition, "offset": offset, "table": table, "error": str(exc)[:500]})
        try:
            events = decode_batch(value)
        except InvalidEventError:
            events = []
        ns = message_namespace(events)
        if table == EVENTS:
            keys = _keys(events, ns)
            self.state.forget_first_sightings(Position(self.log_epoch, partition, offset, 0), keys)
        metrics.QUARANTINED.inc()
        await self.sink.write(quarantined_rows(MessagePosition(self.log_epoch, partition, offset), value,
                                               reason, received, ns))
