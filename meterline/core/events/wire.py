"""The Kafka wire format: one message = a JSON array of one subject's events, keyed by that subject.

Ingest encodes with this module and the processor decodes with it, so the two sides can never disagree
(see docs/design.md, "Kafka wire format"):

* one Kafka message = a JSON array (orjson) of structured-mode CloudEvents that all share one subject,
  keyed by that subject, so every window of a subject lands on a single partition;
* each event dict has `specversion, id, source, type, subject, time` (RFC 3339 UTC, microseconds, `Z`),
  optional `data`, `datacontenttype`, `dataschema` and extension attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

from meterline.core.errors import InvalidEventError

__all__ = ["CHUNK_MAX_BYTES", "CHUNK_MAX_EVENTS", "NAMESPACE_ATTRIBUTE", "SPECVERSION", "decode_batch", "encode_messages"]

SPECVERSION: Final = "1.0"
#: The event attribute ingest sets to the namespace of the key that sent it (absent = `default`).
#: CloudEvents attribute names are lower-case letters and digits only, and ingest refuses any other,
#: so no client can set or spoof it; only a producer with broker access could.
NAMESPACE_ATTRIBUTE: Final = "meterline_namespace"
#: Kafka message bounds (design.md): ~100-event messages are what make the processor fast, and 512 KiB
#: stays far below every broker's default `message.max.bytes` (1 MiB) even after framing.
CHUNK_MAX_EVENTS: Final = 500
CHUNK_MAX_BYTES: Final = 512 * 1024


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """Decode one Kafka message value; raises `InvalidEventError` (field `payload`) if it is not ours."""
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidEventError([{"field": "payload", "message": f"not JSON: {exc}"}]) from None
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise InvalidEventError([{"field": "payload", "message": "must be a JSON array of event objects"}])
    return value


def _chunks(events: Sequence[dict[str, Any]], max_events: int, max_bytes: int) -> list[tuple[str, list[int], bytes]]:
    """Group event indexes by subject (first-seen order), cut each group by count and encoded size, and
    encode each chunk: `(subject, indexes, JSON array)`.

    Sizes are exact: a message is `[` + events joined by `,` + `]`, which is byte for byte what orjson
    writes for the list. So a group within both limits is encoded in one call (the common case: ~100
    events of one subject), and only a group over a limit is cut event by event. An event that alone
    exceeds `max_bytes` still travels alone (validation keeps events under CHUNK_MAX_BYTES, so it cannot).
    """
    if max_events < 1:
        raise ValueError("max_events must be >= 1")
    by_subject: dict[str, list[int]] = {}
    for i, event in enumerate(events):
        by_subject.setdefault(str(event["subject"]), []).append(i)
    out: list[tuple[str, list[int], bytes]] = []
    for subject, indexes in by_subject.items():
        if len(indexes) <= max_events:
            whole = orjson.dumps([events[i] for i in indexes])
            if len(whole) <= max_bytes:
                out.append((subject, indexes, whole))
                continue
        idx: list[int] = []
        parts: list[bytes] = []
        size = 2  # the brackets
        for i in indexes:
            part = orjson.dumps(events[i])
            extra = len(part) + (1 if parts else 0)
            if parts and (len(parts) >= max_events or size + extra > max_bytes):
                out.append((subject, idx, b"[" + b",".join(parts) + b"]"))
                idx, parts, size = [], [], 2
                extra = len(part)
            idx.append(i)
            parts.append(part)
            size += extra
        if parts:
            out.append((subject, idx, b"[" + b",".join(parts) + b"]"))
    return out


def encode_messages(
    events: Sequence[dict[str, Any]],
    max_events: int = CHUNK_MAX_EVENTS,
    max_bytes: int = CHUNK_MAX_BYTES,
) -> list[tuple[bytes, bytes]]:
    """Chunk and encode in one pass: `(key=subject utf-8, value=JSON array)` Kafka messages.

    Serialises each event once (ingest hot path); the processor decodes each value with `decode_batch`.
    """
    return [(subject.encode(), blob) for subject, _, blob in _chunks(events, max_events, max_bytes)]
