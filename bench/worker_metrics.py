"""Where a worker's time went: its stage histograms (processor/metrics.py), read from `/metrics`, and the
CPU per event of the processes around it (from /proc).

P2 (throughput) and P4 (freshness) report these beside their figures, so "where the time goes" in
the README comes from the same run as the numbers, not from a separate profile.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from meterline.localinfra.process import ManagedProcess

STAGES = {
    "meterline_processor_batch_wait_seconds": "batch wait (fetch + processor_batch_seconds)",
    "meterline_processor_message_age_seconds": "message age at batch start (linger, broker, fetch, batch wait)",
    "meterline_processor_build_seconds": "build (decode, dedupe, meters, rows)",
    "meterline_processor_dedupe_flush_seconds": "dedupe flush (RocksDB write)",
    "meterline_processor_write_seconds": "ClickHouse inserts (events, dead letters, windows)",
    "meterline_processor_write_wait_seconds": "wait for the previous batch's write after deciding (not hidden)",
}


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far, from /proc (None: no such local process)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_us_per_event(before: dict[str, float | None], after: dict[str, float | None], events: int
                     ) -> dict[str, float | None]:
    """Per process name, CPU microseconds per event between two `cpu_seconds` readings."""
    out: dict[str, float | None] = {}
    for name, start in before.items():
        end = after.get(name)
        out[name] = None if start is None or end is None or events <= 0 else round((end - start) / events * 1e6, 2)
    return out


def web_port(worker: ManagedProcess) -> int:
    """The `--web-port` a LocalStack worker was started with."""
    return int(worker.argv[worker.argv.index("--web-port") + 1])


def stages(worker: ManagedProcess) -> dict[str, Any]:
    """Per stage: count, total seconds, mean and an upper bound of the 50th/99th percentile (bucket edges)."""
    text = httpx.get(f"http://127.0.0.1:{web_port(worker)}/metrics", timeout=10).text
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in STAGES:
            continue
        total = count = 0.0
        buckets: list[tuple[float, float]] = []
        for s in family.samples:
            if s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))

        def quantile(q: float, buckets: list[tuple[float, float]] = buckets, count: float = count) -> float | None:
            return next((le for le, c in sorted(buckets) if count and c >= q * count), None)

        out[family.name.removesuffix("_seconds")] = {
            "what": STAGES[family.name], "count": count, "seconds": round(total, 3),
            "mean_ms": round(1000 * total / count, 2) if count else None,
            "p50_le_ms": _ms(quantile(0.5)), "p99_le_ms": _ms(quantile(0.99)),
        }
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
