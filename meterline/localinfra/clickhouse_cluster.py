"""A sharded ClickHouse cluster of local chdb servers, for tests of cluster mode.

What fits on this machine, and why (evidence in docs/design.md, "ClickHouse cluster mode"): chdb's embedded
server reads `<remote_servers>`, `<macros>` and `<zookeeper>` from its config and runs Distributed
tables across servers, but it cannot replicate: it has no interserver HTTP endpoint (`SYSTEM START
LISTEN` accepts only TCP and HTTP in clickhouse-local) and no interserver address, so every
Replicated*MergeTree table stays read-only, and it has no distributed-DDL worker, so `ON CLUSTER` is
refused ("Replicated DDL queries are disabled"). So the local cluster is `shards` × 1 replica of plain
ReplacingMergeTree (`clickhouse_replicated: false`) with the schema created on each node by this class;
sharding, Distributed reads and writes, FINAL per shard and dedupe loads across shards run for real.

Every node gets fixed free ports chosen up front, since each node's config lists all nodes. With
`replicas` > 1 and a `zookeeper`, the replicated rendering can be created (tests/integration/
test_cluster_ddl.py checks ClickHouse accepts it and registers each replica in ZooKeeper).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Self

from meterline.localinfra.clickhouse_server import LocalClickHouse
from meterline.localinfra.ports import HOST, free_port
from meterline.localinfra.server import Started

log = logging.getLogger(__name__)

CLUSTER_NAME = "meterline_local"


def replica_name(shard: int, replica: int) -> str:
    return f"s{shard}r{replica}"


def cluster_config(name: str, tcp_ports: list[list[int]], shard: int, replica: int,
                   zookeeper: tuple[str, int] | None = None) -> str:
    """The `<remote_servers>`, `<macros>` (and `<zookeeper>`) XML of one node; shard and replica 1-based.

    `tcp_ports[s][r]` is the TCP port of replica r+1 of shard s+1.
    """
    shards = "".join(
        "<shard><internal_replication>true</internal_replication>"
        + "".join(f"<replica><host>{HOST}</host><port>{port}</port></replica>" for port in replicas)
        + "</shard>"
        for replicas in tcp_ports
    )
    xml = (
        f"\n  <remote_servers><{name}>{shards}</{name}></remote_servers>"
        f"\n  <macros><shard>{shard}</shard><replica>{replica_name(shard, replica)}</replica></macros>"
    )
    if zookeeper is not None:
        xml += f"\n  <zookeeper><node><host>{zookeeper[0]}</host><port>{zookeeper[1]}</port></node></zookeeper>"
    return xml


class LocalClickHouseCluster(Started):
    """`shards` local ClickHouse servers forming cluster `name`; node 0 is where clients connect.

    Stop it (or use it as a context manager) to stop every node by PID; nodes can be stopped and
    restarted one by one (`nodes[i].stop()` / `.restart()`) to take a shard away mid-stream.
    """

    def __init__(self, data_dir: str | Path, *, shards: int = 2, replicas: int = 1, name: str = CLUSTER_NAME,
                 zookeeper: tuple[str, int] | None = None) -> None:
        if shards < 1 or replicas < 1:
            raise ValueError("a cluster needs at least one shard of at least one replica")
        self.data_dir = Path(data_dir)
        self.name = name
        self.replicas = replicas
        ports: list[tuple[int, int]] = []
        taken: set[int] = set()
        while len(ports) < shards * replicas:
            pair = free_port(), free_port()
            if len({*pair} | taken) == len(taken) + 2:
                ports.append(pair)
                taken |= set(pair)
        tcp_ports = [[ports[s * replicas + r][1] for r in range(replicas)] for s in range(shards)]
        #: Shard-major: nodes[s * replicas + r] is replica r+1 of shard s+1.
        self.nodes = [
            LocalClickHouse(self.data_dir / replica_name(s + 1, r + 1), ports=ports[s * replicas + r],
                            extra_config=cluster_config(name, tcp_ports, s + 1, r + 1, zookeeper))
            for s in range(shards) for r in range(replicas)
        ]

    @property
    def url(self) -> str:
        """Node 0's HTTP URL (no database path), where meterline's processes connect."""
        return self.nodes[0].url

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start(attempts=1)
        except BaseException:
            self.stop()
            raise
        log.info("local ClickHouse cluster %s: %s", self.name, ", ".join(n.url for n in self.nodes))
        return self

    def stop(self) -> None:
        """Stop every node that runs (by PID); never raises for a node that is already down."""
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception:  # pragma: no cover - best effort cleanup
                log.exception("could not stop %s", node.url)

    def create_schema(self, database: str) -> None:
        """The cluster rendering of every table, created on each node (no `ON CLUSTER`: see module doc)."""
        from meterline.adapters.clickhouse import connect, create_schema
        from meterline.core.schema import Topology

        topology = Topology(cluster=self.name, replicated=False, on_cluster=False)
        for node in self.nodes:
            client = connect(node.url)
            try:
                create_schema(client, database, topology)
            finally:
                client.close()
