"""processor.fetching: the consumer Faust builds gets the configured fetch wait, not Faust's 1500 ms."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as faust_aiokafka

from processor.fetching import limit_fetch_wait


def test_the_consumer_faust_builds_waits_at_most_the_setting(monkeypatch: Any) -> None:
    thread_class: Any = faust_aiokafka.AIOKafkaConsumerThread
    built: list[Any] = []

    def faust_builds(self: Any, transport: Any) -> Any:  # what Faust does: a consumer with 1500 ms
        built.append(SimpleNamespace(_fetch_max_wait_ms=1500))
        return built[-1]

    monkeypatch.setattr(thread_class, "_meterline_original_create", faust_builds, raising=False)
    monkeypatch.setattr(thread_class, "_create_worker_consumer", faust_builds)
    limit_fetch_wait(37)
    limit_fetch_wait(42)  # applying it again replaces the value, never wraps twice
    consumer = thread_class._create_worker_consumer(None, None)
    assert consumer is built[-1] and consumer._fetch_max_wait_ms == 42


def test_aiokafka_still_keeps_the_wait_where_we_set_it() -> None:
    """The private attribute is what AIOKafkaConsumer.start() hands its Fetcher (guards an upgrade)."""
    async def build() -> Any:
        return aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=1234)

    assert asyncio.run(build())._fetch_max_wait_ms == 1234
