"""A request of common, well-formed events turned into its Kafka messages in one pass, or None.

Why: a batch of 100 events spent ~3 us an event in `meterline.core.events` (validation that copies each
event and encodes its `data` to measure it, then the wire encoder encoding every event again), more than
orjson's parse of the body (bench P1, README "Where the time goes"). This module takes the common
request in fewer steps and encodes each event once:

* control characters: orjson refuses raw C0 controls and invalid UTF-8 in strings, so a decoded string
  can only hold a control character (C0, DEL, C1) if the body holds a backslash escape, a raw DEL or
  the UTF-8 of a C1 control. One scan of the body clears every identity attribute of the request;
  otherwise each event's are checked (`identity_ok`).
* time: an event time in the canonical shape (`YYYY-MM-DDTHH:MM:SS.ffffffZ`) whose minute was already
  found valid and in range by `normalize_time_text` is canonical itself (the storable range starts and
  ends on whole minutes, and the pattern bounds the seconds); anything else asks `normalize_time_text`.
* sizes: each normalised event is encoded once; that size bounds its `data` (only an event over
  `max_data_bytes` has its `data` measured) and the wire limit, and a subject's message is those bytes
  joined, byte for byte what `encode_messages` writes for the list.

It accepts a strict subset of what `meterline.core.events` accepts, with identical messages (tests:
tests/unit/test_ingest_fastpath.py by hypothesis against the authority, tests/unit/test_ingest_endpoint.py
through the app). Whatever it does not recognise makes it return None, and the caller validates and
encodes the whole request with `validate_events` and `encode_messages`, which decide and explain.
This module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import orjson

from meterline.core.events import (
    CHUNK_MAX_BYTES,
    CHUNK_MAX_EVENTS,
    NAMESPACE_ATTRIBUTE,
)
from meterline.core.events.validation import _ESCAPE_FACTOR, _FRAMING_BYTES, fast_heads
from meterline.core.times import normalize_time_text

__all__ = ["fast_messages"]

#: The UTF-8 of a C1 control (U+0080-U+009F).
_C1: Final = re.compile(rb"\xc2[\x80-\x9f]")
#: The canonical time's tail after its minute, `:SS.ffffffZ` (ASCII digits only, as `normalize_time_text`).
_CANONICAL_TAIL: Final = re.compile(r":[0-5]\d\.\d{6}Z\Z", re.ASCII)
_CANONICAL_LEN: Final = len("2024-01-01T00:00:00.000000Z")
_MINUTE_LEN: Final = len("2024-01-01T00:00")
#: Minutes (`YYYY-MM-DDTHH:MM`) of canonical times `normalize_time_text` returned unchanged; bounded.
_MINUTES: set[str] = set()
_MINUTES_MAX: Final = 4096
#: A request of up to this many subjects has its events split by subject with a list comprehension a
#: subject (then one `orjson.dumps` each); more take the per-event loop.
_SPLIT_SUBJECTS_MAX: Final = 8


def _time(raw: str) -> str | None:
    """`normalize_time_text(raw)`, by a set lookup and a pattern for a canonical time of a known minute."""
    if len(raw) == _CANONICAL_LEN and raw[:_MINUTE_LEN] in _MINUTES and _CANONICAL_TAIL.match(raw, _MINUTE_LEN):
        return raw
    normalized = normalize_time_text(raw)
    if normalized is not None and normalized == raw and len(raw) == _CANONICAL_LEN and _CANONICAL_TAIL.match(
        raw, _MINUTE_LEN
    ):
        if len(_MINUTES) >= _MINUTES_MAX:
            _MINUTES.clear()
        _MINUTES.add(raw[:_MINUTE_LEN])
    return normalized


def fast_messages(
    items: list[Any],
    body: bytes,
    received_time: Callable[[], str],
    namespace: str | None,
    *,
    max_data_bytes: int,
    max_data_depth: int,
    max_bytes: int,
    max_events: int = CHUNK_MAX_EVENTS,
) -> list[tuple[bytes, bytes]] | None:
    """`encode_messages(validate_events(items) + namespace, max_events, max_bytes)` for a request of common
    events, or None: then the caller takes that path itself.

    `body` is what orjson parsed `items` from; `received_time()` the request's receive time, formatted
    (asked only for an event without `time`); `namespace` is set on every event when not None (the key's
    namespace, when not the default one).
    """
    if not items:
        return None
    # What a decoded string needs in the body to hold a C0/DEL/C1 control: an escape, DEL, or UTF-8 C2 80-9F
    # (substring searches: a regex alternation scanned a 20 kB body ~30x slower).
    clean = not (b"\\" in body or b"\x7f" in body or (b"\xc2" in body and _C1.search(body)))
    formatted: list[str] = []

    def default_time() -> str:  # formatted once, and only for an event without a time
        if not formatted:
            formatted.append(received_time())
        return formatted[0]

    heads = fast_heads(items, default_time, max_data_depth, clean, _time, _MINUTES)
    if heads is None:
        return None
    if namespace is not None:
        for event, _ in heads:
            event[NAMESPACE_ATTRIBUTE] = namespace
    # Every subject's events encoded with one `orjson.dumps` of the list: what `b"[" + b",".join(each event
    # encoded) + b"]"` gives, without a call and a size check per event. A list that small bounds each of
    # its events' sizes as the per-event check below would; otherwise (or should grouping find more
    # subjects than is cheap to split this way) each event is encoded and checked alone.
    subjects = [event["subject"] for event, _ in heads]
    first = subjects[0]
    if subjects.count(first) == len(subjects):
        runs: dict[str, list[dict[str, Any]]] | None = {first: [event for event, _ in heads]}
    elif len(distinct := dict.fromkeys(subjects)) <= _SPLIT_SUBJECTS_MAX:
        runs = {s: [event for (event, _), t in zip(heads, subjects, strict=True) if t == s] for s in distinct}
    else:
        runs = None
    if runs is not None:
        widest = _ESCAPE_FACTOR * max(text_chars for _, text_chars in heads) + _FRAMING_BYTES
        messages = []
        for subject, events in runs.items():
            try:
                value = orjson.dumps(events)
            except TypeError:
                return None
            size = len(value)  # each event's encoding is at most size - 2
            if size > max_data_bytes or widest + size > CHUNK_MAX_BYTES:
                break  # some event may need its data measured: per event below
            if len(events) > max_events or size > max_bytes:
                return None  # to be cut into several messages: the wire encoder does that
            messages.append((subject.encode(), value))
        else:
            return messages
    return _per_event(heads, max_data_bytes=max_data_bytes, max_bytes=max_bytes, max_events=max_events)


def _per_event(heads: list[tuple[dict[str, Any], int]], *, max_data_bytes: int, max_bytes: int,
               max_events: int) -> list[tuple[bytes, bytes]] | None:
    """`fast_messages`' messages from its normalised events, each encoded and its size bounded alone."""
    groups: dict[str, list[bytes]] = {}
    for event, text_chars in heads:
        data = event.get("data")
        subject = event["subject"]
        try:
            encoded = orjson.dumps(event)
        except TypeError:
            return None
        # The validator's fast path declines (and its full path, which orders keys differently, decides)
        # an event whose data is over the limit or which might encode over CHUNK_MAX_BYTES: the same
        # bound, with the event's encoded size standing in for its data's until the bound is near.
        size = len(encoded)
        if size > max_data_bytes or _ESCAPE_FACTOR * text_chars + size + _FRAMING_BYTES > CHUNK_MAX_BYTES:
            data_size = 0 if data is None else len(orjson.dumps(data))
            if data_size > max_data_bytes or _ESCAPE_FACTOR * text_chars + data_size + _FRAMING_BYTES > CHUNK_MAX_BYTES:
                return None
        group = groups.get(subject)
        if group is None:
            groups[subject] = [encoded]
        else:
            group.append(encoded)
    messages = []
    for subject, parts in groups.items():
        if len(parts) > max_events or 1 + sum(map(len, parts)) + len(parts) > max_bytes:
            return None  # to be cut into several messages: the wire encoder does that
        messages.append((subject.encode(), b"[" + b",".join(parts) + b"]"))
    return messages
