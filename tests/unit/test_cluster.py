"""Insert tokens and the per-topology settings of processor writes and exact reads."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from meterline.core.cluster import exact_read_settings, insert_settings, insert_token
from meterline.core.schema import SINGLE_NODE, Topology

positions = st.lists(st.tuples(st.text(max_size=8), st.integers(0, 2**31), st.integers(0, 2**63)), max_size=20)


@given(positions)
def test_token_ignores_order_and_repeats(batch: list[tuple[str, int, int]]) -> None:
    """A retried batch may list its rows in another order; one message has many rows."""
    shuffled = batch * 2
    random.Random(0).shuffle(shuffled)
    assert insert_token("events", batch) == insert_token("events", shuffled)


@given(positions, positions)
def test_different_batches_get_different_tokens(a: list[tuple[str, int, int]], b: list[tuple[str, int, int]]) -> None:
    assert (insert_token("events", a) == insert_token("events", b)) == (set(a) == set(b))


def test_token_depends_on_table_and_salt() -> None:
    """Same positions, other table or other config (meters): another token, or ClickHouse would drop
    the block as a duplicate of rows that differ."""
    batch = [("epoch", 1, 10)]
    tokens = {insert_token(t, batch, s) for t in ("events", "meter_windows") for s in ("", "a", "b")}
    assert len(tokens) == 6
    # length prefixes: moving characters between table and salt never collides
    assert insert_token("ab", batch, "c") != insert_token("a", batch, "bc")
    assert insert_token("events", [("e1", 1, 10)]) != insert_token("events", [("e", 11, 10)])


def test_settings_per_topology() -> None:
    assert insert_settings(SINGLE_NODE, "t") == {}
    assert exact_read_settings(SINGLE_NODE) == {}
    replicated = Topology(cluster="c")
    assert insert_settings(replicated, "t") == {
        "insert_deduplicate": 1, "insert_deduplication_token": "t", "insert_quorum": "auto"}
    assert exact_read_settings(replicated) == {"select_sequential_consistency": 1}
    shards = Topology(cluster="c", replicated=False)
    assert insert_settings(shards, "t") == {"insert_deduplicate": 1, "insert_deduplication_token": "t"}
    assert insert_settings(shards, None) == {"insert_deduplicate": 1}
    assert exact_read_settings(shards) == {}


def test_meter_store_forgets_a_worker_on_every_shard() -> None:
    """A Distributed table refuses DELETE: a cluster deletes from the local tables ON CLUSTER."""
    from meterline.adapters.meter_store import MeterStore

    class Recorder:
        def __init__(self) -> None:
            self.sql: list[str] = []

        def command(self, sql: str, parameters: object = None, settings: object = None) -> None:
            self.sql.append(sql)

    single, cluster = Recorder(), Recorder()
    MeterStore(single, "db").forget_worker("w")  # type: ignore[arg-type]
    MeterStore(cluster, "db", topology=Topology(cluster="c")).forget_worker("w")  # type: ignore[arg-type]
    assert single.sql == ["DELETE FROM `db`.meter_workers WHERE worker = {w:String}"]
    assert cluster.sql == ["DELETE FROM `db`.meter_workers_local ON CLUSTER `c` WHERE worker = {w:String}"]
