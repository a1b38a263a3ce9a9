"""OpenAPI descriptions of the query parameters that routes.py parses by hand.

routes.py reads `request.query_params` itself (for deepObject `filterGroupBy[key]` and 400-not-422
errors), so FastAPI cannot infer these parameters; they are declared here so `/openapi.json` still
describes every endpoint completely, in the shape of OpenMeter's v1 spec.
"""

from __future__ import annotations

from typing import Any

_TIME = {"type": "string", "format": "date-time"}


def _param(name: str, schema: dict[str, Any], description: str, *, explode: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema,
                            "description": description}
    if explode:
        spec.update(style="form", explode=True)
    return spec


FROM = _param("from", _TIME, "Start of the range, inclusive (RFC 3339, whole minutes).")
TO = _param("to", _TIME, "End of the range, exclusive (RFC 3339, whole minutes); defaults to now.")
LIMIT = _param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Most rows returned.")

PROBLEM = {"content": {"application/problem+json": {"schema": {"type": "object"}}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid parameter (the problem names the field)", **PROBLEM},
    503: {"description": "ClickHouse unavailable", **PROBLEM},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown meter", **PROBLEM}}

METER_QUERY = {
    "parameters": [
        FROM,
        TO,
        _param("windowSize", {"type": "string", "enum": ["MINUTE", "HOUR", "DAY", "MONTH"]},
               "Window size; omitted = one total per group over the range."),
        _param("windowTimeZone", {"type": "string", "default": "UTC"}, "IANA time zone windows align to."),
        _param("subject", {"type": "array", "items": {"type": "string"}}, "Only these subjects.", explode=True),
        _param("groupBy", {"type": "array", "items": {"type": "string"}},
               "Group by these groupBy keys of the meter, or `subject`.", explode=True),
        {
            "name": "filterGroupBy", "in": "query", "required": False, "style": "deepObject", "explode": True,
            "schema": {"type": "object", "additionalProperties": {"type": "string"}},
            "description": "filterGroupBy[key]=value keeps only rows whose group value equals value.",
        },
    ],
    "responses": {"200": {"description": "Windows", "content": {"text/csv": {"schema": {"type": "string"}}}}},
}
SUBJECTS = {"parameters": [FROM, TO]}
EVENTS = {"parameters": [FROM, TO, _param("subject", {"type": "string"}, "Only this subject."), LIMIT]}
DEAD_LETTERS = {
    "parameters": [
        FROM, TO, LIMIT,
        _param("meter", {"type": "string"}, "Only dead letters of this meter."),
        _param("reasonCode", {"type": "string"}, "e.g. value_not_numeric, too_late, unknown_type."),
    ]
}


def drop_unreachable_422(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents 422 for every validated parameter, but meterline maps validation errors to 400."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    return schema
