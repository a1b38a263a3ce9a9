"""The replicated cluster rendering of the schema on real ClickHouse 26.9 (chdb) with a real ZooKeeper.

Two shards × two replicas of local chdb servers share one ZooKeeper (Debian's package, see
meterline/localinfra/zookeeper.py). Each node runs `ddl(db, Topology(cluster, replicated=True,
on_cluster=False))`: ClickHouse must accept every statement, expand the `{shard}`/`{replica}` macros
from each node's config and register the two replicas of a shard under one ZooKeeper path, a different
one per shard. ALTERs are left out (a read-only replica refuses them). That is as far as chdb goes: the last test pins what it cannot do (replicate, ON CLUSTER),
which is why the pipeline tests run on shards without replicas (docs/design.md, "ClickHouse cluster mode").
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline.adapters.clickhouse import connect
from meterline.core.schema import TABLES, Topology, ddl
from meterline.localinfra import zookeeper
from meterline.localinfra.clickhouse_cluster import LocalClickHouseCluster, replica_name
from meterline.localinfra.ports import HOST

SHARDS, REPLICAS = 2, 2


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalClickHouseCluster, str]]:
    missing = zookeeper.available()
    if missing is not None:
        pytest.skip(f"ZooKeeper unavailable: {missing}")
    root: Path = tmp_path_factory.mktemp("replicated")
    database = f"meterline_{uuid.uuid4().hex[:8]}"
    with zookeeper.LocalZooKeeper(root / "zookeeper") as zk:
        assert zk.port is not None
        with LocalClickHouseCluster(root / "clickhouse", shards=SHARDS, replicas=REPLICAS,
                                    zookeeper=(HOST, zk.port)) as cluster:
            topology = Topology(cluster=cluster.name, replicated=True, on_cluster=False)
            for node in cluster.nodes:
                client = connect(node.url)
                try:
                    # ALTERs (columns added after a table shipped) are left out: a read-only replica
                    # refuses every ALTER, even ADD COLUMN IF NOT EXISTS of a column it has.
                    for statement in ddl(database, topology):
                        if not statement.startswith("ALTER"):
                            client.command(statement)
                finally:
                    client.close()
            yield cluster, database


def rows(cluster: LocalClickHouseCluster, index: int, sql: str, **parameters: Any) -> list[tuple[Any, ...]]:
    client = connect(cluster.nodes[index].url)
    try:
        return [tuple(r) for r in client.query(sql, parameters=parameters).result_rows]
    finally:
        client.close()


def test_every_replica_registers_under_its_shards_path(replicated: tuple[LocalClickHouseCluster, str]) -> None:
    cluster, database = replicated
    for index in range(len(cluster.nodes)):
        shard, replica = index // REPLICAS + 1, index % REPLICAS + 1
        got = {r[0]: r[1:] for r in rows(
            cluster, index,
            "SELECT table, zookeeper_path, replica_name, total_replicas FROM system.replicas WHERE database = {db:String}",
            db=database)}
        assert got == {
            f"{t.name}_local": (f"/clickhouse/tables/{shard}/{database}/{t.name}_local", replica_name(shard, replica),
                                REPLICAS)
            for t in TABLES
        }


def test_distributed_tables_route_by_the_sharding_key(replicated: tuple[LocalClickHouseCluster, str]) -> None:
    cluster, database = replicated
    engines = dict(rows(cluster, 0, "SELECT name, engine_full FROM system.tables WHERE database = {db:String}",
                        db=database))
    for t in TABLES:
        assert engines[t.name].startswith(f"Distributed('{cluster.name}', '{database}', '{t.name}_local', ")
        assert engines[f"{t.name}_local"].startswith("ReplicatedReplacingMergeTree(")


def test_what_chdb_cannot_do(replicated: tuple[LocalClickHouseCluster, str]) -> None:
    """Canary: if this fails, the pinned chdb learned to replicate or run ON CLUSTER, and the e2e and
    fault tests of cluster mode should add replicas (tests/e2e/test_cluster.py, tests/faults/test_cluster.py).
    """
    cluster, database = replicated
    readonly = rows(cluster, 0, "SELECT count() FROM system.replicas WHERE database = {db:String} AND is_readonly",
                    db=database)
    assert readonly == [(len(TABLES),)]  # no interserver endpoint in clickhouse-local: replicas never activate
    client = connect(cluster.nodes[0].url)
    try:
        with pytest.raises(Exception, match="Replicated DDL queries are disabled"):
            client.command(ddl(database + "_on_cluster", Topology(cluster=cluster.name))[0])
    finally:
        client.close()
