"""Answers read wholly from coarse rows, kept in this query process: a repeat costs one constant check.

A query whose every minute lies in compacted months (an invoice or a dashboard over closed billing
periods) reads only `meter_windows_coarse`, whose rows of a month stay exactly what they were while the
month is marked valid for its fingerprint (docs/design.md, "Coarse rows"). Its answer is therefore a
function of the query's shape and the (month, fingerprint) pairs of its plan, and can be kept. A repeat
still asks ClickHouse the same per-month validity check the full query carries (`query.sql._valid`: a
`joinGet` of constants, evaluated once while the statement is analysed, no table read): if a writer has
since marked a month invalid, the check fails exactly as the full query would, and the query API plans
that month from minute rows as before (query/store.py). So a kept answer is returned only when the
full query, run at that instant, would have read the same coarse rows. What it saves is ClickHouse's
fixed cost of a MergeTree read on the embedded server (~4 ms) and the parse of the rows: the check is one
request with no table (`SELECT 1` costs ~1.8 ms over HTTP).

Why only whole answers, not the coarse months of a query that also reads minute rows or raw edges: a
bucket may straddle the end of a month (a local day or month across a UTC month boundary), and merging a
kept bucket with a fresh part of it would need every aggregation's partial state (uniques, latest) kept
too. Bounded by rows held (least recently used first out); an answer larger than a quarter of the bound is
not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

#: Rows held across all kept answers (a 30-day hourly answer per subject is 720 rows; ~200 bytes a row).
DEFAULT_MAX_ROWS = 100_000


class CoarseAnswers:
    """Least-recently-used answers by key, at most `max_rows` rows in all (0: keep nothing)."""

    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.max_rows = max_rows
        self._answers: OrderedDict[Hashable, tuple[Any, ...]] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def rows(self) -> int:
        return self._rows

    def get(self, key: Hashable) -> tuple[Any, ...] | None:
        with self._lock:
            found = self._answers.get(key)
            if found is None:
                self.misses += 1
                return None
            self._answers.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: Hashable, rows: Sequence[Any]) -> None:
        if self.max_rows <= 0 or len(rows) * 4 > self.max_rows:
            return
        with self._lock:
            old = self._answers.pop(key, None)
            if old is not None:
                self._rows -= len(old)
            self._answers[key] = tuple(rows)
            self._rows += len(rows)
            while self._rows > self.max_rows:
                _, dropped = self._answers.popitem(last=False)
                self._rows -= len(dropped)
