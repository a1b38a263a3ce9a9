"""processor.fetching: the consumer Faust builds gets the configured fetch wait, not Faust's 1500 ms."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiokafka
import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka

from processor.fetching import limit_fetch_wait, stop_without_hanging


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


def test_the_consumer_thread_stops_when_aiokafka_close_reraises_its_fetch_cancellation(monkeypatch: Any) -> None:
    """aiokafka's Fetcher.close awaits a fetch task it cancelled while that task slept its retry backoff:
    the CancelledError escapes close(). The thread's stop must finish (mode then signals shutdown) instead
    of raising; a cancellation of the stop itself still propagates."""
    thread_class: Any = faust_aiokafka.AIOKafkaConsumerThread
    calls: list[str] = []

    async def aiokafka_close(self: Any) -> None:
        calls.append("stop")
        fetch = asyncio.ensure_future(asyncio.sleep(10))  # a pending fetch in its retry backoff
        await asyncio.sleep(0)
        fetch.cancel()
        await fetch  # what Fetcher.close does: raises CancelledError

    monkeypatch.setattr(thread_class, "_meterline_original_stop", aiokafka_close, raising=False)
    monkeypatch.setattr(thread_class, "on_thread_stop", aiokafka_close)
    stop_without_hanging()
    stop_without_hanging()  # applying it again never wraps twice
    asyncio.run(thread_class.on_thread_stop(None))
    assert calls == ["stop"]

    async def cancelled_stop() -> None:
        task = asyncio.ensure_future(thread_class.on_thread_stop(None))
        await asyncio.sleep(0)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled_stop())
