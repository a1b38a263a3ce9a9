"""CloudEvents in meterline: ingest's validation and the Kafka wire codec — the one event parser.

`validation` decides what ingest accepts and normalises it; `wire` encodes and decodes Kafka messages
(ingest and the processor share it, so they can never disagree on the format). This package re-exports
the public names, so callers import from `meterline.core.events`.
"""

from __future__ import annotations

from meterline.core.events.validation import (
    DEFAULT_MAX_DATA_BYTES,
    DEFAULT_MAX_DATA_DEPTH,
    OPTIONAL_STRINGS,
    REQUIRED,
    validate_events,
)
from meterline.core.events.wire import (
    CHUNK_MAX_BYTES,
    CHUNK_MAX_EVENTS,
    NAMESPACE_ATTRIBUTE,
    SPECVERSION,
    decode_batch,
    encode_messages,
)

__all__ = [
    "CHUNK_MAX_BYTES",
    "CHUNK_MAX_EVENTS",
    "DEFAULT_MAX_DATA_BYTES",
    "DEFAULT_MAX_DATA_DEPTH",
    "NAMESPACE_ATTRIBUTE",
    "OPTIONAL_STRINGS",
    "REQUIRED",
    "SPECVERSION",
    "decode_batch",
    "encode_messages",
    "validate_events",
]
