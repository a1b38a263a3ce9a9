"""The processor's Faust agent: a short loop handing each batch to `processor.batch.BatchProcessor`.

Offset safety (what was checked in faust-streaming 0.15.3, faust/streams.py + faust/transport/consumer.py):

* `Stream.noack_take(max, within)` buffers *events* and never acks them; `take_events` acks the whole
  buffer in a `finally`, i.e. also when the loop body raised, so we use `noack_take` and ack by hand
  only after `Sink.write` returned
  (processor/batch.py).
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
import logging
import time
from collections.abc import Callable
from typing import Any

import faust

from meterline.adapters.kafka import (
    committed_offsets,
    kafka_client_config,
    log_epoch,
    log_start_offsets,
    partition_count,
)
from meterline.core.errors import BrokerUnavailableError
from meterline.settings import Settings
from processor import metrics
from processor.batch import BatchProcessor, LogRestartedError, StreamEvent
from processor.topics import events_topic

logger = logging.getLogger(__name__)

#: How often the lag gauges are refreshed from the broker's end offsets.
LAG_INTERVAL_SECONDS = 5.0


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


def register_agent(app: faust.App, settings: Settings, processor: BatchProcessor) -> None:
    """Declare the agent (and the revoke hook) on `app`."""
    topic = events_topic(app, settings)
    approved: set[int] = set()

    # mode types signal receivers as (sender, *args, signal=..., **kwargs); faust sends `revoked` as the one
    # positional argument, which is the receiver shape faust documents.
    owned: set[int] = set()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        # Another worker may write first sightings for these partitions while we do not own them.
        gone = {tp.partition for tp in revoked if tp.topic == topic.get_topic_name()}
        processor.revoked(gone)
        processor.progress.revoked(gone)
        owned.difference_update(gone)
        metrics.ASSIGNED.set(len(owned))

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == topic.get_topic_name()}
        owned.update(mine)
        committed = await group_committed(mine)
        processor.partitions = max(processor.partitions, await topic_partitions(), max(mine, default=-1) + 1)
        logger.info("assigned", extra={"partitions": sorted(mine), "committed": committed})
        processor.assigned(mine, committed)
        if mine:
            try:
                await check_epoch()
            except LogRestartedError as exc:
                await app.crash(exc)
                return
        processor.progress.assigned(mine, time.time())
        metrics.ASSIGNED.set(len(owned))

    async def group_committed(partitions: set[int]) -> dict[int, int]:
        """The group's committed offsets: the first offset of an assignment below one is an auto-reset."""
        if not partitions:
            return {}
        assert settings.kafka_bootstrap is not None
        try:
            return await asyncio.to_thread(committed_offsets, kafka_client_config(settings), settings.consumer_group,
                                           topic.get_topic_name(), partitions)
        except BrokerUnavailableError as exc:  # the check is skipped for this assignment, processing is not
            logger.info("committed offsets unavailable", extra={"error": str(exc)[:300]})
            return {}

    async def topic_partitions() -> int:
        """How many partitions the topic has now (it may have grown): every one is deduped against."""
        assert settings.kafka_bootstrap is not None
        try:
            return await asyncio.to_thread(partition_count, kafka_client_config(settings), topic.get_topic_name())
        except BrokerUnavailableError as exc:
            logger.info("partition count unavailable", extra={"error": str(exc)[:300]})
            return 0

    async def check_epoch() -> None:
        """Stop loudly when the broker's log epoch is not the one this worker writes positions under."""
        assert settings.kafka_bootstrap is not None
        try:
            current = await asyncio.to_thread(log_epoch, kafka_client_config(settings), settings.events_topic)
        except BrokerUnavailableError as exc:
            logger.info("log epoch unavailable", extra={"error": str(exc)[:300]})
            return
        if current != processor.log_epoch:
            logger.error("the topic's log restarted: stopping so a restart works under the new log epoch",
                         extra={"log_epoch": processor.log_epoch, "broker_log_epoch": current})
            raise LogRestartedError(f"log epoch changed from {processor.log_epoch} to {current}")

    async def log_start(partition: int) -> int | None:
        """The partition's log start now, to tell a gap in offsets from messages lost to retention."""
        assert settings.kafka_bootstrap is not None
        try:
            found = await asyncio.to_thread(log_start_offsets, kafka_client_config(settings),
                                            topic.get_topic_name(), [partition])
        except BrokerUnavailableError as exc:  # the check is skipped for this gap, processing is not
            logger.info("log start unavailable", extra={"partition": partition, "error": str(exc)[:300]})
            return None
        return found.get(partition)

    processor.check_epoch = check_epoch
    processor.log_start = log_start
    processor.crash = app.crash

    @app.timer(interval=LAG_INTERVAL_SECONDS)
    async def observe_lag() -> None:
        """Per-partition lag and oldest-unprocessed age from the broker's end offsets (processor/progress.py);
        also notices a log restarted without a rebalance or an offset reset (a re-created topic)."""
        tps = [tp for tp in app.consumer.assignment() if tp.topic == topic.get_topic_name()]
        if not tps:
            return
        try:
            await check_epoch()
        except LogRestartedError as exc:
            await app.crash(exc)
            return
        asked_at = time.time()
        try:
            broker_ends = {tp.partition: int(end) for tp, end in (await app.consumer.highwaters(*tps)).items()}
            ends = dict(broker_ends)
            for tp in tps:  # fetched but unwritten counts too (the local broker under-reports end offsets)
                position = await app.consumer.position(tp)
                if position is not None:
                    ends[tp.partition] = max(ends.get(tp.partition, 0), int(position))
        except Exception as exc:  # noqa: BLE001 - a broker hiccup only delays the gauges
            logger.info("end offsets unavailable", extra={"error": str(exc)[:300]})
            return
        complete = processor.progress.observe(ends, time.time(), asked_at, broker_ends)
        if complete:
            await processor.record_progress(settings.events_topic, complete)

    @app.agent(topic, name="meterline-processor", concurrency=1)
    async def process(stream: faust.StreamT) -> None:
        install_ack_guard(app.consumer, approved)

        async def ack(event: StreamEvent) -> None:
            approved.add(id(event.message))
            await stream.ack(event)  # type: ignore[arg-type]

        # The agent gets a faust.Stream; faust's StreamT protocol lacks noack_take (see module docstring).
        waiting = time.perf_counter()
        async for events in stream.noack_take(settings.processor_batch_messages,  # type: ignore[attr-defined]
                                              within=settings.processor_batch_seconds):
            metrics.BATCH_WAIT_SECONDS.observe(time.perf_counter() - waiting)
            try:
                # Returns once the batch's write started and the batch before it was written and acked:
                # the next batch is decided while this one is inserted (processor/batch.py, "Pipelining").
                await processor.dispatch(events, app.consumer_generation_id, ack)
            except Exception as exc:
                # Nothing of this batch is acked, so crashing loses nothing: the supervisor (or the next
                # worker) replays it. Continuing would stall the partition behind the unacked offsets.
                logger.exception("batch failed; stopping the worker so the batch is replayed",
                                 extra={"messages": len(events)})
                await app.crash(exc)
                raise
            waiting = time.perf_counter()
        await processor.settle()
