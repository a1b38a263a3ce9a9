"""What the identity attributes of an event (`id`, `source`, `subject`, `type`) and its time must satisfy.

One place for the rules both sides enforce: ingest refuses a request breaking them (400 naming the
field, `meterline.core.events`), and the processor dead-letters an event breaking the storage rules
(`storage_problem`) because anyone who can write to the topic bypasses ingest, and an event ClickHouse
cannot store would otherwise be retried for ever and stall its partition.

Why these limits: control characters in an identity attribute are never meaningful, break logs and CSV,
and (with NUL) once made two different `(source, id)` pairs share a dedupe key; the length caps keep one
event's identity far below a Kafka message and a ClickHouse primary-key row (`subject` is in the sort
key of every table).

This module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from meterline.core.times import MAX_TIME, MIN_TIME

#: Characters allowed in each identity attribute (after JSON decoding).
MAX_LENGTHS: Final[Mapping[str, int]] = {"id": 512, "source": 1024, "subject": 1024, "type": 256}
IDENTITY: Final = tuple(MAX_LENGTHS)
_SHORTEST_LIMIT: Final = min(MAX_LENGTHS.values())
#: C0 controls, DEL and C1 controls.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

TIME_RANGE_MESSAGE: Final = "must be between 1970-01-01T00:00:00Z and 2106-01-01T00:00:00Z"


def identity_ok(event_id: str, source: str, event_type: str, subject: str) -> bool:
    """True when all four strings are within their limits and free of control characters (the fast path:
    one regex over the joined text; `attribute_problem` explains a False)."""
    if (len(event_id) > MAX_LENGTHS["id"] or len(source) > MAX_LENGTHS["source"]
            or len(event_type) > MAX_LENGTHS["type"] or len(subject) > MAX_LENGTHS["subject"]):
        return False
    return _CONTROL.search(event_id + source + event_type + subject) is None


def attribute_problem(name: str, value: str) -> str | None:
    """Why the string `value` of identity attribute `name` is refused, or None."""
    limit = MAX_LENGTHS[name]
    if len(value) > limit:
        return f"is {len(value)} characters; the limit is {limit}"
    found = _CONTROL.search(value)
    if found is not None:
        return f"contains control character U+{ord(found.group()):04X} at character {found.start()}"
    return None


def time_in_range(t: datetime) -> bool:
    """Whether an (aware) event time fits every stored column."""
    return MIN_TIME <= t < MAX_TIME


def storage_problem(event: Mapping[str, Any], t: datetime) -> tuple[str, str] | None:
    """`(field, message)` for the first rule an event from the topic breaks that would make its rows
    unstorable or its key ambiguous, else None. `t` is its parsed time (the caller parses it anyway)."""
    for name in IDENTITY:
        value = event.get(name)
        if type(value) is not str or not value:
            return name, "must be a non-empty string"
    if not time_in_range(t):
        return "time", TIME_RANGE_MESSAGE
    return None
