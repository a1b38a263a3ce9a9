"""Cluster mode: one ClickHouse shard server is killed mid-stream, and the processor with it.

Scenario 11: a 2-shard local cluster (meterline/localinfra/clickhouse_cluster.py: chdb cannot replicate,
so a node is a whole shard and losing it is the harsh version of losing a replica). While events
flow, shard 2's server is killed (SIGKILL). Inserts through the Distributed tables now fail part-way:
shard 1 may already hold a batch's rows while shard 2 refused them, and the processor retries the
whole insert (FINAL must collapse shard 1's second copy). While the shard is still down the worker is
killed -9 and started again: it must reload its partitions' dedupe keys from `events` across both
shards, which cannot succeed until shard 2 is back, and replay its unacked messages. Shard 2 then
restarts on its data dir and ports. Every window must match the oracle (0 mismatches).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meterline.localinfra.clickhouse_cluster import LocalClickHouseCluster
from meterline.localinfra.stack import LocalStack
from tests.faults.harness import (
    FAULT_CONFIG,
    MakeSender,
    Summary,
    assert_worker_alive,
    begin,
    caught_up,
    clickhouse_scalar,
    env_int,
    fault_events,
    fault_stream,
    feed_in_background,
    finish,
    wait_until,
    worker_metric,
)

pytestmark = pytest.mark.faults


def test_shard_killed_mid_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_sender: MakeSender,
                                 summary: Summary) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("CLICKHOUSE_URL", raising=False)
    outage = env_int("METERLINE_FAULT_CH_OUTAGE_SECONDS", 20)
    started, row, seed, rng = begin(summary(f"18 cluster: shard down {outage}s, worker killed"), 11)
    config = tmp_path / "config.yaml"
    config.write_text(FAULT_CONFIG)
    with LocalClickHouseCluster(tmp_path / "clickhouse", shards=2) as cluster, LocalStack(
        data_dir=tmp_path, config_file=config, processors=1, partitions=4, clickhouse_cluster=cluster,
    ) as stack:
        stream = fault_stream(seed, fault_events() // 4, rng)
        sender = make_sender(stack.url)
        feeder = feed_in_background(sender, stream, rng, over_seconds=30.0)
        wait_until(lambda: worker_metric(stack, 0, "meterline_processor_batches") > 0, "processor writing", stack)
        shard2 = cluster.nodes[1]
        shard2.kill()
        killed = time.monotonic()
        retries = worker_metric(stack, 0, "meterline_processor_write_retries")
        log = Path(stack.data_dir, "logs", "processor-0.log")

        def noticed() -> bool:
            """A write retried, or (live meters) the meter-store poll that gates every batch failed."""
            return (worker_metric(stack, 0, "meterline_processor_write_retries") > retries
                    or "meter store refresh failed" in log.read_text(errors="replace"))

        wait_until(noticed, "processor stalled on the cluster with a shard down", stack)
        stack.workers[0].kill()  # a crash while the shard is down: the restart must reload across shards
        stack.restart_processor(0)
        time.sleep(max(0.0, outage - (time.monotonic() - killed)))  # the fault's length, not a wait for an effect
        assert_worker_alive(stack, "while a shard was down")
        shard2.restart()
        feeder.join_checked(timeout=600)
        counted = caught_up(stack, sender)
        assert_worker_alive(stack, "after the shard came back")
        raw = clickhouse_scalar(stack, "SELECT count() FROM meter_windows")
        final = clickhouse_scalar(stack, "SELECT count() FROM meter_windows FINAL")
        row.note = f"2 shards; {raw - final} window row copies collapsed by FINAL"
        finish(row, stack, sender, counted, started)
