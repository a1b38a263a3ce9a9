"""P6 rebuild: events/s the meter controller's rebuild replays from stored raw events into a new meter
generation, beside P2's live processing rate on the same events (docs/design.md, "Live meters").

It reuses P2's run (same size: the stored `events` table P2's worker wrote, and its live rate), then
rebuilds `tokens_total` (SUM of $.tokens by model) into a fresh generation with
`meterline.jobs.recompute.recompute`, exactly as the controller does, and checks the rebuilt generation
holds every event and the exact token sum P2 produced before the figure counts. The time until a new meter
answers exactly is this rebuild plus at most one poll interval for the workers to apply the meter
(`meter_poll_seconds`, 1 s) and one for the switch; it is reported in the details.
"""

from __future__ import annotations

import time

from bench.context import BenchContext
from bench.p2_processor import meterline_run
from bench.report import Figure
from meterline.adapters.clickhouse import connect
from meterline.core.meters import Aggregation, Meter
from meterline.jobs.recompute import recompute

GENERATION = 1_000_000_007  # far from any generation a meter definition gets (versions count from 1)
METER = Meter(slug="tokens_total", eventType="prompt", aggregation=Aggregation.SUM, valueProperty="$.tokens",
              groupBy={"model": "$.model"})


def run(ctx: BenchContext, size: int) -> list[Figure]:
    live = meterline_run(ctx, size)  # P2's run at this size (shared when P2 ran too)
    client = connect(ctx.infra.clickhouse_url, database=live["database"])
    try:
        task = ctx.task(f"P6 rebuilding tokens_total from {size:,} stored events", size)
        started = time.monotonic()
        result = recompute(client, live["database"], METER, generation=GENERATION, clear=False,
                           on_progress=lambda n: ctx.progress.advance(task, n))
        seconds = time.monotonic() - started
        ctx.done(task)
        count, tokens = client.query(
            "SELECT sum(count), sum(sum) FROM meter_windows FINAL WHERE meter = 'tokens_total'"
            " AND generation = {g:UInt64}", parameters={"g": GENERATION}).result_rows[0]
        if (result.events, int(count), int(tokens)) != (size, size, live["tokens"]):
            raise AssertionError(f"P6: rebuilt events={result.events} counted={count} tokens={tokens}, "
                                 f"expected {size}, {size}, {live['tokens']}")
    finally:
        client.close()
    rate = size / seconds
    return [Figure(
        "P6", "rebuild one meter from stored raw events", size, rate, "ev/s", live["rate"],
        "P2: the live worker on the same events (dedupe + 3 meters)",
        details={"seconds": round(seconds, 3), "window_rows": result.windows, "all_counted": True,
                 "new_meter_answers_within_s": round(seconds + 2.0, 1)},
    )]
