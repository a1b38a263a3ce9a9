"""A sliding-window counter per key: the request and event rates of `meterline.adapters.limits`.

Why not the `limits` library's MemoryStorage, which the limiter used first: every hit there takes a
thread lock, builds two string keys and checks its expiry thread, ~7 µs, paid twice on every keyed
ingest request (request rate and event rate). That was most of the authentication cost the bench
measures against its < 5% target (README, "auth on"). The same algorithm on a small list per key, in
one event-loop thread, costs well under a microsecond.

The algorithm is the `limits` sliding-window counter: windows aligned to multiples of the period; the
count that decides is the previous window's count weighted by how much of it still overlaps the
sliding window, plus the current window's. A refused hit counts nothing. The clock is a parameter
(monotonic seconds), so the arithmetic is tested without sleeping.
"""

from __future__ import annotations

import math


class SlidingWindow:
    """At most `amount` units per `period` seconds per key, as a sliding-window counter."""

    __slots__ = ("_state", "amount", "period")

    def __init__(self, amount: int, period: float) -> None:
        if amount < 1 or period <= 0:
            raise ValueError("a rate needs amount >= 1 and period > 0")
        self.amount = amount
        self.period = period
        self._state: dict[str, list[float]] = {}  # key -> [window index, previous count, current count]

    def _counts(self, key: str, now: float) -> tuple[list[float], float]:
        """The key's state rolled forward to `now`, and the weighted count of the sliding window."""
        index = now // self.period
        state = self._state.get(key)
        if state is None:
            state = self._state[key] = [index, 0.0, 0.0]
        elif state[0] != index:
            state[1] = state[2] if state[0] == index - 1 else 0.0
            state[2] = 0.0
            state[0] = index
        overlap = 1.0 - (now - index * self.period) / self.period
        return state, state[1] * overlap + state[2]

    def hit(self, key: str, now: float, cost: int = 1) -> bool:
        """Count `cost` units for `key` at `now` if they fit (True); else count nothing (False)."""
        state, weighted = self._counts(key, now)
        if math.floor(weighted) + cost > self.amount:
            return False
        state[2] += cost
        return True

    def retry_after(self, key: str, now: float, cost: int = 1) -> float:
        """Seconds after which `cost` units of `key` fit again: 0 if they fit now, else > 0.

        `hit` admits while floor(weighted) + cost <= amount, i.e. while weighted < amount - cost + 1.
        """
        if cost > self.amount:
            return self.period  # never fits; the caller says to send less at once
        state, weighted = self._counts(key, now)
        below = self.amount - cost + 1  # the weighted count must fall under this
        if weighted < below:
            return 0.0
        window_end = (state[0] + 1) * self.period
        previous, current = state[1], state[2]
        if current >= below:
            # The current window alone is too full: it must become the previous one and decay, which it
            # does linearly over the next period.
            return window_end - now + self.period * min(1.0, (current - below) / current)
        # Only the previous window's weight is in the way; it decays linearly until the window ends. At the
        # instant it reaches `below` it does not fit yet (hence > 0 even when that instant is now).
        return max(1e-6, min(window_end - now, self.period * (weighted - below) / previous))
