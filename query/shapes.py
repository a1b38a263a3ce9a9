"""JSON shapes of the query API's answers (OpenMeter v1 field names), built from stored rows.

Values are exact Decimals internally. JSON carries each as a number literal with every digit
(`meterline.core.decimals.decimal_text`: 12345678901234567890123.123456789, 0.1, 100), which is what
OpenMeter's float64 `value` field parses; a client keeps as many digits as its number type holds, and one
that parses JSON numbers as decimals gets the exact value. CSV (`query.export`) carries the same text.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from meterline.core.decimals import decimal_text
from meterline.core.times import as_utc, format_time


def number(value: Decimal) -> orjson.Fragment:
    """The JSON number literal of an exact Decimal, every digit kept (a float keeps ~17); render the
    answer with orjson."""
    return orjson.Fragment(decimal_text(value))


def json_or_text(data: str) -> Any:
    """Stored `data` is JSON text; text that does not parse is returned as it is."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data


def format_event_time(t: datetime) -> str:
    """Event times keep microseconds (`meterline.core.times.format_time`); naive driver values are UTC."""
    return format_time(as_utc(t))


def ingested_event(row: Mapping[str, Any]) -> dict[str, Any]:
    """An `events` row in OpenMeter's IngestedEvent shape: `{event, validationError?, ingestedAt, storedAt}`.

    `event` is the CloudEvent as ingest accepted it: its optional attributes (`datacontenttype`,
    `dataschema`) and extension attributes are kept in the `attributes` column when the row has it.
    """
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": row["id"],
        "source": row["source"],
        "type": row["type"],
        "subject": row["subject"],
        "time": format_event_time(row["time"]),
    }
    extra = row.get("attributes")
    if extra:
        attributes = json_or_text(extra)
        if isinstance(attributes, dict):
            event.update({k: v for k, v in attributes.items() if k not in event})
    if row["data"]:
        event["data"] = json_or_text(row["data"])
    out: dict[str, Any] = {"event": event}
    if row["validation_errors"]:
        out["validationError"] = "; ".join(row["validation_errors"])
    out["ingestedAt"] = format_event_time(row["ingested_at"])
    out["storedAt"] = format_event_time(row.get("stored_at") or row["ingested_at"])
    return out


def dead_letter(row: Mapping[str, Any]) -> dict[str, Any]:
    """A `dead_letters` row as JSON: the event, why it failed, and its log position (for replay)."""
    parsed = json_or_text(row["data"]) if row["data"] else None
    return {
        "event": {
            "id": row["id"], "source": row["source"], "type": row["type"], "subject": row["subject"],
            "time": format_event_time(row["time"]), "data": parsed,
        },
        "meter": row["meter"] or None,
        "reasonCode": row["reason_code"],
        "reason": row["reason"],
        "receivedAt": format_event_time(row["received_at"]),
        "position": {
            "logEpoch": row["log_epoch"], "partition": int(row["kafka_partition"]),
            "offset": int(row["kafka_offset"]), "index": int(row["batch_index"]),
        },
    }
