"""Why an event, or one meter's reading of it, was not metered: typed codes that logic may branch on.

Human text (`reason`, `validation_errors`) is for people and may change wording at any time; code that
decides something (recompute skipping late events, dead-letter replay asking "does this meter still
fail?", query edges skipping what the worker did not meter) reads these codes and the stored
`events.rejections` column instead, never the text.

A rejection of the whole event has meter `WHOLE_EVENT` (""), as in `dead_letters.meter`.

This module does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Final, NamedTuple

__all__ = ["WHOLE_EVENT", "ReasonCode", "StoredRejection", "rejections_of", "unmetered", "was_too_late"]

WHOLE_EVENT: Final = ""


class ReasonCode(StrEnum):
    """`dead_letters.reason_code` and `events.rejections.code`; a `str`, so it is stored as its value."""

    # One meter could not read the event (`meter` = its slug); the event's other meters still count it.
    VALUE_MISSING = "value_missing"
    VALUE_NULL = "value_null"
    VALUE_NOT_NUMERIC = "value_not_numeric"
    VALUE_NOT_FINITE = "value_not_finite"
    VALUE_NOT_SCALAR = "value_not_scalar"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    VALUE_AMBIGUOUS = "value_ambiguous"
    # The whole event was not metered (`meter` = WHOLE_EVENT).
    TOO_LATE = "too_late"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_EVENT = "invalid_event"  # a foreign producer's message that is not a valid event array


class StoredRejection(NamedTuple):
    """One entry of `events.rejections`: which meter (or WHOLE_EVENT) and why.

    `code` is a string, not a ReasonCode: rows written before the column existed get it from their
    `validation_errors` text (schema.py) and carry "" where the text does not say.
    """

    meter: str
    code: str


def rejections_of(value: Iterable[Mapping[str, str] | Sequence[str]]) -> list[StoredRejection]:
    """The `events.rejections` value as the driver returns it, typed: clickhouse-connect reads a named
    Tuple as a dict by default, and as a tuple with `tuple` read format."""
    return [
        StoredRejection(str(r["meter"]), str(r["code"])) if isinstance(r, Mapping) else StoredRejection(str(r[0]), str(r[1]))
        for r in value
    ]


def was_too_late(rejections: Iterable[StoredRejection]) -> bool:
    """The worker refused the event as older than the late horizon: recompute keeps that decision."""
    return any(r.meter == WHOLE_EVENT and r.code == ReasonCode.TOO_LATE for r in rejections)


def unmetered(rejections: Iterable[StoredRejection]) -> bool:
    """The worker metered none of the event (too late, or no meter had its type)."""
    return any(r.meter == WHOLE_EVENT for r in rejections)
