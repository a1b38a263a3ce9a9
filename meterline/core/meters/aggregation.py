"""How a meter folds values, and the window sizes a query may ask for."""

from __future__ import annotations

from enum import Enum

__all__ = ["Aggregation", "WindowSize"]


class Aggregation(str, Enum):
    """How a meter folds values; every one rolls up exactly from minute windows."""

    SUM = "SUM"
    COUNT = "COUNT"
    AVG = "AVG"
    MIN = "MIN"
    MAX = "MAX"
    UNIQUE_COUNT = "UNIQUE_COUNT"
    LATEST = "LATEST"


class WindowSize(str, Enum):
    """Query window sizes (OpenMeter names); storage is always minute windows."""

    MINUTE = "MINUTE"
    HOUR = "HOUR"
    DAY = "DAY"
    MONTH = "MONTH"

