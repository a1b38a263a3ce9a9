"""P5 memory: the processor's resident memory after N distinct event ids inside the dedupe horizon.

The worker meters N fresh events (the P2 run, every event accounted for), then its RSS and peak RSS
are read from /proc. The baseline is what naive in-memory dedupe costs: a Python process holding the
same N 16-byte blake2b keys in a `set` (the dedupe key of design.md), measured the same way. Sizes above `METER_MAX` (and `--p5-reload`) measure a worker reloading N ids
generated in ClickHouse instead (bench/p5_reload.py).
"""

from __future__ import annotations

import subprocess
import sys

from bench.context import BenchContext
from bench.p2_processor import meterline_run
from bench.report import Figure

TARGET_BYTES = 1024**3
MB = 1024**2

_NAIVE_SET = """
import hashlib, sys
n = int(sys.argv[1])
keys = {hashlib.blake2b(b"bench\\x00%d" % i, digest_size=16).digest() for i in range(n)}
status = open("/proc/self/status").read()
print(next(int(l.split()[1]) * 1024 for l in status.splitlines() if l.startswith("VmRSS")), len(keys))
"""


def naive_set_rss(n: int) -> int:
    out = subprocess.run([sys.executable, "-c", _NAIVE_SET, str(n)], check=True, capture_output=True, text=True)
    rss, count = (int(x) for x in out.stdout.split())
    assert count == n
    return rss


#: Above this many ids P5 is measured by `bench.p5_reload` (a worker loading N generated ids) instead of
#: metering N events through Kafka: 100M events through a worker take hours on two cores.
METER_MAX = 20_000_000


def run(ctx: BenchContext, size: int) -> list[Figure]:
    if size > int(ctx.options.get("p5_meter_max", METER_MAX)):
        from bench import p5_reload

        return p5_reload.run(ctx, size)
    mine = meterline_run(ctx, size, label="P5 meterline")
    task = ctx.task(f"P5 naive: Python set of {size:,} dedupe keys", None)
    baseline = naive_set_rss(size)
    ctx.done(task)
    peak = mine["peak_rss_bytes"]
    return [Figure(
        "P5", "processor peak RSS, N distinct ids in horizon", size, peak / MB, "MB", baseline / MB,
        "Python set of N 16-byte dedupe keys (in-memory dedupe)", higher_is_better=False,
        target="<= 1024 MB", passed=peak <= TARGET_BYTES,
        details={"rss_bytes": mine["rss_bytes"], "peak_rss_bytes": peak, "idle_rss_bytes": mine["idle_rss_bytes"],
                 "naive_set_rss_bytes": baseline, "all_counted": mine["all_counted"], "rate": mine["rate"]},
    )]
