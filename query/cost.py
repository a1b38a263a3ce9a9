"""The query cost ceiling, checked before ClickHouse is asked: the windows x series a request spans.

Why both this and ClickHouse's `max_rows_to_group_by`: the number of windows follows from the request
alone (`from`, `to`, `windowSize`), so a request like `windowSize=MINUTE` over a decade is refused at
once with a 400 naming `windowSize`, at no cost to ClickHouse. Answers only hold windows with data, so
this bound (`query_max_windows`, 1M: ~2 years of minutes) is looser than the one on rows answered
(`query_max_rows`), which ClickHouse enforces as it aggregates, where the number of series (subjects,
groups) is known (`meterline.adapters.clickhouse.read_guards`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import Enum

from meterline.core.errors import QueryTooLargeError

#: The shortest length of each window size (a month is at least 28 days): an upper bound on the count.
_SHORTEST = {
    "MINUTE": timedelta(minutes=1), "HOUR": timedelta(hours=1), "DAY": timedelta(days=1), "MONTH": timedelta(days=28),
}


def estimated_rows(
    start: datetime | None, end: datetime, window_size: str | Enum | None, subjects: Sequence[str],
    group_by_subject: bool,
) -> int:
    """An upper bound of windows x the series known from the request (0 when `from` is not given).

    Without `from` the range starts at the first stored window, which only ClickHouse knows.
    """
    if start is None:
        return 0
    size = window_size.value if isinstance(window_size, Enum) else window_size
    windows = 1 if size is None else math.ceil((end - start) / _SHORTEST[size]) + 1
    series = len(subjects) if group_by_subject and subjects else 1
    return windows * series


def check_cost(
    start: datetime | None, end: datetime, window_size: str | Enum | None, subjects: Sequence[str],
    group_by_subject: bool, max_windows: int,
) -> None:
    """Raise QueryTooLargeError naming `windowSize` (or `from`) when the request spans over `max_windows`."""
    rows = estimated_rows(start, end, window_size, subjects, group_by_subject)
    if rows > max_windows:
        size = window_size.value if isinstance(window_size, Enum) else window_size
        field = "windowSize" if size is not None else "from"
        raise QueryTooLargeError(
            field, f"the answer would have up to {rows:,} windows x series, over the ceiling of {max_windows:,}: "
            "narrow from/to or use a larger windowSize"
        )
