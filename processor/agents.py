"""The processor agent: Kafka batch -> dedupe -> meters -> one ClickHouse write -> ack.

Offset safety (what was checked in faust-streaming 0.15.3, faust/streams.py + faust/transport/consumer.py):

* `Stream.noack_take(max, within)` buffers *events* and never acks them; `take_events` acks the whole
  buffer in a `finally`, i.e. also when the loop body raised, so we use `noack_take` and ack by hand
  only after `ClickHouseSink.write` returned.
* `Consumer.ack` appends the offset to `_acked[tp]`; the commit loop (`_new_offset`) commits only the
  first run of *consecutive* acked offsets, so an unacked offset stops the commit at itself. Our acks per
  partition are in offset order anyway (one agent, concurrency 1, batches processed sequentially).
* Hole 1: `_new_offset`'s "gap at the head" check is skipped when the committed offset is None or 0
  (`if committed_offset:`), so an isolated later ack could be committed past unacked offsets.
* Hole 2: `Stream._py_aiter` *acks* events it skips because their `generation_id` is stale (a rebalance
  happened) or flow control is suspended -- events we never saw. After a reassignment to the same
  worker those acks can land in the fresh `_acked[tp]` and, combined with hole 1, move the committed
  offset past data that was never written.
* Revoked partitions: `on_partitions_revoked` drops `_acked[tp]`, and `_commit_offsets` discards
  offsets of partitions no longer assigned.

Defence: `install_ack_guard` wraps the consumer's `ack` so that only messages this agent explicitly
approved (after their rows were written) can be marked committable. Skipped messages stay unacked and
are redelivered; stale-generation events in our own buffer are dropped unacked for the same reason.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import faust

from meterline.core.errors import InvalidEventError
from meterline.core.events import decode_batch
from meterline.core.meters import MeterSet
from meterline.core.positions import dedupe_key
from meterline.core.rows import MessagePosition, RowOptions, Rows, message_rows, undecodable_rows
from meterline.settings import Settings
from processor import metrics
from processor.dedupe import DedupeState
from processor.sink import ClickHouseSink
from processor.topics import events_topic

logger = logging.getLogger(__name__)

_NO_KEY = b"\x00" * 16

#: (partition, offset, value, broker timestamp in epoch seconds or None): what a batch is made of.
Message = tuple[int, int, bytes, float | None]


def install_ack_guard(consumer: Any, approved: set[int]) -> None:
    """Let `consumer.ack` through only for messages whose `id()` is in `approved` (see module doc)."""
    if getattr(consumer, "_meterline_guarded", False):
        return
    original: Callable[[Any], bool] = consumer.ack

    def guarded_ack(message: Any) -> bool:
        mid = id(message)
        if mid not in approved:
            return False
        approved.discard(mid)
        return original(message)

    consumer.ack = guarded_ack
    consumer._meterline_guarded = True


def _key(event: Any) -> bytes:
    try:
        return dedupe_key(event["source"], event["id"])
    except (KeyError, TypeError):
        return _NO_KEY  # invalid event: rows.message_rows dead-letters it before using the key


class BatchProcessor:
    """Everything one batch needs, without Faust: the agent and the benchmark both drive it."""

    def __init__(self, settings: Settings, meters: MeterSet, state: DedupeState, sink: ClickHouseSink,
                 log_epoch: str) -> None:
        self.settings = settings
        self.meters = meters
        self.state = state
        self.sink = sink
        self.log_epoch = log_epoch
        self.options = RowOptions.from_settings(settings)

    async def ensure_loaded(self, partitions: set[int]) -> None:
        """Merge ClickHouse's first sightings of newly assigned partitions before deciding anything."""
        for p in sorted(partitions):
            if self.state.is_loaded(p):
                continue
            started = time.perf_counter()
            marker = self.state.marker(p)
            since = None
            if marker is not None and marker[0] == self.state.epoch_no(self.log_epoch):
                since = (self.log_epoch, marker[1])
            n = await asyncio.to_thread(
                self.sink.load_dedupe, p, self.settings.dedupe_horizon_days, since,
                functools.partial(self.state.load_rows, self.log_epoch, p),
            )
            metrics.DEDUPE_LOADED.inc(n)
            logger.info("dedupe state loaded", extra={"partition": p, "keys": n, "since": since,
                                                     "seconds": round(time.perf_counter() - started, 3)})

    def build(self, messages: list[Message], now: datetime | None = None) -> Rows:
        """Rows of a batch of messages, deciding dedupe in log order.

        "Now" for the late horizon and `ingested_at` is each message's broker timestamp, not the clock:
        a replay after a crash must decide "too late" exactly as the first pass did, or an event near
        the horizon could be both metered (first pass) and dead-lettered (replay). `now` overrides it
        (tests, benchmarks) and stands in for messages without a timestamp.
        """
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
            keys = [_key(e) for e in events]
            all_keys.extend(keys)
            decoded.append((partition, offset, events, keys, received))
        self.state.prefetch(all_keys)
        n_events = 0
        for partition, offset, events, keys, received in decoded:
            n_events += len(events)
            message_rows(events, MessagePosition(self.log_epoch, partition, offset), self.meters,
                         self.options, self.state.decide, now=received, keys=keys, rows=rows)
        metrics.EVENTS.inc(n_events)
        return rows

    async def process(self, messages: list[Message]) -> Rows:
        """Load, decide, persist decisions locally, write to ClickHouse; the caller acks afterwards."""
        await self.ensure_loaded({m[0] for m in messages})
        rows = self.build(messages)
        self.state.flush()
        await self.sink.write(rows)
        last: dict[int, int] = {}
        for p, off, _, _ in messages:
            if off >= last.get(p, -1):
                last[p] = off
        for p, off in last.items():
            self.state.mark_written(self.log_epoch, p, off + 1)
        metrics.MESSAGES.inc(len(messages))
        metrics.ACCEPTED.inc(rows.accepted)
        metrics.DUPLICATES.inc(rows.duplicates)
        metrics.LATE.inc(rows.late)
        for code, n in rows.dead_by_reason.items():
            metrics.DEAD_LETTERS.labels(reason_code=code).inc(n)
        metrics.BATCHES.inc()
        return rows


def register_agent(app: faust.App, settings: Settings, processor: BatchProcessor) -> None:
    """Declare the agent (and the revoke hook) on `app`."""
    topic = events_topic(app, settings)
    approved: set[int] = set()

    # mode types signal receivers as (sender, *args, signal=..., **kwargs); faust sends `revoked` as the one
    # positional argument, which is the receiver shape faust documents.
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        # Another worker may write first sightings for these partitions while we do not own them.
        processor.state.forget_partitions({tp.partition for tp in revoked if tp.topic == topic.get_topic_name()})

    @app.agent(topic, name="meterline-processor", concurrency=1)
    async def process(stream: faust.StreamT) -> None:
        install_ack_guard(app.consumer, approved)
        # The agent gets a faust.Stream; faust's StreamT protocol lacks noack_take (see module docstring).
        async for events in stream.noack_take(settings.processor_batch_messages,  # type: ignore[attr-defined]
                                              within=settings.processor_batch_seconds):
            generation = app.consumer_generation_id
            live = [e for e in events if e.message.generation_id == generation]
            if len(live) != len(events):
                metrics.STALE.inc(len(events) - len(live))
            del events
            if not live:
                continue
            batch = [(e.message.partition, e.message.offset, e.value, e.message.timestamp) for e in live]
            try:
                await processor.process(batch)
            except Exception as exc:
                # Nothing of this batch is acked, so crashing loses nothing: the supervisor (or the next
                # worker) replays it. Continuing would stall the partition behind the unacked offsets.
                logger.exception("batch failed; stopping the worker so the batch is replayed",
                                 extra={"messages": len(batch)})
                await app.crash(exc)
                raise
            for e in live:
                approved.add(id(e.message))
                await stream.ack(e)
