"""OpenAPI descriptions of what routes.py parses by hand, and the real schemas of every answer.

routes.py reads `request.query_params` and bodies itself (for deepObject `filterGroupBy[key]`, JSON
query parameters and 400-not-422 errors), so FastAPI cannot infer parameters or response shapes; they
are declared here, in the shape of OpenMeter's v1 spec, so `/openapi.json` describes every endpoint
completely and schemathesis checks every response against a real schema.
"""

from __future__ import annotations

from typing import Any

from meterline.adapters.problems import PROBLEM_SCHEMA

_TIME = {"type": "string", "format": "date-time"}
_STRINGS = {"type": "array", "items": {"type": "string"}}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str, schema: dict[str, Any], description: str, *, explode: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema,
                            "description": description}
    if explode:
        spec.update(style="form", explode=True)
    return spec


def _json_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "content": {"application/json": {"schema": schema}}}


def ok(schema: dict[str, Any], media: str = "application/json", description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description, "content": {media: {"schema": schema}}}}


FROM = _param("from", _TIME, "Start, inclusive (RFC 3339).")
TO = _param("to", _TIME, "End, inclusive (RFC 3339).")
LIMIT = _param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Most rows returned.")
CLIENT_ID = _param("clientId", {"type": "string", "minLength": 1, "maxLength": 36},
                   "Client ID, logged with the query (meterline has no query-progress endpoint).")

PROBLEM = {"content": {"application/problem+json": {"schema": ref("Problem")}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid parameter (the problem names the field)", **PROBLEM},
    503: {"description": "ClickHouse unavailable", **PROBLEM},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown meter", **PROBLEM}}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "Slug taken, or the meter is managed by a config file", **PROBLEM}
}

PRECONDITION: dict[int | str, dict[str, Any]] = {
    412: {"description": "If-Match names a version that is no longer the meter's newest", **PROBLEM}
}

LIST_METERS: dict[str, Any] = {
    "parameters": [
        _param("page", {"type": "integer", "minimum": 1, "default": 1}, "Page index."),
        _param("pageSize", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Items per page."),
        _param("order", {"type": "string", "enum": ["ASC", "DESC"], "default": "ASC"}, "Order direction."),
        _param("orderBy", {"type": "string", "enum": ["key", "name", "aggregation", "createdAt", "updatedAt"]},
               "Order by."),
        _param("includeDeleted", {"type": "boolean", "default": False}, "Include deleted meters."),
    ]
}
_AGGREGATIONS = ["SUM", "COUNT", "AVG", "MIN", "MAX", "UNIQUE_COUNT", "LATEST"]
_METER_FIELDS: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1, "maxLength": 256},
    "description": {"type": "string", "maxLength": 1024},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True},
    "eventType": {"type": "string", "minLength": 1},
    "eventFrom": _TIME,
    "aggregation": {"type": "string", "enum": _AGGREGATIONS},
    "valueProperty": {"type": "string", "minLength": 1},
    "groupBy": {"type": "object", "additionalProperties": {"type": "string"}},
}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


METER_CREATE = _body({
    "type": "object", "required": ["slug", "eventType", "aggregation"], "additionalProperties": False,
    "properties": {"slug": {"type": "string", "pattern": "^[a-z0-9]+(?:[_-][a-z0-9]+)*$", "maxLength": 63},
                   **_METER_FIELDS},
})
METER_UPDATE = _body({"type": "object", "additionalProperties": False, "properties": _METER_FIELDS})
METER_CREATE["responses"] = {"201": {"description": "Created", "content": {"application/json": {"schema": ref("Meter")}}}}
METER_UPDATE["responses"] = ok(ref("Meter"))

_METER_QUERY_PARAMS = [
    CLIENT_ID,
    _param("from", _TIME, "Start, inclusive; any RFC 3339 instant, cut to the second."),
    _param("to", _TIME, "End, exclusive; any RFC 3339 instant, cut to the second. Omitted: no upper bound."),
    _param("windowSize", {"type": "string", "enum": ["MINUTE", "HOUR", "DAY", "MONTH"]},
           "Window size; omitted = one total per group over the range."),
    _param("windowTimeZone", {"type": "string", "default": "UTC"}, "IANA time zone windows align to."),
    _param("subject", {**_STRINGS, "maxItems": 100}, "Only these subjects; also groups by subject.", explode=True),
    _param("filterCustomerId", {**_STRINGS, "maxItems": 100},
           "Not supported: meterline has no customers (400 naming the reason).", explode=True),
    {
        "name": "filterGroupBy", "in": "query", "required": False, "style": "deepObject", "explode": True,
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
        "description": "filterGroupBy[key]=value keeps rows whose group value equals value (repeat for any of several).",
    },
    _json_param("advancedMeterGroupByFilters", {"type": "object", "additionalProperties": ref("FilterString")},
                "JSON object groupBy key -> FilterString; or deepObject advancedMeterGroupByFilters[key][$op]=value."),
    _param("groupBy", {**_STRINGS, "maxItems": 100}, "Group by these groupBy keys of the meter, or `subject`.",
           explode=True),
]
_METER_QUERY_OK = {"200": {"description": "Windows", "content": {
    "application/json": {"schema": ref("MeterQueryResult")},
    "text/csv": {"schema": {"type": "string"}},
}}}
METER_QUERY = {"parameters": _METER_QUERY_PARAMS, "responses": _METER_QUERY_OK}
METER_QUERY_POST = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": ref("MeterQueryRequest")}}},
    "responses": _METER_QUERY_OK,
}
SUBJECTS = {"parameters": [FROM, TO], "responses": ok(_STRINGS)}
GROUP_BY_VALUES = {
    "parameters": [
        _param("from", _TIME, "Start, inclusive; defaults to 24 hours ago when neither bound is given."),
        _param("to", _TIME, "End, inclusive."),
    ],
    "responses": ok(_STRINGS),
}
_EVENT_LIMIT = _param("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 100}, "Most events returned.")
EVENTS = {
    "parameters": [
        CLIENT_ID,
        _param("ingestedAtFrom", _TIME, "Ingested at or after, inclusive."),
        _param("ingestedAtTo", _TIME, "Ingested at or before, inclusive."),
        _param("id", {"type": "string", "minLength": 1}, "Event id; partial match."),
        _param("subject", {"type": "string", "minLength": 1}, "Subject; partial match."),
        _param("customerId", _STRINGS, "Not supported: meterline has no customers (400 naming the reason).",
               explode=True),
        _param("from", _TIME, "Event time, inclusive; defaults to 72 hours ago."),
        _param("to", _TIME, "Event time, inclusive."),
        _EVENT_LIMIT,
    ],
    "responses": ok({"type": "array", "items": ref("IngestedEvent")}),
}
EVENTS_V2 = {
    "parameters": [
        _param("cursor", {"type": "string"}, "nextCursor of the previous page."),
        _EVENT_LIMIT,
        CLIENT_ID,
        _json_param("filter", ref("EventFilter"), "JSON object of filters on id, source, subject, type, time, "
                                                   "ingestedAt."),
    ],
    "responses": ok(ref("IngestedEventCursorPaginatedResponse")),
}
DEAD_LETTERS = {
    "parameters": [
        FROM, TO, LIMIT,
        _param("meter", {"type": "string"}, "Only dead letters of this meter."),
        _param("reasonCode", {"type": "string"}, "e.g. value_not_numeric, too_late, unknown_type."),
    ],
    "responses": ok({"type": "array", "items": ref("DeadLetter")}),
}
SUBJECT_UPSERT = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "array", "minItems": 1, "maxItems": 100, "items": ref("SubjectUpsert")}}}},
    "responses": ok({"type": "array", "items": ref("Subject")}),
}
SUBJECT_LIST = {"responses": ok({"type": "array", "items": ref("Subject")})}
SUBJECT_GET = {"responses": ok(ref("Subject"))}
SUBJECT_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown subject", **PROBLEM}}
PORTAL_TOKEN_CREATE = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["subject"],
        "properties": {"subject": {"type": "string", "minLength": 1}, "allowedMeterSlugs": _STRINGS}}}}},
    "responses": ok(ref("PortalToken")),
}
PORTAL_TOKEN_LIST = {
    "parameters": [_param("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 25}, "Most tokens.")],
    "responses": ok({"type": "array", "items": ref("PortalToken")}),
}
PORTAL_TOKEN_INVALIDATE = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"id": {"type": "string"}, "subject": {"type": "string"}}}}}},
}
METERS = {"responses": ok({"type": "array", "items": ref("Meter")})}
LIST_METERS["responses"] = METERS["responses"]
METER = {"responses": ok(ref("Meter"))}

_NULLABLE_STRING = {"type": "string", "nullable": True}
_FILTER_OPS = {op: _NULLABLE_STRING for op in (
    "$eq", "$ne", "$like", "$nlike", "$ilike", "$nilike", "$contains", "$ncontains", "$gt", "$gte", "$lt", "$lte"
)}
COMPONENTS: dict[str, Any] = {
    "Problem": PROBLEM_SCHEMA,
    "FilterString": {
        "type": "object",
        "properties": {
            **_FILTER_OPS,
            "$in": {**_STRINGS, "nullable": True}, "$nin": {**_STRINGS, "nullable": True},
            "$exists": {"type": "boolean", "nullable": True},
            "$and": {"type": "array", "items": ref("FilterString"), "nullable": True},
            "$or": {"type": "array", "items": ref("FilterString"), "nullable": True},
        },
        "description": "Exactly one operator per object (OpenMeter's FilterString).",
    },
    "MeterQueryRequest": {
        "type": "object",
        "properties": {
            "clientId": {"type": "string", "minLength": 1, "maxLength": 36},
            "from": _TIME, "to": _TIME,
            "windowSize": {"type": "string", "enum": ["MINUTE", "HOUR", "DAY", "MONTH"]},
            "windowTimeZone": {"type": "string", "default": "UTC"},
            "subject": {**_STRINGS, "maxItems": 100},
            "filterCustomerId": {**_STRINGS, "maxItems": 100},
            "filterGroupBy": {"type": "object", "additionalProperties": _STRINGS},
            "advancedMeterGroupByFilters": {"type": "object", "additionalProperties": ref("FilterString")},
            "groupBy": {**_STRINGS, "maxItems": 100},
        },
        "additionalProperties": False,
    },
    "MeterQueryRow": {
        "type": "object", "required": ["value", "windowStart", "windowEnd", "subject", "groupBy"],
        "properties": {
            "value": {"type": "number"}, "windowStart": _TIME, "windowEnd": _TIME,
            "subject": _NULLABLE_STRING,
            "groupBy": {"type": "object", "additionalProperties": _NULLABLE_STRING},
        },
    },
    "MeterQueryResult": {
        "type": "object", "required": ["data"],
        "properties": {
            "from": _TIME, "to": _TIME,
            "windowSize": {"type": "string", "enum": ["MINUTE", "HOUR", "DAY", "MONTH"]},
            "windowTimeZone": {"type": "string"},
            "completeUntil": {**_TIME, "nullable": True, "description": (
                "meterline: every event the broker acknowledged before this instant is included "
                "(null while unknown); windows ending before it are complete")},
            "data": {"type": "array", "items": ref("MeterQueryRow")},
        },
    },
    "Event": {
        "type": "object", "required": ["id", "source", "specversion", "type", "subject"],
        "properties": {
            "id": {"type": "string"}, "source": {"type": "string"}, "specversion": {"type": "string"},
            "type": {"type": "string"}, "subject": {"type": "string"}, "time": _TIME,
            "datacontenttype": _NULLABLE_STRING, "dataschema": _NULLABLE_STRING, "data": {"nullable": True},
        },
        "additionalProperties": True,
    },
    "IngestedEvent": {
        "type": "object", "required": ["event", "ingestedAt", "storedAt"],
        "properties": {
            "event": ref("Event"), "validationError": {"type": "string"},
            "ingestedAt": _TIME, "storedAt": _TIME,
        },
    },
    "FilterTime": {
        "type": "object",
        "properties": {
            "$gt": {**_TIME, "nullable": True}, "$gte": {**_TIME, "nullable": True},
            "$lt": {**_TIME, "nullable": True}, "$lte": {**_TIME, "nullable": True},
            "$and": {"type": "array", "items": ref("FilterTime"), "nullable": True},
            "$or": {"type": "array", "items": ref("FilterTime"), "nullable": True},
        },
    },
    "EventFilter": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "id": ref("FilterString"), "source": ref("FilterString"), "subject": ref("FilterString"),
            "type": ref("FilterString"), "time": ref("FilterTime"), "ingestedAt": ref("FilterTime"),
        },
    },
    "IngestedEventCursorPaginatedResponse": {
        "type": "object", "required": ["items"],
        "properties": {"items": {"type": "array", "items": ref("IngestedEvent")}, "nextCursor": {"type": "string"}},
    },
    "SubjectUpsert": {
        "type": "object", "required": ["key"], "additionalProperties": False,
        "properties": {
            "key": {"type": "string", "minLength": 1}, "displayName": _NULLABLE_STRING,
            "metadata": {"type": "object", "nullable": True},
            "currentPeriodStart": _TIME, "currentPeriodEnd": _TIME, "stripeCustomerId": _NULLABLE_STRING,
        },
    },
    "Subject": {
        "type": "object", "required": ["id", "key", "createdAt", "updatedAt"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"},
            "key": {"type": "string"}, "displayName": _NULLABLE_STRING,
            "metadata": {"type": "object", "nullable": True}, "createdAt": _TIME, "updatedAt": _TIME,
            "currentPeriodStart": _TIME, "currentPeriodEnd": _TIME, "stripeCustomerId": _NULLABLE_STRING,
        },
    },
    "PortalToken": {
        "type": "object", "required": ["subject", "id", "expiresAt", "expired", "createdAt"],
        "properties": {
            "id": {"type": "string"}, "subject": {"type": "string"}, "expiresAt": _TIME, "expired": {"type": "boolean"},
            "createdAt": _TIME, "allowedMeterSlugs": _STRINGS, "token": {"type": "string"},
        },
    },
    "DeadLetter": {
        "type": "object", "required": ["event", "reasonCode", "reason", "receivedAt", "position"],
        "properties": {
            "event": {"type": "object"}, "meter": _NULLABLE_STRING, "reasonCode": {"type": "string"},
            "reason": {"type": "string"}, "receivedAt": _TIME,
            "position": {"type": "object", "required": ["logEpoch", "partition", "offset", "index"], "properties": {
                "logEpoch": {"type": "string"}, "partition": {"type": "integer"},
                "offset": {"type": "integer"}, "index": {"type": "integer"}}},
        },
    },
    "Meter": {  # OpenMeter's Meter; meterline's state (manager, version, rebuild) is in `annotations`
        "type": "object", "required": ["id", "slug", "aggregation", "eventType", "createdAt", "updatedAt"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"},
            "slug": {"type": "string"}, "createdAt": _TIME, "updatedAt": _TIME, "deletedAt": _TIME,
            **_METER_FIELDS,
            "annotations": {"type": "object", "additionalProperties": True, "nullable": True},
        },
    },
}


def customise(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the component schemas; drop the 422 FastAPI documents (meterline maps validation errors to 400)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, value in COMPONENTS.items():
        components.setdefault(name, value)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    return schema


drop_unreachable_422 = customise
