"""Live meters under faults (docs/design.md, "Live meters").

Scenario 13: a meter is created after METERLINE_FAULT_LIVE_EVENTS (default 50k) events were ingested,
while more events stream in; in the middle of its rebuild the processor worker AND the HTTP server
(whose meter controller runs the rebuild) are killed with SIGKILL and restarted. The rebuild resumes,
the meter switches, and every HOUR window of it equals the oracle (as do the other meters').
"""

from __future__ import annotations

import time

import httpx
import pytest

from meterline.localinfra.ports import wait_for
from meterline.localinfra.stack import LocalStack
from tests.faults.harness import (
    METERS,
    MakeSender,
    MakeStack,
    Summary,
    begin,
    caught_up,
    clickhouse_scalar,
    env_int,
    fault_stream,
    feed_in_background,
    settle,
)
from tests.oracle import config_yaml

pytestmark = pytest.mark.faults

NEW = METERS["tokens_total"]
CONFIG = config_yaml(m for slug, m in METERS.items() if slug != NEW.slug)


def rebuild_running(stack: LocalStack) -> bool:
    """The controller is replaying stored events into the new meter's generation right now."""
    state = clickhouse_scalar(stack, f"SELECT argMax(state, updated_at) FROM meter_rebuilds WHERE slug = '{NEW.slug}'")
    return state == "running"


def test_kill_9_mid_rebuild_of_a_new_meter(make_stack: MakeStack, make_sender: MakeSender,
                                           summary: Summary) -> None:
    n = env_int("METERLINE_FAULT_LIVE_EVENTS", 50_000)
    started, row, seed, rng = begin(summary(f"19 new meter over {n // 1000}k stored events, kill -9 mid-rebuild"), 13)
    stack = make_stack(processors=1, config=CONFIG)
    sender = make_sender(stack.url)
    sender.send_all(fault_stream(seed, n, rng), rng)
    caught_up(stack, sender)

    # More events arrive during the whole rebuild; then create the meter and kill both processes mid-way.
    more = fault_stream(seed + 1, n // 10, rng)
    feeder = feed_in_background(sender, more, rng, over_seconds=30.0)
    r = httpx.post(f"{stack.url}/api/v1/meters", timeout=10, json={
        "slug": NEW.slug, "eventType": NEW.event_type, "aggregation": NEW.aggregation,
        "valueProperty": f"$.{NEW.value_field}", "groupBy": {g: f"$.{g}" for g in NEW.group_fields}})
    assert r.status_code == 201, r.text
    wait_for(lambda: rebuild_running(stack), 120, "the rebuild to start")
    time.sleep(rng.uniform(0.0, 0.3))
    assert stack.server is not None
    stack.server.kill()
    stack.workers[0].kill()
    killed_while = "running" if rebuild_running(stack) else "finished or not yet switched"
    stack.restart_processor(0)
    stack.restart_server()
    wait_for(stack._healthy, 60, "the restarted HTTP server")
    feeder.join_checked(timeout=600)

    deadline = time.monotonic() + 300
    while True:
        stack.assert_running()
        resp = httpx.get(f"{stack.url}/api/v1/meters/{NEW.slug}", timeout=10)
        if resp.status_code == 200 and resp.json()["annotations"]["meterline.state"] == "ready":
            break
        assert time.monotonic() < deadline, f"the rebuild did not complete: {resp.text}"
        time.sleep(0.5)
    row.note = f"killed while {killed_while}"
    settle(row, stack, sender, started)
