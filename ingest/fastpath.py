"""A request of common, well-formed events turned into its Kafka messages in one pass, or None.

Why: a batch of 100 events spent ~3 us an event in `meterline.core.events` (validation that copies each
event and encodes its `data` to measure it, then the wire encoder encoding every event again), more than
orjson's parse of the body (bench P1, docs/performance.md, "Where the time goes"). This module takes the common
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
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from operator import getitem, itemgetter
from typing import Any, Final

import orjson

from meterline.core.events import (
    CHUNK_MAX_BYTES,
    CHUNK_MAX_EVENTS,
    NAMESPACE_ATTRIBUTE,
    REQUIRED,
)
from meterline.core.events.validation import (
    _ESCAPE_FACTOR,
    _FRAMING_BYTES,
    _ID_MAX,
    _SOURCE_MAX,
    _SUBJECT_MAX,
    _TYPE_MAX,
    fast_heads,
)
from meterline.core.events.wire import SPECVERSION
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
#: subject; more in one loop over the events (then one `orjson.dumps` a subject either way).
_SPLIT_SUBJECTS_MAX: Final = 8
#: Requests of fewer events go straight to `fast_heads`: the column checks' fixed cost (~20 C loops) made
#: one event ~1.5 us dearer, and they only pay off from ~6 events (in process).
_COLUMNS_MIN: Final = 8
#: What `_columns` reads of each event, in `REQUIRED` order, then `time` and `data`.
_ROW_KEYS: Final = (*REQUIRED, "time", "data")
_ROW: Final = itemgetter(*_ROW_KEYS)
_MINUTE_SLICE: Final = slice(0, _MINUTE_LEN)
#: Canonical times of minutes already known valid, joined: each a minute and `:SS.ffffffZ`.
_CANONICAL_TIMES: Final = re.compile(r"(?:.{16}:[0-5]\d\.\d{6}Z)*", re.ASCII | re.DOTALL)
#: JSON values orjson parses that nest nothing (`data` of only these is one level deep).
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


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

    if clean and len(items) >= _COLUMNS_MIN:
        columns = _columns(items, max_data_depth)
        if columns is not None:
            subjects, widest_text = columns
            events = items if namespace is None else [{**item, NAMESPACE_ATTRIBUTE: namespace} for item in items]
            messages = _by_subject(events, subjects, widest_text, max_data_bytes=max_data_bytes,
                                   max_bytes=max_bytes, max_events=max_events)
            if messages is not _UNBOUNDED:
                return messages
    heads = fast_heads(items, default_time, max_data_depth, clean, _time, _MINUTES)
    if heads is None:
        return None
    if namespace is not None:
        for event, _ in heads:
            event[NAMESPACE_ATTRIBUTE] = namespace
    messages = _by_subject([event for event, _ in heads], [event["subject"] for event, _ in heads],
                           max(text_chars for _, text_chars in heads), max_data_bytes=max_data_bytes,
                           max_bytes=max_bytes, max_events=max_events)
    if messages is not _UNBOUNDED:
        return messages
    return _per_event(heads, max_data_bytes=max_data_bytes, max_bytes=max_bytes, max_events=max_events)


def _columns(items: list[Any], max_data_depth: int) -> tuple[Sequence[str], int] | None:
    """The subjects of a request whose events are all as common as can be, and a bound on each event's
    text attributes' length; None for anything else (`fast_heads` then looks at each event).

    As common as can be: a JSON object with exactly the required attributes, `time` and `data` (so
    nothing to normalise or drop: each event is its own normalised form, no copy), short non-empty text
    attributes in a body `fast_messages` found clean, canonical times of minutes `_time` already
    checked, and `data` an object of scalars. Why: the same checks as `fast_heads` makes, each over all
    events at once by C loops (`map`, `set`, `min`/`max`, one regex over the joined times) instead of a
    Python loop's ~25 steps an event (~1 us of a ~4 us event in a batch of 100: bench P1, README).
    """
    if max_data_depth < 1 or set(map(type, items)) != {dict} or set(map(len, items)) != {len(_ROW_KEYS)}:
        return None
    try:
        # Seven columns (with the length above: exactly those attributes), each a tuple in event order.
        specversions, ids, sources, types, subjects, times, datas = zip(*map(_ROW, items), strict=True)
    except KeyError:
        return None
    texts = ids + sources + types + subjects
    try:
        "".join(texts)  # a TypeError unless every one is a string
        joined_times = "".join(times)
    except TypeError:
        return None
    if specversions.count(SPECVERSION) != len(items) or "" in texts:
        return None
    widest = (id_len := max(map(len, ids))) + (source_len := max(map(len, sources))) + (
        type_len := max(map(len, types))) + (subject_len := max(map(len, subjects)))
    if id_len > _ID_MAX or source_len > _SOURCE_MAX or type_len > _TYPE_MAX or subject_len > _SUBJECT_MAX:
        return None
    if (set(map(len, times)) != {_CANONICAL_LEN}
            or not _MINUTES.issuperset(map(getitem, times, repeat(_MINUTE_SLICE)))
            or _CANONICAL_TIMES.fullmatch(joined_times) is None):
        return None
    if set(map(type, datas)) != {dict} or not _SCALARS.issuperset(
            map(type, chain.from_iterable(map(dict.values, datas)))):
        return None  # data absent, null, nested or not an object: `fast_heads` decides
    return subjects, widest


#: `_by_subject`'s answer when an event may need its `data` measured: `_per_event` then bounds each alone.
_UNBOUNDED: Final[list[tuple[bytes, bytes]]] = []


def _by_subject(events: list[dict[str, Any]], subjects: Sequence[str], widest_text: int, *, max_data_bytes: int,
                max_bytes: int, max_events: int) -> list[tuple[bytes, bytes]] | None:
    """Every subject's events (normalised) encoded with one `orjson.dumps` of the list: what `b"[" +
    b",".join(each event encoded) + b"]"` gives, without a call and a size check per event. A list that
    small bounds each of its events' sizes as `_per_event`'s check would; otherwise `_UNBOUNDED`. None as
    `fast_messages`."""
    first = subjects[0]
    if subjects.count(first) == len(subjects):
        runs = {first: events}
    elif len(distinct := dict.fromkeys(subjects)) <= _SPLIT_SUBJECTS_MAX:
        runs = {s: [event for event, t in zip(events, subjects, strict=True) if t == s] for s in distinct}
    else:
        runs = {}
        for event, subject in zip(events, subjects, strict=True):
            run = runs.get(subject)
            if run is None:
                runs[subject] = [event]
            else:
                run.append(event)
    widest = _ESCAPE_FACTOR * widest_text + _FRAMING_BYTES
    messages = []
    for subject, run in runs.items():
        try:
            value = orjson.dumps(run)
        except TypeError:
            return None
        size = len(value)  # each event's encoding is at most size - 2
        if size > max_data_bytes or widest + size > CHUNK_MAX_BYTES:
            return _UNBOUNDED  # some event may need its data measured
        if len(run) > max_events or size > max_bytes:
            return None  # to be cut into several messages: the wire encoder does that
        messages.append((subject.encode(), value))
    return messages


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
