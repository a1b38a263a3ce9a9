"""The worker's aiokafka fetcher as Faust builds it: how long a fetch may wait (a setting, not Faust's
hard-coded 1.5 s), and a stop that does not hang when a fetch had failed.

Faust builds its aiokafka consumer with `fetch_max_wait_ms=1500` and no way to change it. Measured on the
local broker (tansu), aiokafka's produce-to-consume latency is ~450 ms at the median with 1500 ms, ~105 ms
with aiokafka's own 500 ms, and ~8 ms with 20 ms; the processor's freshness (P4) inherited it. aiokafka
reads the value when the consumer starts, so setting it on the consumer Faust just built is enough.

The stop: aiokafka 0.14's `Fetcher.close` cancels its pending fetch tasks and awaits them; a fetch that
failed (broker gone or re-created) sleeps its retry backoff outside the task's own CancelledError
handler, so `close` -- and with it `AIOKafkaConsumer.stop` and Faust's consumer thread stop -- raises
CancelledError. mode's thread then never signals that it shut down, and the worker waited its 60 s
`shutdown_timeout` before exiting (tests/faults/test_broker_epoch.py: a worker stopping on a changed log
epoch took 60 s to exit, so its supervised restart came 60 s late).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

__all__ = ["limit_fetch_wait", "stop_without_hanging"]

logger = logging.getLogger(__name__)


def limit_fetch_wait(max_wait_ms: int) -> None:
    """Make every worker consumer Faust creates from now on wait at most `max_wait_ms` per fetch."""
    thread_class: Any = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(thread_class, "_meterline_original_create", thread_class._create_worker_consumer)

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms  # read by AIOKafkaConsumer.start() for its Fetcher
        return consumer

    thread_class._meterline_original_create = original
    thread_class._create_worker_consumer = create_worker_consumer


def stop_without_hanging() -> None:
    """Make the consumer thread's stop finish when aiokafka's close re-raises the cancellation of its own
    fetch tasks (module doc); a cancellation of the stop itself still propagates."""
    thread_class: Any = faust_aiokafka.AIOKafkaConsumerThread
    original = getattr(thread_class, "_meterline_original_stop", thread_class.on_thread_stop)

    async def on_thread_stop(self: Any) -> None:
        try:
            await original(self)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            logger.info("the Kafka consumer's close raised its fetch task's cancellation; stopping anyway")

    thread_class._meterline_original_stop = original
    thread_class.on_thread_stop = on_thread_stop
