"""A sharded ClickHouse cluster of local chdb servers, for tests of cluster mode.

What fits on this machine, and why (evidence in docs/design.md, "ClickHouse cluster mode"): chdb's embedded
server reads `<remote_servers>`, `<macros>` and `<zookeeper>` from its config and runs Distributed
tables across servers, but it cannot replicate: it has no interserver HTTP endpoint (`SYSTEM START
LISTEN` accepts only TCP and HTTP in clickhouse-local) and no interserver address, so every
Replicated*MergeTree table stays read-only, and it has no distributed-DDL worker, so `ON CLUSTER` is
refused ("Replicated DDL queries are disabled"). So the local cluster is `shards` × 1 replica of plain
ReplacingMergeTree (`clickhouse_replicated: false`) with the schema created on each node by this class;
sharding, Distributed reads and writes, FINAL per shard and dedupe loads across shards run for real.

Every node gets fixed free ports chosen up front, since each node's config lists all nodes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Self

from meterline.localinfra.clickhouse_server import LocalClickHouse
from meterline.localinfra.ports import HOST, free_port

log = logging.getLogger(__name__)

CLUSTER_NAME = "meterline_local"


def cluster_config(name: str, shard_tcp_ports: list[int], shard: int) -> str:
    """The `<remote_servers>` and `<macros>` XML of the node serving shard number `shard` (1-based)."""
    shards = "".join(
        f"<shard><replica><host>{HOST}</host><port>{port}</port></replica></shard>" for port in shard_tcp_ports
    )
    return (
        f"\n  <remote_servers><{name}>{shards}</{name}></remote_servers>"
        f"\n  <macros><shard>{shard}</shard><replica>r1</replica></macros>"
    )


class LocalClickHouseCluster:
    """`shards` local ClickHouse servers forming cluster `name`; node 0 is where clients connect.

    Stop it (or use it as a context manager) to stop every node by PID; nodes can be stopped and
    restarted one by one (`nodes[i].stop()` / `.restart()`) to take a shard away mid-stream.
    """

    def __init__(self, data_dir: str | Path, *, shards: int = 2, name: str = CLUSTER_NAME) -> None:
        if shards < 1:
            raise ValueError("a cluster needs at least one shard")
        self.data_dir = Path(data_dir)
        self.name = name
        ports: list[tuple[int, int]] = []
        taken: set[int] = set()
        while len(ports) < shards:
            pair = free_port(), free_port()
            if len({*pair} | taken) == len(taken) + 2:
                ports.append(pair)
                taken |= set(pair)
        tcp_ports = [tcp for _, tcp in ports]
        self.nodes = [
            LocalClickHouse(self.data_dir / f"shard{i + 1}", ports=ports[i],
                            extra_config=cluster_config(name, tcp_ports, i + 1))
            for i in range(shards)
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

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
