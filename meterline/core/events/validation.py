"""CloudEvent validation: what ingest accepts, normalised into the shape the wire carries.

Attribute rules come from the CloudEvents SDK (`cloudevents.core.v1.event.CloudEvent`, which reports
every problem per attribute). meterline adds what metering needs: `subject` is required, `time` must be
RFC 3339 inside the range ClickHouse can store, `id`, `source`, `subject` and `type` are bounded in length
and free of control characters (`meterline.core.attributes`), and `data` is bounded in size and depth.

Ingest normalises `time` (defaulting to the receive time) so the processor never re-validates.
This module does no I/O.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Container, Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import orjson
from cloudevents.core.exceptions import (
    BaseCloudEventException,
    CloudEventValidationError,
    InvalidAttributeTypeError,
    InvalidAttributeValueError,
    MissingRequiredAttributeError,
)
from cloudevents.core.v1.event import CloudEvent

from meterline.core.attributes import (
    IDENTITY,
    MAX_LENGTHS,
    TIME_RANGE_MESSAGE,
    attribute_problem,
    identity_ok,
    time_in_range,
)
from meterline.core.errors import InvalidEventError
from meterline.core.events.wire import CHUNK_MAX_BYTES, SPECVERSION
from meterline.core.times import format_time, normalize_time_text, parse_time

__all__ = [
    "DEFAULT_MAX_DATA_BYTES",
    "DEFAULT_MAX_DATA_DEPTH",
    "OPTIONAL_STRINGS",
    "REQUIRED",
    "validate_events",
]

logger = logging.getLogger(__name__)

REQUIRED: Final = ("specversion", "id", "source", "type", "subject")
OPTIONAL_STRINGS: Final = ("datacontenttype", "dataschema")

DEFAULT_MAX_DATA_BYTES: Final = 64 * 1024
DEFAULT_MAX_DATA_DEPTH: Final = 32



# --------------------------------------------------------------------------------------- validation
def _sdk_message(exc: BaseCloudEventException) -> str:
    """Human text for an SDK error (the SDK's own type message prints `<class 'str'>`)."""
    if isinstance(exc, MissingRequiredAttributeError):
        return "is required"
    if isinstance(exc, InvalidAttributeTypeError):
        return "must be a string"
    if isinstance(exc, InvalidAttributeValueError) and "specversion" in str(exc):
        return f'must be "{SPECVERSION}"'
    if isinstance(exc, InvalidAttributeValueError):
        return "must be a non-empty string"
    return str(exc)


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when `value` nests containers deeper than `limit` (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        if depth > limit:
            return True
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return False


#: Attributes the fast path understands; anything else (extensions, data_base64) takes the full path.
_FAST_KEYS: Final = frozenset({*REQUIRED, *OPTIONAL_STRINGS, "time", "data"})
#: An encoded JSON string takes at most 6 bytes per character (`\u00XX` escapes), plus framing.
_ESCAPE_FACTOR: Final = 6
_FRAMING_BYTES: Final = 512
_ID_MAX, _SOURCE_MAX, _TYPE_MAX, _SUBJECT_MAX = (MAX_LENGTHS[n] for n in ("id", "source", "type", "subject"))
_CANONICAL_TIME_LEN: Final = len("2024-01-01T00:00:00.000000Z")
_MINUTE_LEN: Final = len("2024-01-01T00:00")
#: Canonical times of known minutes, joined: each a minute (already known valid) and `:SS.ffffffZ`.
_CANONICAL_TAILS: Final = re.compile(r"(?:.{16}:[0-5]\d\.\d{6}Z)*", re.ASCII | re.DOTALL)


def fast_heads(
    items: Iterable[Any],
    default_time: str | Callable[[], str],
    max_data_depth: int,
    clean: bool = False,
    normalize_time: Callable[[str], str | None] = normalize_time_text,
    canonical_minutes: Container[str] | None = None,
) -> list[tuple[dict[str, Any], int]] | None:
    """The checks both fast paths share, for every item: shape, identity, optional strings, time, data depth.

    Returns, in order, each common event's normalised copy (the sender's key order, `time` set, a null
    `data` dropped) with the length of its text attributes; None as soon as one item needs the full path
    (`_validate_one`). Its callers differ only in how they bound the size: `_fast_event` measures `data`,
    ingest/fastpath.py the encoded event. A whole list in one call because ingest's fast path takes a
    request all or nothing, and a call per event cost it ~0.2 us an event. `default_time` is the request's
    receive time, formatted, or a function giving it (asked only for an event without a time, so
    ingest/fastpath.py formats it only then); `clean` says the request body can hold no control character
    (ingest/fastpath.py scans it once), so the identity attributes need only their length limits;
    `normalize_time` may memoise `normalize_time_text`. `canonical_minutes` holds minutes
    (`YYYY-MM-DDTHH:MM`) whose canonical times `normalize_time_text` returns unchanged: a time of that
    length and minute is kept as sent and its tail (`:SS.ffffffZ`) checked with every other such time of
    the list by one regex match after the loop (~0.2 us an event less than a call per event: bench P1,
    batches of 100); should one fail, the list takes the full path.
    """
    heads = []
    canonical: list[str] = []  # times kept as sent for a known minute; their tails are checked below
    for item in items:
        if type(item) is not dict or not _FAST_KEYS.issuperset(item) or item.get("specversion") != SPECVERSION:
            return None
        get = item.get
        event_id, source, event_type, subject = get("id"), get("source"), get("type"), get("subject")
        if not (str is type(event_id) is type(source) is type(event_type) is type(subject)):
            return None
        if clean:
            if not (0 < len(event_id) <= _ID_MAX and 0 < len(source) <= _SOURCE_MAX
                    and 0 < len(event_type) <= _TYPE_MAX and 0 < len(subject) <= _SUBJECT_MAX):
                return None
        elif not (event_id and source and event_type and subject
                  and identity_ok(event_id, source, event_type, subject)):
            return None
        text_chars = len(event_id) + len(source) + len(event_type) + len(subject)
        if "datacontenttype" in item or "dataschema" in item:  # OPTIONAL_STRINGS
            for name in OPTIONAL_STRINGS:
                if name in item:
                    value = item[name]
                    if type(value) is not str or not value:
                        return None
                    text_chars += len(value)
        raw_time = get("time")
        event = item.copy()  # keeps the sender's key order; time and data are normalised below
        if type(raw_time) is str:
            if (canonical_minutes is not None and len(raw_time) == _CANONICAL_TIME_LEN
                    and raw_time[:_MINUTE_LEN] in canonical_minutes):
                canonical.append(raw_time)  # canonical if its tail is: checked after the loop
            else:
                normalized = normalize_time(raw_time)
                if normalized is None:
                    return None
                event["time"] = normalized
        elif raw_time is None:
            event["time"] = default_time if isinstance(default_time, str) else default_time()
        else:
            return None
        data = get("data")
        if data is None:
            event.pop("data", None)  # "data": null means no data, as on the full path
        elif type(data) is dict:
            for v in data.values():
                if type(v) is dict or type(v) is list:
                    if _depth_exceeds(data, max_data_depth):
                        return None
                    break
        elif type(data) is list and _depth_exceeds(data, max_data_depth):
            return None
        heads.append((event, text_chars))
    if canonical and _CANONICAL_TAILS.fullmatch("".join(canonical)) is None:
        return None
    return heads


def _fast_event(item: Any, received_time: str, max_data_bytes: int, max_data_depth: int) -> dict[str, Any] | None:
    """The common, valid event in a handful of checks (`fast_heads`), or None to take the full path.

    Why: the full path builds an SDK CloudEvent and walks every rule to report per-field errors, ~19 us
    an event, which capped ingest far below the broker. This accepts a strict subset of what the full path
    accepts and returns the identical normalised event (tests/unit/test_events.py proves both with
    hypothesis); whatever it does not recognise goes to the full path, which still decides and explains.
    """
    heads = fast_heads((item,), received_time, max_data_depth)
    if heads is None:
        return None
    ((event, text_chars),) = heads
    data = event.get("data")
    size = 0
    if data is not None:
        try:
            size = len(orjson.dumps(data))
        except TypeError:
            return None
        if size > max_data_bytes:
            return None
    if _ESCAPE_FACTOR * text_chars + size + _FRAMING_BYTES > CHUNK_MAX_BYTES:
        return None  # possibly too large: the full path measures exactly
    return event


def _validate_one(
    index: int,
    item: Any,
    received_time: str,
    max_data_bytes: int,
    max_data_depth: int,
    errors: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """Validate one item, appending every problem to `errors`; return its normalised form when valid."""
    if not isinstance(item, dict):
        errors.append({"index": index, "field": "event", "message": "must be a JSON object"})
        return None
    found: list[dict[str, Any]] = []

    def bad(field: str, message: str) -> None:
        found.append({"index": index, "field": field, "message": message})

    # Per the JSON event format, null-valued optional attributes are treated as absent.
    event: dict[str, Any] = {k: v for k, v in item.items() if v is not None or k in REQUIRED}
    data_present = "data" in event
    data = event.pop("data", None)
    if "data_base64" in event:
        event.pop("data_base64")
        bad("data_base64", "binary data is not supported; send JSON in `data`")

    # time: ours to parse (RFC 3339, storable range); the SDK only checks it is an aware datetime.
    raw_time = event.pop("time", None)
    time_text = received_time
    if raw_time is not None:
        if not isinstance(raw_time, str):
            bad("time", "must be an RFC 3339 string")
        else:
            try:
                t = parse_time(raw_time)
            except ValueError as exc:
                bad("time", str(exc))
            else:
                if not time_in_range(t):
                    bad("time", TIME_RANGE_MESSAGE)
                else:
                    time_text = format_time(t)

    # Extension values: the JSON format only has string, number and boolean attribute types.
    for key, value in event.items():
        if key in REQUIRED or key in OPTIONAL_STRINGS:
            continue
        if isinstance(value, (dict, list)):
            bad(key, "extension attribute values must be a string, number or boolean")

    # The SDK validates required attributes, optional string attributes and extension names in one pass,
    # reporting every problem per attribute. Subject is optional in CloudEvents but required for metering.
    if "subject" not in event:
        bad("subject", "is required")
    elif not isinstance(event["subject"], str) or not event["subject"]:
        bad("subject", "must be a non-empty string")
    sdk_attrs = {k: v for k, v in event.items() if k != "subject"}
    # The SDK fills a missing specversion/id with defaults; a CloudEvents request must carry them.
    for name in ("specversion", "id"):
        if name not in sdk_attrs:
            bad(name, "is required")
            sdk_attrs[name] = SPECVERSION if name == "specversion" else "placeholder"
    try:
        CloudEvent(sdk_attrs, None)
    except CloudEventValidationError as exc:
        for field, problems in exc.errors.items():
            if problems:  # first problem per field is the most specific (missing > empty > type)
                bad(field, _sdk_message(problems[0]))

    # Lengths and control characters of the identity attributes (meterline.core.attributes).
    for name in IDENTITY:
        value = event.get(name)
        if isinstance(value, str):
            problem = attribute_problem(name, value)
            if problem is not None:
                bad(name, problem)

    if data_present and data is not None:
        if _depth_exceeds(data, max_data_depth):
            bad("data", f"nests deeper than {max_data_depth} levels")
        else:
            try:
                size = len(orjson.dumps(data))
            except TypeError as exc:  # e.g. an integer beyond 64 bits
                bad("data", f"cannot be encoded: {exc}")
            else:
                if size > max_data_bytes:
                    bad("data", f"is {size} bytes encoded; the limit is {max_data_bytes}")

    if found:
        # Dedupe (field, message): the SDK can restate what we already reported (e.g. a missing id).
        seen: set[tuple[str, str]] = set()
        for e in found:
            ident = (e["field"], e["message"])
            if ident not in seen:
                seen.add(ident)
                errors.append(e)
        return None

    event["time"] = time_text
    if data_present and data is not None:
        event["data"] = data
    try:
        encoded_size = len(orjson.dumps(event))
    except TypeError as exc:  # numbers beyond 64 bits in extension attributes
        errors.append({"index": index, "field": "event", "message": f"cannot be encoded: {exc}"})
        return None
    if encoded_size > CHUNK_MAX_BYTES:
        errors.append(
            {
                "index": index,
                "field": "event",
                "message": f"is {encoded_size} bytes encoded; the limit is {CHUNK_MAX_BYTES}",
            }
        )
        return None
    return event


def validate_events(
    items: Sequence[Any],
    received_at: datetime,
    *,
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    max_data_depth: int = DEFAULT_MAX_DATA_DEPTH,
) -> list[dict[str, Any]]:
    """Validate and normalise a request's events, all or nothing.

    Why all or nothing: a client retrying a half-accepted batch cannot know which half landed; rejecting
    the whole batch with every problem listed lets it fix and resend once (dedupe makes resends safe).

    Raises `InvalidEventError` whose `errors` lists `{index, field, message}` for every invalid event.
    Returns the normalised events in request order (time filled with `received_at` when absent).
    """
    received_time = format_time(received_at)
    errors: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        event = _fast_event(item, received_time, max_data_bytes, max_data_depth)
        if event is None:
            event = _validate_one(index, item, received_time, max_data_bytes, max_data_depth, errors)
        if event is not None:
            events.append(event)
    if errors:
        bad_indexes = len({e["index"] for e in errors})
        logger.warning("rejected batch: %d of %d events invalid", bad_indexes, len(items))
        raise InvalidEventError(errors, f"{bad_indexes} of {len(items)} event(s) invalid")
    return events

