"""Realistic meter counts: one LLM `prompt` event read by 1, 3, 10 or 20 meters.

Real configs put many meters on one event type (an LLM product meters input, output and cached
tokens, requests and users, by model, feature and region). The first three meters are the standard
P2 workload's (`bench.workload.CONFIG`); the rest reuse a handful of value paths and groupBys the
way such configs do, so 20 meters hold 17 distinct (value path, groupBy) pairs.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.workload import MODELS, SUBJECT_RUN
from meterline.core.meters import Aggregation, Meter

METER_COUNTS = (1, 3, 10, 20)
FEATURES = ("chat", "summarise", "search", "agent", "embed")
REGIONS = ("eu-west-1", "us-east-1", "ap-south-1")

#: (slug, aggregation, valueProperty, groupBy) in the order the meter counts take them.
LIBRARY: tuple[tuple[str, str, str | None, dict[str, str]], ...] = (
    ("tokens_total", "SUM", "$.tokens", {"model": "$.model"}),
    ("prompt_count", "COUNT", None, {"model": "$.model"}),
    ("active_users", "UNIQUE_COUNT", "$.user", {}),
    ("input_tokens", "SUM", "$.input_tokens", {"model": "$.model"}),
    ("output_tokens", "SUM", "$.output_tokens", {"model": "$.model"}),
    ("cached_tokens", "SUM", "$.cached_tokens", {"model": "$.model"}),
    ("requests_by_feature", "COUNT", None, {"feature": "$.feature"}),
    ("tokens_by_feature", "SUM", "$.tokens", {"feature": "$.feature"}),
    ("latency_max", "MAX", "$.latency_ms", {"model": "$.model"}),
    ("latency_avg", "AVG", "$.latency_ms", {"model": "$.model"}),
    ("input_tokens_by_region", "SUM", "$.input_tokens", {"model": "$.model", "region": "$.region"}),
    ("output_tokens_by_region", "SUM", "$.output_tokens", {"model": "$.model", "region": "$.region"}),
    ("requests_by_status", "COUNT", None, {"model": "$.model", "status": "$.status"}),
    ("active_users_by_model", "UNIQUE_COUNT", "$.user", {"model": "$.model"}),
    ("max_input_tokens", "MAX", "$.input_tokens", {"model": "$.model"}),
    ("max_output_tokens", "MAX", "$.output_tokens", {"model": "$.model"}),
    ("latest_latency", "LATEST", "$.latency_ms", {}),
    ("requests_by_region", "COUNT", None, {"region": "$.region"}),
    ("cached_tokens_by_feature", "SUM", "$.cached_tokens", {"feature": "$.feature"}),
    ("users_by_feature", "UNIQUE_COUNT", "$.user", {"feature": "$.feature"}),
)


def meters(count: int) -> list[Meter]:
    """The first `count` meters of the library."""
    if not 1 <= count <= len(LIBRARY):
        raise ValueError(f"meter count must be 1..{len(LIBRARY)}")
    return [
        Meter(slug=slug, eventType="prompt", aggregation=Aggregation(agg), valueProperty=value, groupBy=group)
        for slug, agg, value, group in LIBRARY[:count]
    ]


def config_yaml(count: int) -> str:
    """config.yaml text for the first `count` meters."""
    lines = ["meters:"]
    for slug, agg, value, group in LIBRARY[:count]:
        lines += [f"  - slug: {slug}", "    eventType: prompt", f"    aggregation: {agg}"]
        if value:
            lines.append(f"    valueProperty: {value}")
        if group:
            lines.append("    groupBy: {" + ", ".join(f"{k}: {v}" for k, v in group.items()) + "}")
    return "\n".join(lines) + "\n"


def event(i: int, *, run: str, subjects: int, time: datetime) -> dict[str, Any]:
    """Event `i`: the standard workload's fields plus the ones the larger meter sets read."""
    inp = (i * 7919) % 1000 + 1
    out = (i * 104729) % 500
    return {
        "specversion": "1.0", "id": f"{run}-{i}", "source": "bench", "type": "prompt",
        "subject": f"customer-{(i // SUBJECT_RUN) % subjects}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "data": {
            "tokens": inp + out, "input_tokens": inp, "output_tokens": out, "cached_tokens": (i * 31) % 200,
            "model": MODELS[i % len(MODELS)], "user": f"user-{i % 997}", "feature": FEATURES[i % len(FEATURES)],
            "region": REGIONS[(i // 7) % len(REGIONS)], "status": "error" if i % 50 == 0 else "ok",
            "latency_ms": (i * 37) % 3000 + 120,
        },
    }


def events(n: int, *, subjects: int = 100, run: str | None = None, start: int = 0) -> list[dict[str, Any]]:
    run = run or uuid.uuid4().hex[:8]
    base = datetime.now(UTC) - timedelta(minutes=5)
    return [event(i, run=run, subjects=subjects, time=base + timedelta(microseconds=i)) for i in range(start, start + n)]
