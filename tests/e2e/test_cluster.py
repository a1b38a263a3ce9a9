"""The whole pipeline on a sharded ClickHouse cluster (cluster mode), against the oracle.

Two local chdb servers form cluster `meterline_local` (2 shards × 1 replica: chdb cannot replicate, see
meterline/localinfra/clickhouse_cluster.py); every meterline process runs with `clickhouse_cluster` set,
so it writes and reads through the Distributed tables. Events (with resent duplicates) go in over HTTP,
two processor workers share the partitions (the second one joins mid-stream, so partitions move and
dedupe state is loaded from `events` across both shards), and every window of every meter is compared
with tests/oracle.py. Then the rows themselves: both shards hold data, each subject lives on exactly
one shard, and the Distributed answer equals the sum of the shards' own FINAL answers. Last, two
namespaces' keys on the same cluster: each reads only its own rows through the Distributed tables.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.adapters.clickhouse import connect
from meterline.localinfra.clickhouse_cluster import LocalClickHouseCluster
from meterline.localinfra.ports import wait_for
from meterline.localinfra.stack import LocalStack
from tests.e2e.conftest import METERS
from tests.e2e.test_pipeline import END, START, query, wait_until_counted, windows_and_oracle
from tests.faults.harness import wait_owners, worker_metric
from tests.oracle import (
    EventFactory,
    OracleMeter,
    config_yaml,
    expected,
    first_sightings,
    meter_body,
    response_windows,
)
from tests.tenants import create_meters

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("cluster")
    config = root / "config.yaml"
    config.write_text(config_yaml(METERS.values()))
    with LocalClickHouseCluster(root / "clickhouse", shards=2) as cluster, LocalStack(
        data_dir=root, config_file=config, processors=1, partitions=4, kafka_bootstrap=kafka_bootstrap,
        clickhouse_cluster=cluster,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def cluster_sent(cluster_stack: LocalStack) -> list[dict[str, Any]]:
    """~2000 events (10% resent later), a second worker joining halfway; all that got 204."""
    factory = EventFactory(seed=23, start=START, span=timedelta(hours=5))
    fresh = [factory.event(invalid_rate=0.03) for _ in range(1800)]
    rng = random.Random(5)
    stream = fresh + [dict(e) for e in rng.sample(fresh, 200)]
    accepted: list[dict[str, Any]] = []
    with httpx.Client(base_url=cluster_stack.url, timeout=30) as client:
        i = 0
        while i < len(stream):
            if len(cluster_stack.workers) == 1 and i >= len(stream) // 2:
                cluster_stack.add_processor()  # rebalance: partitions move, their dedupe keys are reloaded
                # The rest only once both own partitions: sent at once, it could all be processed by the
                # first worker before the second joined, and the moved partitions would see no resend.
                wait_owners(cluster_stack, [0, 1], cluster_stack.partitions)
            chunk = stream[i : i + rng.randrange(20, 200)]
            resp = client.post("/api/v1/events", json=chunk, headers={"content-type": "application/json"})
            assert resp.status_code == 204, resp.text
            accepted.extend(chunk)
            i += len(chunk)
    wait_until_counted(cluster_stack, first_sightings(accepted))
    return accepted


def shard_clients(stack: LocalStack) -> list[Any]:
    cluster = stack.clickhouse_cluster
    assert cluster is not None
    return [connect(node.url, database=str(stack.database)) for node in cluster.nodes]


@pytest.mark.parametrize("slug", sorted(s for s, m in METERS.items() if m.event_type != "big"))  # big: test_exact_decimals
@pytest.mark.parametrize("window", ["HOUR", "MINUTE", None])
def test_every_window_matches_the_oracle_on_a_cluster(cluster_stack: LocalStack, cluster_sent: list[dict[str, Any]],
                                                      slug: str, window: str | None) -> None:
    got, want = windows_and_oracle(cluster_stack, cluster_sent, slug, window)
    assert want and got == want


def test_rows_are_sharded_by_subject(cluster_stack: LocalStack, cluster_sent: list[dict[str, Any]]) -> None:
    """Each shard holds some subjects and no subject is on two shards: FINAL per shard is exact."""
    clients = shard_clients(cluster_stack)
    try:
        for table in ("events", "meter_windows"):
            subjects = [{r[0] for r in c.query(f"SELECT DISTINCT subject FROM {table}_local").result_rows}
                        for c in clients]
            assert all(subjects), (table, subjects)  # both shards hold data
            assert not subjects[0] & subjects[1], (table, subjects[0] & subjects[1])
            everywhere = {r[0] for r in clients[0].query(f"SELECT DISTINCT subject FROM {table}").result_rows}
            assert everywhere == subjects[0] | subjects[1]
        stored = {(e["source"], e["id"]) for e in first_sightings(cluster_sent)}
        per_shard = [int(c.query("SELECT count() FROM events_local FINAL").result_rows[0][0]) for c in clients]
        through = int(clients[0].query("SELECT count() FROM events FINAL").result_rows[0][0])
        assert through == sum(per_shard) == len(stored)
    finally:
        for c in clients:
            c.close()


def test_the_second_worker_took_partitions(cluster_stack: LocalStack, cluster_sent: list[dict[str, Any]]) -> None:
    """The rebalance really happened, so a worker loaded dedupe keys of moved partitions across shards."""
    assert len(cluster_stack.workers) == 2 and all(w.running for w in cluster_stack.workers)
    wait_owners(cluster_stack, [0, 1], cluster_stack.partitions)
    assert worker_metric(cluster_stack, 1, "meterline_processor_batches") > 0


def test_any_second_is_exact_on_a_cluster(cluster_stack: LocalStack, cluster_sent: list[dict[str, Any]]) -> None:
    """from/to inside a minute: the edge minutes are read from raw events, whose subject filter is a
    subquery over the windows (two Distributed tables: it must be a GLOBAL IN on a cluster)."""
    start, end = START + timedelta(minutes=7, seconds=15), START + timedelta(hours=2, minutes=3, seconds=41)
    for slug in ("tokens_total", "active_users", "storage_latest"):
        meter = METERS[slug]
        group_by = list(meter.group_fields)
        body = query(cluster_stack, slug, **{"from": start.isoformat(), "to": end.isoformat(),
                                             "windowSize": "MINUTE", "groupBy": ["subject", *group_by]})
        want = expected(first_sightings(cluster_sent), meter, start=start, end=end, window="MINUTE",
                        group_by=group_by)
        assert want and response_windows(body, group_by) == want, slug


def test_a_changed_meter_drops_its_old_generation_on_every_shard(cluster_stack: LocalStack,
                                                                  cluster_sent: list[dict[str, Any]]) -> None:
    """Live meters on a cluster: a meter created through the API is built from the stored events of both
    shards; a change rebuilds it, and the old generation's rows go from every shard's local table (the
    embedded cluster has no ON CLUSTER, so the controller must delete node by node)."""
    old = OracleMeter("cluster_tokens", "prompt", "SUM", "tokens", ("model",))
    new = OracleMeter("cluster_tokens", "prompt", "MAX", "tokens", ("type",))
    url = cluster_stack.url
    created = httpx.post(f"{url}/api/v1/meters", json={
        "slug": old.slug, "eventType": old.event_type, "aggregation": old.aggregation,
        "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}}, timeout=30)
    assert created.status_code == 201, created.text

    def state() -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{url}/api/v1/meters/{old.slug}", timeout=10).json()["annotations"]
        return body

    def answer(meter: OracleMeter) -> tuple[dict[Any, Any], dict[Any, Any]]:
        group_by = list(meter.group_fields)
        body = query(cluster_stack, meter.slug, **{"from": START.isoformat(), "to": END.isoformat(),
                                                  "windowSize": "HOUR", "groupBy": ["subject", *group_by]})
        want = expected(first_sightings(cluster_sent), meter, start=START, end=END, window="HOUR", group_by=group_by)
        return response_windows(body, group_by), want

    wait_for(lambda: state()["meterline.state"] == "ready", 120, "the new meter built from both shards")
    got, want = answer(old)
    assert want and got == want
    changed = httpx.put(f"{url}/api/v1/meters/{old.slug}", json={"aggregation": "MAX", "groupBy": {"type": "$.type"}},
                        timeout=30)
    assert changed.status_code == 200, changed.text
    generation = changed.json()["annotations"]["meterline.generation"]
    wait_for(lambda: state()["meterline.state"] == "ready", 120, "the changed meter rebuilt")
    got, want = answer(new)
    assert want and got == want
    clients = shard_clients(cluster_stack)
    try:
        def only_new() -> bool:
            held = [{r[0] for r in c.query("SELECT DISTINCT generation FROM meter_windows_local WHERE meter = "
                                           "{m:String}", parameters={"m": old.slug}).result_rows} for c in clients]
            return all(g <= {generation} for g in held) and any(held)

        wait_for(only_new, 120, "the old generation's rows dropped from every shard")
    finally:
        for c in clients:
            c.close()


#: Two tenants' meters on the cluster: the same slug, their own meanings (tests/e2e/test_namespaces.py
#: checks every endpoint on one server; here the reads go through Distributed tables across both shards).
CLUSTER_TENANT_METERS = {
    "acme": OracleMeter("ns_calls", "ns_call", "SUM", "n", ("tenant",)),
    "beta": OracleMeter("ns_calls", "ns_call", "COUNT", None, ("tenant",)),
}
NS_RANGE = {"from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z"}


def _tenant_events(tenant: str, n: int) -> list[dict[str, Any]]:
    """The same (source, id) pairs for both tenants, over 8 subjects (so both shards hold each tenant)."""
    return [{"specversion": "1.0", "type": "ns_call", "id": f"ns{i}", "source": "cluster-tenants",
             "subject": f"ns-s{i % 8}", "time": f"2024-05-01T01:{i:02d}:00Z", "data": {"n": i + 1, "tenant": tenant}}
            for i in range(n)]


def _cluster_key(stack: LocalStack, namespace: str) -> str:
    """`meterline keys create` as an operator runs it against a cluster: with the stack's settings
    (METERLINE_CLICKHOUSE_CLUSTER set), so the key is written to its shard before the command returns."""
    out = subprocess.run([sys.executable, "-m", "meterline.cli", "keys", "create", "--namespace", namespace,
                          "--scopes", "ingest,read,admin"], env=stack.env(), capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out.startswith("mlk_"), out
    return out


def test_namespaces_stay_isolated_on_a_cluster(cluster_stack: LocalStack) -> None:
    """Keys of two namespaces on the sharded stack: each reads only its own events, windows and subjects
    through the Distributed tables (additional_table_filters name `<table>` and `<table>_local`), though
    both sent the same (source, id) pairs and each namespace's rows lie on both shards."""
    keys = {ns: _cluster_key(cluster_stack, ns) for ns in CLUSTER_TENANT_METERS}
    bearer = {ns: {"Authorization": f"Bearer {k}"} for ns, k in keys.items()}
    sent = {"acme": _tenant_events("acme", 24), "beta": _tenant_events("beta", 16)}
    # The oracle: each namespace's own meter over its own first sightings, per subject.
    want: dict[str, dict[str, Decimal]] = {}
    for ns, events in sent.items():
        meter = CLUSTER_TENANT_METERS[ns]
        per_subject: dict[str, Decimal] = {}
        for e in events:
            add = Decimal(e["data"]["n"]) if meter.aggregation == "SUM" else Decimal(1)
            per_subject[e["subject"]] = per_subject.get(e["subject"], Decimal(0)) + add
        want[ns] = per_subject
    with httpx.Client(base_url=cluster_stack.url, timeout=30) as http:
        for ns in sent:
            wait_for(lambda ns=ns: http.get("/api/v1/meters", headers=bearer[ns]).status_code == 200, 30,
                     f"{ns}'s key known to the server")
            create_meters(http, bearer[ns], [meter_body(CLUSTER_TENANT_METERS[ns])])
        for ns, events in (("beta", sent["beta"]), ("acme", sent["acme"]), ("acme", sent["acme"][:5])):  # + a retry
            r = http.post("/api/v1/events", json=events,
                          headers={"content-type": "application/cloudevents-batch+json", **bearer[ns]})
            assert r.status_code == 204, r.text

        def answer(ns: str) -> dict[str, Decimal]:
            r = http.get("/api/v1/meters/ns_calls/query", params={**NS_RANGE, "groupBy": "subject"}, headers=bearer[ns])
            assert r.status_code == 200, r.text
            body = json.loads(r.text, parse_float=Decimal)
            return {d["subject"]: Decimal(str(d["value"])) for d in body["data"] if d["value"]}

        wait_for(lambda: all(answer(ns) == want[ns] for ns in sent), 120, f"each namespace's answer is {want}")
        for ns, other in (("acme", "beta"), ("beta", "acme")):
            listed = http.get("/api/v1/events", params={"from": NS_RANGE["from"], "limit": 100}, headers=bearer[ns])
            assert listed.status_code == 200, listed.text
            seen = listed.json()
            assert sorted(e["event"]["id"] for e in seen) == sorted(e["id"] for e in sent[ns])
            assert {e["event"]["data"]["tenant"] for e in seen} == {ns}
            values = http.get("/api/v1/meters/ns_calls/group-by/tenant/values", params=NS_RANGE, headers=bearer[ns])
            assert values.status_code == 200 and values.json() == [ns], values.text
        # The keyless default namespace sees none of the tenants' events, and has no `ns_calls`.
        mine = httpx.get(f"{cluster_stack.url}/api/v1/events", params={"from": NS_RANGE["from"], "id": "ns0"}, timeout=30)
        assert mine.status_code == 200 and mine.json() == [], mine.text
        assert httpx.get(f"{cluster_stack.url}/api/v1/meters/ns_calls", timeout=30).status_code == 404
    # Really sharded: each namespace's rows lie on both shards, so the answers above merged both.
    clients = shard_clients(cluster_stack)
    try:
        for ns in sent:
            held = [{r[0] for r in c.query("SELECT DISTINCT subject FROM events_local WHERE namespace = {ns:String}",
                                           parameters={"ns": ns}).result_rows} for c in clients]
            assert all(held) and held[0] | held[1] == set(want[ns]), (ns, held)
    finally:
        for c in clients:
            c.close()
