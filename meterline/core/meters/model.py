"""The Meter model: one meter definition, validated on construction."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from meterline.core.meters.aggregation import Aggregation
from meterline.core.meters.jsonpath import compile_path

__all__ = ["GROUP_KEY_RE", "MAX_SLUG_LENGTH", "RESERVED_GROUP_KEYS", "SLUG_RE", "Meter"]


SLUG_RE = re.compile(r"^[a-z0-9]+(?:[_-][a-z0-9]+)*$")
GROUP_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_SLUG_LENGTH = 63
RESERVED_GROUP_KEYS = frozenset({"subject"})


class Meter(BaseModel):
    """One meter definition, shaped like OpenMeter's (aliases) so config.yaml files port as-is.

    Validation runs on construction, so a Meter in memory is always usable by MeterSet.
    """

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="forbid")

    slug: str
    description: str = ""
    event_type: str = Field(alias="eventType")
    aggregation: Aggregation
    value_property: str | None = Field(default=None, alias="valueProperty", validate_default=True)
    group_by: dict[str, str] = Field(default_factory=dict, alias="groupBy")
    event_from: datetime | None = Field(default=None, alias="eventFrom")
    """Events with an earlier `time` are not metered by this meter (OpenMeter's eventFrom)."""

    @field_validator("event_from")
    @classmethod
    def _check_event_from(cls, v: datetime | None) -> datetime | None:
        if v is not None and (v.tzinfo is None or v.utcoffset() is None):
            raise ValueError("must carry a UTC offset (RFC 3339)")
        return v

    @field_validator("slug")
    @classmethod
    def _check_slug(cls, v: str) -> str:
        if len(v) > MAX_SLUG_LENGTH:
            raise ValueError(f"must be at most {MAX_SLUG_LENGTH} characters (got {len(v)})")
        if SLUG_RE.match(v) is None:
            raise ValueError(
                f"{v!r} must match {SLUG_RE.pattern} (lowercase letters and digits "
                "separated by single '_' or '-')"
            )
        return v

    @field_validator("description", mode="before")
    @classmethod
    def _none_description(cls, v: Any) -> Any:
        return "" if v is None else v

    @field_validator("event_type")
    @classmethod
    def _check_event_type(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v

    @field_validator("aggregation", mode="before")
    @classmethod
    def _check_aggregation(cls, v: Any) -> Any:
        if isinstance(v, Aggregation):
            return v
        if not isinstance(v, str) or v not in Aggregation.__members__:
            valid = ", ".join(a.value for a in Aggregation)
            raise ValueError(f"unknown aggregation {v!r}; valid: {valid}")
        return Aggregation(v)

    @field_validator("value_property")
    @classmethod
    def _check_value_property(cls, v: str | None, info: ValidationInfo) -> str | None:
        agg = info.data.get("aggregation")
        if agg is Aggregation.COUNT and v is not None:
            raise ValueError("must not be set for COUNT (COUNT counts events)")
        if agg is not None and agg is not Aggregation.COUNT and v is None:
            raise ValueError(f"is required for {agg.value}")
        if v is not None:
            compile_path(v)  # raises ValueError with the parser's message
        return v

    @field_validator("group_by", mode="before")
    @classmethod
    def _none_group_by(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("group_by")
    @classmethod
    def _check_group_by(cls, v: dict[str, str]) -> dict[str, str]:
        problems: list[str] = []
        for key, path in v.items():
            if key in RESERVED_GROUP_KEYS:
                problems.append(f"key {key!r} is reserved")
            elif GROUP_KEY_RE.match(key) is None:
                problems.append(f"key {key!r} must match {GROUP_KEY_RE.pattern}")
            try:
                compile_path(path)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return v
