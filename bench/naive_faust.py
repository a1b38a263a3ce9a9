"""The P2 baseline: the textbook Faust metering agent, one table update per event.

    NAIVE_BROKER=host:port NAIVE_TOPIC=t NAIVE_EXPECTED=n NAIVE_PROGRESS=file python -m bench.naive_faust

Each Kafka message holds one event; the agent adds its tokens to a Faust table keyed by
(subject, minute), which is what Faust's own examples do (and what design.md says caps a worker near
9k ev/s). The table is in memory with its changelog topic on the broker, as Faust does by default.
The worker reports progress in NAIVE_PROGRESS (JSON: count, first, last wall-clock seconds) so the
bench can time it from outside; it neither dedupes nor writes ClickHouse, so it is a generous baseline.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import faust
import orjson

BROKER = os.environ.get("NAIVE_BROKER", "127.0.0.1:9092")
TOPIC = os.environ.get("NAIVE_TOPIC", "naive-events")
EXPECTED = int(os.environ.get("NAIVE_EXPECTED", "0"))
PROGRESS = Path(os.environ.get("NAIVE_PROGRESS", "naive-progress.json"))
PARTITIONS = int(os.environ.get("NAIVE_PARTITIONS", "4"))
REPORT_EVERY = 2000

app = faust.App(
    f"naive-{uuid.uuid4().hex[:8]}",
    broker=f"kafka://{BROKER}",
    value_serializer="raw",
    key_serializer="raw",
    store="memory://",
    datadir=os.environ.get("NAIVE_DATADIR", f"/tmp/naive-faust-{os.getpid()}"),
    topic_partitions=PARTITIONS,
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=10.0,
    broker_rebalance_timeout=10.0,
    broker_heartbeat_interval=2.0,
    web_enabled=False,
)
events_topic = app.topic(TOPIC, partitions=PARTITIONS)
usage = app.Table("usage", default=int, partitions=PARTITIONS)
progress: dict[str, Any] = {"count": 0, "first": None, "last": None}


def _report() -> None:
    tmp = PROGRESS.with_suffix(".tmp")
    tmp.write_text(json.dumps(progress))
    os.replace(tmp, PROGRESS)


@app.agent(events_topic)
async def meter(stream: Any) -> None:
    async for value in stream:
        event = orjson.loads(value)
        usage[f"{event['subject']}|{event['time'][:16]}"] += int(event["data"]["tokens"])
        now = time.time()
        if progress["first"] is None:
            progress["first"] = now
        progress["count"] += 1
        progress["last"] = now
        if progress["count"] % REPORT_EVERY == 0 or progress["count"] >= EXPECTED:
            _report()


if __name__ == "__main__":
    app.main()
