"""deploy/compose.cluster.yaml agrees with itself and with meterline's cluster mode.

No Docker here, so the checks read the files: every ClickHouse node is listed once in the cluster
with the shard its macros name, (shard, replica) pairs are unique, the keeper the nodes use is the
keeper service, and the meterline services name that cluster in a variable Settings reads.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from meterline.core.schema import REPLICA_NAME, REPLICA_PATH, Topology
from meterline.settings import Settings
from tests.unit.test_deploy import COMPOSE, ROOT, env_names

DEPLOY = ROOT / "deploy"
OVERRIDE = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
SERVICES: dict[str, Any] = OVERRIDE["services"]
CLUSTER_XML = ET.parse(DEPLOY / "clickhouse-cluster" / "cluster.xml").getroot()
KEEPER_XML = ET.parse(DEPLOY / "clickhouse-cluster" / "keeper.xml").getroot()
NODES = sorted(name for name, svc in SERVICES.items() if "CLICKHOUSE_SHARD" in svc.get("environment", {}))
MOUNT = "/etc/clickhouse-server/config.d/"


def cluster_shards() -> tuple[str, list[list[str]]]:
    servers = CLUSTER_XML.find("remote_servers")
    assert servers is not None
    (cluster,) = list(servers)
    shards = [[str(r.findtext("host")) for r in shard.findall("replica")] for shard in cluster.findall("shard")]
    return cluster.tag, shards


def test_every_node_is_in_the_cluster_once_under_its_macros_shard() -> None:
    _, shards = cluster_shards()
    listed = [host for shard in shards for host in shard]
    assert sorted(listed) == NODES and len(set(listed)) == len(listed)
    assert len(shards) >= 2 and all(len(s) >= 2 for s in shards), "2 shards x 2 replicas at least"
    macros = {(SERVICES[n]["environment"]["CLICKHOUSE_SHARD"], SERVICES[n]["environment"]["CLICKHOUSE_REPLICA"])
              for n in NODES}
    assert len(macros) == len(NODES), "a (shard, replica) pair used twice would share a replica path"
    for number, shard in enumerate(shards, start=1):
        for host in shard:
            env = SERVICES[host]["environment"]
            assert env["CLICKHOUSE_SHARD"] == str(number) and env["CLICKHOUSE_REPLICA"] == host
            assert SERVICES[host]["hostname"] == host, "the interserver host must resolve to this node"
            assert any(m.endswith(MOUNT + "meterline-cluster.xml:ro") for m in SERVICES[host]["volumes"])


def test_macros_cover_what_the_replicated_engine_uses() -> None:
    section = CLUSTER_XML.find("macros")
    assert section is not None
    macros = {child.tag: child.get("from_env") for child in section}
    used = set(re.findall(r"\{(\w+)\}", REPLICA_PATH + REPLICA_NAME)) - {"database", "table"}  # ClickHouse's own
    assert used == {"shard", "replica"} and used <= set(macros) and all(macros.values())


def test_nodes_use_the_keeper_service() -> None:
    node = CLUSTER_XML.find("zookeeper/node")
    assert node is not None
    assert node.findtext("host") in SERVICES and SERVICES[str(node.findtext("host"))]["image"].startswith(
        "clickhouse/clickhouse-keeper")
    assert node.findtext("port") == KEEPER_XML.findtext("keeper_server/tcp_port")
    probe = " ".join(SERVICES["keeper"]["healthcheck"]["test"])
    assert f"localhost:{KEEPER_XML.findtext('http_control/port')}{KEEPER_XML.findtext('http_control/readiness/endpoint')}" in probe
    assert CLUSTER_XML.find("distributed_ddl/path") is not None, "ON CLUSTER needs the DDL queue"


@pytest.mark.parametrize("service", ["ingest", "processor", "query"])
def test_meterline_services_run_in_cluster_mode(service: str, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    env = {k: str(v) for k, v in SERVICES[service]["environment"].items()}
    assert set(env) <= env_names()
    assert set(COMPOSE["services"][service]["environment"]) <= set(env), "the override keeps every base variable"
    for name in list(os.environ):
        if name.startswith("METERLINE_") or name in ("KAFKA_BOOTSTRAP", "CLICKHOUSE_URL"):
            monkeypatch.delenv(name)
    for k, v in env.items():
        if v.startswith("/run/secrets/"):  # compose mounts the secret there; here a local file stands in
            (tmp_path / v.removeprefix("/run/secrets/")).write_text("a-secret-0123456789-0123456789-0123\n")
            v = str(tmp_path / v.removeprefix("/run/secrets/"))
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("METERLINE_CONFIG", str(ROOT / "config.yaml"))
    name, _ = cluster_shards()
    settings = Settings()
    assert settings.clickhouse_topology == Topology(cluster=name, replicated=True)
    host = urlsplit(str(settings.clickhouse_url)).hostname
    assert host in NODES


def test_every_mounted_file_exists() -> None:
    for svc in SERVICES.values():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), source
