"""The sliding-window counter (meterline.core.ratelimit) against the `limits` library it replaced.

Oracle: `limits`' own SlidingWindowCounterRateLimiter on MemoryStorage, driven by the same fake clock,
must take the same decision on every hit; and a refused key must fit again exactly when `retry_after` says.
"""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage, memory
from limits.strategies import SlidingWindowCounterRateLimiter

from meterline.core.ratelimit import SlidingWindow


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@settings(max_examples=150, deadline=None)
@given(amount=st.integers(1, 12), period=st.sampled_from([1, 2, 10]),
       steps=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 6), st.sampled_from("ab")), max_size=60))
def test_same_decisions_as_the_limits_library(amount: int, period: int, steps: list[tuple[int, int, str]]) -> None:
    fake = Clock(1_000_000.0)
    original = memory.time
    memory.time = types.SimpleNamespace(time=fake.time)  # type: ignore[assignment]
    try:
        storage = MemoryStorage()
        oracle = SlidingWindowCounterRateLimiter(storage)
        item = RateLimitItemPerSecond(amount, period)
        window = SlidingWindow(amount, float(period))
        for quarters, cost, key in steps:  # time moves in quarter seconds: no float ties at window edges
            fake.now += quarters / 4
            assert window.hit(key, fake.now, cost) == oracle.hit(item, key, cost=cost), (fake.now, cost, key)
        storage.reset()
    finally:
        memory.time = original  # type: ignore[assignment]


@settings(max_examples=200, deadline=None)
@given(amount=st.integers(1, 20), fill=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 5)), min_size=1, max_size=30),
       cost=st.integers(1, 5))
def test_retry_after_is_when_the_hit_fits_again(amount: int, fill: list[tuple[int, int]], cost: int) -> None:
    window = SlidingWindow(amount, 10.0)
    now = 100.0
    for tenths, n in fill:
        now += tenths / 10
        window.hit("k", now, n)
    wait = window.retry_after("k", now, cost)
    if cost > amount:
        return
    if wait == 0:
        assert _fits(window, now, cost)
        return
    # Oracle: scan forward in small steps on copies; the first instant it fits is `wait` (to the step).
    assert not _fits(window, now, cost)
    if wait > 0.01:  # (time never runs backwards for the counter)
        assert not _fits(window, now + wait - 0.01, cost)
    assert _fits(window, now + wait + 0.01, cost)


def _fits(window: SlidingWindow, at: float, cost: int) -> bool:
    copy = SlidingWindow(window.amount, window.period)
    copy._state = {k: list(v) for k, v in window._state.items()}
    return copy.hit("k", at, cost)


def test_keys_are_independent_and_refusals_count_nothing() -> None:
    window = SlidingWindow(3, 60.0)
    assert [window.hit("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert window.hit("b", 0.0, 3) and not window.hit("b", 0.0)
    assert not window.hit("c", 0.0, 4)  # more than the whole rate at once never fits
    assert window.hit("c", 0.0, 3)  # and the refused 4 were not counted


def test_rejects_an_empty_rate() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0, 1.0)
