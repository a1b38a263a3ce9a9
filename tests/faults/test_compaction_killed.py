"""Scenario 16: windows compaction killed (-9) at every step; answers stay exact during and after it.

A month-crossing history is written the way workers write it (tests/windows_history.py) into a stack's
ClickHouse, with every topic partition complete until now, so both months are closed. A compaction runs
in a subprocess and stops at one step (claimed, staged, swapping, swapped, coarse-swapped: between the swap
of the minute rows and of the 15-minute rows, then published: the month marked valid for its fingerprint,
before the done record that lets queries read them);
while it holds, and after it is killed -9 there, every HOUR window of every meter is compared with the
oracle through the query API (which reads coarse rows only for a month whose done record it has read).
After the kills at and after `swapping` a worker replays messages through the processor's sink: the
fence makes it wait out the dead compactor's lease, then the recorded watermarks drop every replayed row.
A last run finishes the job; the answers are compared again and every key has one row.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meterline.adapters.clickhouse import connect
from meterline.adapters.compactions import ReplayGuard, read_claims
from meterline.adapters.meter_store import MeterCatalog, MeterStore
from meterline.core.compaction import in_progress
from meterline.jobs.compaction import active_generations, compact
from meterline.localinfra.ports import wait_for
from meterline.localinfra.stack import LocalStack
from processor.sink import ClickHouseSink
from query.coarse import CoarseMonths
from tests import windows_history as history
from tests.faults.harness import METERS, ScenarioRow, begin, compare
from tests.oracle import EventFactory, first_sightings

pytestmark = pytest.mark.faults

START = datetime(2024, 1, 31, 21, tzinfo=UTC)
FROM, TO = START - timedelta(days=1), START + timedelta(days=1)
LEASE = 3.0  # seconds: a killed compactor's claim goes stale quickly

COMPACTOR = textwrap.dedent("""
    import sys, time
    from datetime import timedelta
    from meterline.adapters.clickhouse import connect
    from meterline.adapters.meter_store import MeterCatalog, MeterStore
    from meterline.jobs.compaction import active_generations, compact

    url, database, topic, stop_at, lease = sys.argv[1:6]
    client = connect(url, database=database)
    catalog = MeterCatalog(MeterStore(client, database))
    catalog.refresh(force=True)

    def step(partition, name):
        print(partition, name, flush=True)
        if name == stop_at:
            time.sleep(600)  # killed here

    compact(client, database, active_generations(catalog), late_horizon_days=1, margin=timedelta(hours=1),
            topic=topic, topic_partitions=2, lease_seconds=float(lease), step=step)
""")


def test_compaction_killed_at_every_step(make_stack: Callable[..., LocalStack], tmp_path: Path,
                                         summary: Callable[[str], ScenarioRow]) -> None:
    started, row, seed, _ = begin(summary("16 windows compaction: kill -9 at every step"), 16)
    stack = make_stack(processors=0, partitions=history.PARTITIONS)
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    catalog = MeterCatalog(MeterStore(client, str(stack.database)))
    catalog.refresh(force=True)
    generations = set(active_generations(catalog).values())
    assert len(generations) == 1, generations  # every config meter is at its first generation
    factory = EventFactory(seed=seed, start=START, span=timedelta(hours=6))
    events = [factory.event() for _ in range(4000)]
    events += events[:300]  # resent: duplicates
    counted = first_sightings(events)
    batch = history.messages(events)
    history.write(client, str(stack.database), history.rows_of(batch, list(METERS.values()), generations.pop()))
    history.mark_complete(client, str(stack.database), topic=str(stack.topic))
    rows_before = history.window_rows(client, str(stack.database))
    script = tmp_path / "compactor.py"
    script.write_text(COMPACTOR)

    def exact(when: str) -> None:
        comparison = compare(stack, counted, start=FROM, end=TO)
        row.windows_checked += comparison.windows
        assert not comparison.mismatches, f"{when}: {comparison.mismatches[:10]}"

    def replay(messages: int) -> int:
        guard = ReplayGuard(str(stack.database), timedelta(days=1), timedelta(hours=1), "replayer",
                            lease_seconds=LEASE)
        sink = ClickHouseSink(str(stack.clickhouse_url), str(stack.database), replay_guard=guard, backoff_max=1.0)
        try:
            sink.write_sync(history.rows_of(batch[:messages], list(METERS.values()), min(active_generations(catalog).values())))
        finally:
            sink.stop()
        return guard.dropped

    exact("before")
    dropped = 0
    for stop_at in ("claimed", "staged", "swapping", "swapped", "coarse-swapped", "published"):
        # The compactor killed last time holds its claim until the lease runs out: a run started before
        # that aborts ("compaction ... is in progress") and never reaches `stop_at`.
        wait_for(lambda: not in_progress(read_claims(client, str(stack.database)), LEASE), 60,
                 "the killed compactor's claim to go stale")
        proc = subprocess.Popen([sys.executable, str(script), str(stack.clickhouse_url), str(stack.database),
                                 str(stack.topic), stop_at, str(LEASE)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.split()[-1] == stop_at:
                    break
            else:
                raise AssertionError(f"the compactor ended before {stop_at}: rc {proc.wait()}")
            exact(f"during compaction, held at {stop_at}")
        finally:
            proc.kill()  # SIGKILL
            proc.wait()
        exact(f"after kill -9 at {stop_at}")
        if stop_at in ("swapping", "swapped", "coarse-swapped", "published"):
            dropped += replay(20)
            exact(f"after a replay following kill -9 at {stop_at}")
    assert dropped > 0

    catalog.refresh(force=True)
    report = compact(client, str(stack.database), active_generations(catalog), late_horizon_days=1,
                     margin=timedelta(hours=1), topic=str(stack.topic), topic_partitions=history.PARTITIONS,
                     lease_seconds=LEASE)
    assert {r.outcome for r in report.partitions} <= {"compacted", "nothing to merge"}, report
    time.sleep(2 * CoarseMonths().refresh_seconds)  # the API process reads the new done records (in the background)
    exact("after the last run")
    keys = client.query("SELECT count(), uniqExact(meter, subject, window_start, group_key, generation, namespace)"
                        " FROM meter_windows FINAL").result_rows[0]
    assert keys[0] == keys[1] < rows_before
    client.close()
    row.accepted = len(events)
    row.duplicates_dropped = len(events) - len(counted)
    row.mismatches = 0
    row.seconds = round(time.monotonic() - started, 1)
    row.note = f"{rows_before} -> {keys[0]} window rows; {dropped} replayed rows dropped"
