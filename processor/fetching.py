"""How long the worker's Kafka fetches may wait for data: a setting, not Faust's hard-coded 1.5 s.

Faust builds its aiokafka consumer with `fetch_max_wait_ms=1500` and no way to change it. Measured on the
local broker (tansu), aiokafka's produce-to-consume latency is ~450 ms at the median with 1500 ms, ~105 ms
with aiokafka's own 500 ms, and ~8 ms with 20 ms; the processor's freshness (P4) inherited it. aiokafka
reads the value when the consumer starts, so setting it on the consumer Faust just built is enough.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

__all__ = ["limit_fetch_wait"]


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
