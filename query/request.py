"""A meter query request, read from GET query parameters (`queryMeter`) or a POST JSON body
(`queryMeterPost`) into one validated `MeterQuery`, the way OpenMeter maps both onto one request
(`openmeter/meter/httphandler/mapping.go`).

Rules taken from OpenMeter:
- `subject` both filters and groups by subject ("Subject is a special query parameter which both
  filters and groups by subject(s)").
- `filterGroupBy` (deprecated) is an exact match; several values per key mean any of them ($in).
  It cannot be combined with `advancedMeterGroupByFilters`.
- `groupBy` may name the meter's groupBy keys and `subject`.
- `from`/`to` are any RFC 3339 instants, cut to the second (OpenMeter compares `time` with
  `from.Unix()`/`to.Unix()`); `from` is inclusive, `to` exclusive.

Every bad or unknown parameter is a 400 naming it; none is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from meterline.core.errors import InvalidQueryError
from meterline.core.meters import Meter
from query.filters import FilterString, parse_filter
from query.time_ranges import WINDOW_SIZES, parse_instant, parse_zone

MAX_LIST = 100
"""Most subjects / groupBy keys / customer ids in one query (OpenMeter's maxItems)."""

CUSTOMER_REASON = (
    "meterline has no customers: usage is attributed to subjects only (filter with `subject`); "
    "see README 'OpenMeter compatibility'"
)

_BODY_FIELDS = frozenset({
    "clientId", "from", "to", "windowSize", "windowTimeZone", "subject", "filterCustomerId",
    "filterGroupBy", "advancedMeterGroupByFilters", "groupBy",
})
_GET_PARAMS = frozenset({"clientId", "from", "to", "windowSize", "windowTimeZone", "subject", "filterCustomerId",
                         "groupBy", "advancedMeterGroupByFilters"})


@dataclass(frozen=True, slots=True)
class MeterQuery:
    """What to aggregate. `start`/`end` are the instants as given (echoed in the answer);
    the store cuts them to the second."""

    start: datetime | None = None
    end: datetime | None = None
    window_size: str | None = None
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    subjects: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    group_by_subject: bool = False
    filters: Mapping[str, FilterString] = field(default_factory=dict)
    client_id: str | None = None


def from_query_params(meter: Meter, params: Any) -> MeterQuery:
    """GET: `params` is a starlette QueryParams (multi-valued)."""
    fields: dict[str, Any] = {}
    simple: dict[str, list[str]] = {}
    advanced_deep: dict[str, dict[str, list[str]]] = {}
    for name in params:
        values = params.getlist(name)
        if name in _GET_PARAMS:
            fields[name] = values
        elif name.startswith("filterGroupBy"):
            key = _bracketed(name, "filterGroupBy", 1)[0]
            simple.setdefault(key, []).extend(values)
        elif name.startswith("advancedMeterGroupByFilters["):
            key, op = _bracketed(name, "advancedMeterGroupByFilters", 2)
            advanced_deep.setdefault(key, {})[op] = values
        else:
            raise InvalidQueryError(name, "unknown query parameter")
    body: dict[str, Any] = {}
    for name, values in fields.items():
        if name in ("subject", "groupBy", "filterCustomerId"):
            body[name] = values
        elif len(values) > 1:
            raise InvalidQueryError(name, "must be given at most once")
        elif name == "advancedMeterGroupByFilters":
            body[name] = _json_param(name, values[0])
        else:
            body[name] = values[0]
    if advanced_deep:
        if "advancedMeterGroupByFilters" in body:
            raise InvalidQueryError("advancedMeterGroupByFilters", "give it as JSON or as [key][$op]=value, not both")
        body["advancedMeterGroupByFilters"] = {k: _deep_filter(k, ops) for k, ops in advanced_deep.items()}
    if simple:
        body["filterGroupBy"] = simple
    return from_body(meter, body, source="query")


def _bracketed(name: str, prefix: str, parts: int) -> list[str]:
    """`filterGroupBy[model]` -> ["model"]; `advancedMeterGroupByFilters[model][$in]` -> ["model", "$in"]."""
    rest = name[len(prefix):]
    keys: list[str] = []
    while rest.startswith("[") and "]" in rest:
        end = rest.index("]")
        keys.append(rest[1:end])
        rest = rest[end + 1:]
    if rest or len(keys) != parts or not all(keys):
        shape = f"{prefix}[key]" + ("[$op]" if parts == 2 else "")
        raise InvalidQueryError(name, f"use {shape}=value (deepObject style)")
    return keys


def _deep_filter(key: str, ops: dict[str, list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op, values in ops.items():
        name = f"advancedMeterGroupByFilters[{key}][{op}]"
        if any(v == "[object Object]" for v in values):
            raise InvalidQueryError(name, "nested objects cannot be sent as query parameters; send "
                                          "advancedMeterGroupByFilters as a JSON string or use POST .../query")
        if op in ("$in", "$nin"):
            out[op] = values
        elif op == "$exists":
            if values != ["true"] and values != ["false"]:
                raise InvalidQueryError(name, "must be true or false")
            out[op] = values[0] == "true"
        elif len(values) != 1:
            raise InvalidQueryError(name, "must be given once")
        else:
            out[op] = values[0]
    return out


def _json_param(name: str, text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise InvalidQueryError(name, "must be a JSON object, e.g. {\"model\":{\"$in\":[\"gpt-4\"]}}") from None


def from_body(meter: Meter, body: Any, source: str = "body") -> MeterQuery:
    """POST body (`MeterQueryRequest`) or the GET parameters rearranged into its shape."""
    if not isinstance(body, Mapping):
        raise InvalidQueryError("body", "must be a JSON object (MeterQueryRequest)")
    for name in body:
        if name not in _BODY_FIELDS:
            raise InvalidQueryError(name, f"unknown field of the {'request body' if source == 'body' else 'query'}")

    client_id = _opt_str(body, "clientId")
    if client_id is not None and not 1 <= len(client_id) <= 36:
        raise InvalidQueryError("clientId", "must be 1 to 36 characters")
    start = _instant(body, "from")
    end = _instant(body, "to")
    if start is not None and end is not None and int(start.timestamp()) >= int(end.timestamp()):
        raise InvalidQueryError("from", "must be before 'to' (both are cut to the second)")
    size = _opt_str(body, "windowSize")
    if size is not None and size not in WINDOW_SIZES:
        raise InvalidQueryError("windowSize", f"must be one of {', '.join(WINDOW_SIZES)}, got {size!r}")
    zone = parse_zone(_opt_str(body, "windowTimeZone"))

    customers = _str_list(body, "filterCustomerId")
    if customers:
        raise InvalidQueryError("filterCustomerId", CUSTOMER_REASON)

    subjects = tuple(dict.fromkeys(_str_list(body, "subject")))
    group_by: list[str] = []
    group_by_subject = bool(subjects)
    for key in dict.fromkeys(_str_list(body, "groupBy")):
        if key == "subject":
            group_by_subject = True
        elif key == "customer_id":
            raise InvalidQueryError("groupBy", CUSTOMER_REASON)
        elif key in meter.group_by:
            group_by.append(key)
        else:
            raise InvalidQueryError("groupBy", f"meter {meter.slug!r} has no groupBy key {key!r}")

    filters = _filters(meter, body)
    return MeterQuery(
        start=start, end=end, window_size=size, zone=zone, subjects=subjects, group_by=tuple(group_by),
        group_by_subject=group_by_subject, filters=filters, client_id=client_id,
    )


def _filters(meter: Meter, body: Mapping[str, Any]) -> dict[str, FilterString]:
    advanced = body.get("advancedMeterGroupByFilters")
    simple = body.get("filterGroupBy")
    filters: dict[str, FilterString] = {}
    if advanced is not None:
        if not isinstance(advanced, Mapping):
            raise InvalidQueryError("advancedMeterGroupByFilters", "must be an object of groupBy key -> filter")
        for key, value in advanced.items():
            _filter_key(meter, "advancedMeterGroupByFilters", key)
            filters[key] = parse_filter(value, f"advancedMeterGroupByFilters.{key}")
    if simple:
        if filters:
            raise InvalidQueryError(
                "filterGroupBy", "advancedMeterGroupByFilters and filterGroupBy cannot be used together"
            )
        if not isinstance(simple, Mapping):
            raise InvalidQueryError("filterGroupBy", "must be an object of groupBy key -> values")
        for key, values in simple.items():
            name = f"filterGroupBy[{key}]"
            _filter_key(meter, "filterGroupBy", key)
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise InvalidQueryError(name, "must be a non-empty array of strings")
            filters[key] = FilterString("$in", tuple(dict.fromkeys(values)))
    return filters


def _filter_key(meter: Meter, field_name: str, key: Any) -> None:
    if not isinstance(key, str) or (key != "subject" and key not in meter.group_by):
        raise InvalidQueryError(f"{field_name}[{key}]", f"meter {meter.slug!r} has no groupBy key {key!r}")


def _opt_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidQueryError(name, "must be a string")
    return value


def _instant(body: Mapping[str, Any], name: str) -> datetime | None:
    value = _opt_str(body, name)
    return None if value is None else parse_instant(value, name)


def _str_list(body: Mapping[str, Any], name: str) -> Sequence[str]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidQueryError(name, "must be an array of strings")
    if len(value) > MAX_LIST:
        raise InvalidQueryError(name, f"must hold at most {MAX_LIST} items")
    return value


__all__ = ["CUSTOMER_REASON", "MeterQuery", "from_body", "from_query_params"]
