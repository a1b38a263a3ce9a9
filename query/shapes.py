"""JSON shapes of the query API's answers (OpenMeter v1 field names), built from stored rows.

Values are exact Decimals internally. JSON carries them as numbers (OpenMeter's float64 field): an
integer when integral (exact at any size), otherwise the float parsed from the exact decimal text
(shortest repr, so 0.1 stays 0.1). CSV (`query.export`) carries the exact decimal text.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from meterline.core.meters import Meter
from meterline.core.times import as_utc, format_time


def number(value: Decimal) -> int | float:
    """JSON number for an exact Decimal: int when integral, else the float of its exact decimal text."""
    if value == value.to_integral_value():
        return int(value)
    return float(decimal_text(value))


def decimal_text(value: Decimal) -> str:
    """Plain exact decimal text without trailing zeros or exponent: 1.500000000 -> '1.5', 1E+2 -> '100'."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def meter_json(meter: Meter) -> dict[str, Any]:
    """OpenMeter's meter shape; `id` is the slug (meters live in config.yaml, not a database)."""
    return {
        "id": meter.slug,
        "slug": meter.slug,
        "description": meter.description,
        "eventType": meter.event_type,
        "aggregation": meter.aggregation.value,
        "valueProperty": meter.value_property,
        "groupBy": dict(meter.group_by),
        "windowSize": "MINUTE",
    }


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
