"""The bench workload: LLM-prompt events feeding three meters, as ingest and Kafka see them.

Every figure uses this one event shape, so ingest, processor and query are measured on the same
bytes: `type=prompt`, `data={"tokens": int, "model": str, "user": str}`, subjects `customer-<k>`.
Three meters read it (SUM tokens by model, COUNT by model, UNIQUE_COUNT users): the processor's
"3 meters per event" of issue 6.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meterline.core.events import encode_messages

EVENT_TYPE = "prompt"
#: Consecutive events share a subject in runs of this length, so a 1000-event request becomes ten
#: 100-event Kafka messages: the message size design.md's throughput argument is about.
SUBJECT_RUN = 100
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5", "llama-3")

CONFIG = """\
meters:
  - slug: tokens_total
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model}
  - slug: prompt_count
    eventType: prompt
    aggregation: COUNT
    groupBy: {model: $.model}
  - slug: active_users
    eventType: prompt
    aggregation: UNIQUE_COUNT
    valueProperty: $.user
"""


def write_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench-config.yaml"
    path.write_text(CONFIG)
    return path


def event(i: int, *, run: str, subjects: int, time: datetime | None = None, subject: str | None = None) -> dict[str, Any]:
    """Event number `i` of a run: deterministic data, unique id, time now unless given."""
    t = time or datetime.now(UTC)
    return {
        "specversion": "1.0",
        "id": f"{run}-{i}",
        "source": "bench",
        "type": EVENT_TYPE,
        "subject": subject or f"customer-{(i // SUBJECT_RUN) % subjects}",
        "time": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "data": {"tokens": (i * 7919) % 1000 + 1, "model": MODELS[i % len(MODELS)], "user": f"user-{i % 997}"},
    }


def events(n: int, *, subjects: int, run: str | None = None, start: int = 0) -> list[dict[str, Any]]:
    run = run or uuid.uuid4().hex[:8]
    base = datetime.now(UTC) - timedelta(minutes=5)
    return [
        event(i, run=run, subjects=subjects, time=base + timedelta(microseconds=i)) for i in range(start, start + n)
    ]


def requests(evs: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Cut a list of events into request bodies of `size` events."""
    for i in range(0, len(evs), size):
        yield evs[i : i + size]


def wire_messages(evs: list[dict[str, Any]], request_size: int = 1000) -> list[tuple[bytes, bytes]]:
    """The Kafka messages ingest would produce for these events sent as `request_size`-event requests."""
    out: list[tuple[bytes, bytes]] = []
    for body in requests(evs, request_size):
        out.extend(encode_messages(body))
    return out


def percentile(values: list[float], q: float) -> float:
    """Inclusive percentile (q in 0..100); exact for the sample sizes the bench uses."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)
