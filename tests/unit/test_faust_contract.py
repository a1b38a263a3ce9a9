"""faust-streaming internals the processor relies on, pinned: an upgrade that changes them fails here.

processor/agents.py replaces `Consumer.ack` on the live consumer (`install_ack_guard`), consumes with
`Stream.noack_take` and acks by hand, compares `message.generation_id` with
`app.consumer_generation_id`, and its module docstring explains the two offset-commit holes that make
the guard necessary. Each of those is an implementation detail of faust-streaming 0.15.3 (and
mode-streaming 0.7.1), not public API. If any assertion here fails after an upgrade: re-read
faust/streams.py (noack_take, take_events, ack, _py_aiter) and faust/transport/consumer.py (ack,
_new_offset, on_partitions_revoked, and where aiokafka.py sets consumer_generation_id), check that
the reasoning in processor/agents.py's docstring still holds, fix the code, and only then update the
pins below.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from typing import Any

import faust
import pytest
from faust.streams import Stream
from faust.transport.consumer import Consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.tuples import Message
from faust.worker import Worker

from processor.agents import install_ack_guard

PINNED = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1"}
RECHECK = "re-check processor/agents.py against the new faust (see this module's docstring)"


def source(obj: Any) -> str:
    """Source without comment lines, so commented-out code does not count."""
    return "\n".join(line for line in inspect.getsource(obj).splitlines() if not line.strip().startswith("#"))


@pytest.mark.parametrize("dist", sorted(PINNED))
def test_pinned_versions(dist: str) -> None:
    assert version(dist) == PINNED[dist], f"{dist} is {version(dist)}, the contract was checked on {PINNED[dist]}: {RECHECK}"


def test_consumer_ack_is_a_sync_method_taking_the_message() -> None:
    """`install_ack_guard` wraps it with a sync function of one argument that returns its bool."""
    ack = Consumer.ack
    assert not inspect.iscoroutinefunction(ack), f"Consumer.ack became async: {RECHECK}"
    assert list(inspect.signature(ack).parameters) == ["self", "message"], RECHECK
    assert "_acked" in Consumer.__annotations__, f"Consumer._acked is gone: {RECHECK}"
    assert "self._acked[tp]" in source(ack), f"Consumer.ack no longer records into _acked: {RECHECK}"


def test_commit_hole_1_head_gap_check_skipped_for_offset_zero() -> None:
    """_new_offset commits the first consecutive run of acks; its head-gap check is skipped when the
    committed offset is None or 0 -- the hole the guard closes."""
    body = source(Consumer._new_offset)
    assert "consecutive_numbers(acked)" in body, f"_new_offset changed how it picks the commit offset: {RECHECK}"
    assert "if committed_offset:" in body, f"_new_offset's head-gap check changed (hole 1): {RECHECK}"


def test_commit_hole_2_stream_acks_skipped_stale_messages() -> None:
    body = source(Stream._py_aiter)
    assert "message.generation_id != self.app.consumer_generation_id" in body, (
        f"Stream._py_aiter no longer skips stale generations this way (hole 2): {RECHECK}"
    )


def test_revoke_drops_acked_offsets() -> None:
    assert "self._acked.pop(tp" in source(Consumer.on_partitions_revoked), RECHECK


def test_noack_take_never_acks_and_take_events_does() -> None:
    noack = inspect.unwrap(Stream.noack_take)  # 0.15.3 wraps it to track abandoned buffers
    assert inspect.isasyncgenfunction(noack), RECHECK
    assert list(inspect.signature(noack).parameters) == ["self", "max_", "within"], RECHECK
    assert "self.ack(" not in source(noack), f"Stream.noack_take acks events now: {RECHECK}"
    assert "self.current_event" in source(noack), f"noack_take no longer buffers events: {RECHECK}"
    # The reason take_events is not used: it acks the buffer in a `finally`, also when the body raised.
    assert "await self.ack(event)" in source(inspect.unwrap(Stream.take_events)), RECHECK


def test_stream_ack_and_app_hooks_the_agent_uses() -> None:
    assert inspect.iscoroutinefunction(Stream.ack), RECHECK
    assert list(inspect.signature(Stream.ack).parameters) == ["self", "event"], RECHECK
    assert inspect.iscoroutinefunction(faust.App.crash), RECHECK
    app = faust.App("contract-check", broker="kafka://127.0.0.1:1", store="memory://")
    assert app.consumer_generation_id == 0, RECHECK
    assert callable(app.on_partitions_revoked.connect), RECHECK
    assert callable(app.on_partitions_assigned.connect), RECHECK  # feeds the assigned-partitions gauge
    sends = source(faust.App._on_partitions_revoked) + source(faust.App._on_partitions_assigned)
    assert "self.on_partitions_revoked.send)(revoked)" in sends, RECHECK
    assert "self.on_partitions_assigned.send)(assigned)" in sends, RECHECK
    # The aiokafka driver is what moves the generation on a rebalance.
    assert "app.consumer_generation_id = generation" in source(faust_aiokafka), RECHECK


def test_message_carries_what_a_batch_reads() -> None:
    for name in ("partition", "offset", "timestamp", "generation_id", "tp", "acked"):
        assert name in Message.__slots__, f"faust Message lost {name!r}: {RECHECK}"


def test_worker_takes_the_options_processor_app_passes() -> None:
    params = inspect.signature(Worker.__init__).parameters
    for name in ("loglevel", "redirect_stdouts", "logging_config"):
        assert name in params, f"faust Worker() no longer takes {name}: {RECHECK}"


class RecordingConsumer:
    def __init__(self) -> None:
        self.acked: list[object] = []

    def ack(self, message: object) -> bool:
        self.acked.append(message)
        return True


def test_ack_guard_passes_only_approved_messages_once() -> None:
    consumer = RecordingConsumer()
    approved: set[int] = set()
    install_ack_guard(consumer, approved)
    install_ack_guard(consumer, approved)  # idempotent: a restarted agent must not wrap twice
    ours, skipped = object(), object()
    approved.add(id(ours))
    assert consumer.ack(skipped) is False
    assert consumer.ack(ours) is True
    assert consumer.ack(ours) is False  # approval is used up
    assert consumer.acked == [ours]
