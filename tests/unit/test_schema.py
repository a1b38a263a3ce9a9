"""The DDL rendered for one server and for a cluster, from the one declaration of each table.

The properties hold for every table in `schema.TABLES`, so a table added later is checked too: its
sharding key must be a function of its identity, or FINAL would miss duplicates across shards.
"""

from __future__ import annotations

import re

import pytest

from meterline.core.schema import (
    EVENTS,
    METER_WINDOWS,
    SINGLE_NODE,
    TABLES,
    Table,
    Topology,
    coarse_valid_ddl,
    ddl,
    mutation_target,
    quote_string,
    storage_name,
)

CLUSTER = Topology(cluster="prod")
SHARDS_ONLY = Topology(cluster="prod", replicated=False)
PER_NODE = Topology(cluster="prod", replicated=False, on_cluster=False)


def columns_of(expression: str) -> set[str]:
    """Identifiers used in an SQL expression, minus function names (followed by a parenthesis)."""
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression))
    functions = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", expression))
    return names - functions


def declared_columns(table: Table) -> list[str]:
    return [line.split()[0] for line in table.columns.strip().splitlines()]


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_sharding_key_is_a_function_of_the_identity(table: Table) -> None:
    """Rows that share an identity (a replayed message's rows) must land on one shard.

    The identity is the sorting key; a shard key over a subset of its columns (or `subject`, which the
    processor writes identically for every copy of an identity: rows are a pure function of the
    message at that position) sends every copy to the same shard.
    """
    used = columns_of(table.shard_by)
    assert used, table.shard_by
    assert used <= set(declared_columns(table))
    assert used <= columns_of(table.order_by), (table.name, used - columns_of(table.order_by))


def test_windows_and_events_shard_by_subject() -> None:
    """A subject's windows and raw events live on one shard, so a per-subject read touches one shard."""
    by_name = {t.name: t for t in TABLES}
    assert by_name[METER_WINDOWS].shard_by == by_name[EVENTS].shard_by == "cityHash64(subject)"


def test_single_node_ddl_has_no_cluster_constructs() -> None:
    statements = ddl("meterline")
    assert statements[0] == "CREATE DATABASE IF NOT EXISTS `meterline`"
    assert all("ON CLUSTER" not in sql and "_local" not in sql for sql in statements)
    # The last: the Join-engine map of valid coarse months (single server only, like compaction).
    assert statements[-1] == coarse_valid_ddl("meterline") and "ENGINE = Join(ANY, LEFT, partition)" in statements[-1]
    for table, sql in zip(TABLES, creates(statements[:-1]), strict=True):
        assert sql.startswith(f"CREATE TABLE IF NOT EXISTS `meterline`.{table.name} (")
        for banned in ("ON CLUSTER", "Replicated", "Distributed", "_local"):
            assert banned not in sql
        expected_engine = f"ReplacingMergeTree({table.version})" if table.version else "ReplacingMergeTree"
        assert f"ENGINE = {expected_engine}\n" in sql
        assert sql.endswith(f"ORDER BY {table.order_by}{settings_clause(table)}")
        for column in declared_columns(table):
            assert f"\n            {column} " in sql


def settings_clause(table: Table) -> str:
    return f"\nSETTINGS {', '.join(table.settings)}" if table.settings else ""


def creates(statements: list[str]) -> list[str]:
    return [sql for sql in statements if sql.startswith("CREATE TABLE")]


@pytest.mark.parametrize("topology", [CLUSTER, SHARDS_ONLY, PER_NODE], ids=["replicated", "shards", "per-node"])
def test_cluster_ddl_is_local_table_plus_distributed_table(topology: Topology) -> None:
    statements = ddl("meter line", topology)
    on_cluster = " ON CLUSTER `prod`" if topology.on_cluster else ""
    assert statements[0] == f"CREATE DATABASE IF NOT EXISTS `meter line`{on_cluster}"
    tables = creates(statements)
    assert len(tables) == 2 * len(TABLES)  # no coarse-months map: compaction is refused on a cluster
    alters = [sql for sql in statements if sql.startswith("ALTER")]
    assert len(alters) == sum(2 * len(t.added_columns) + bool(t.settings) for t in TABLES)  # settings: storage only
    assert all(sql.count(" ON CLUSTER `prod` ") == topology.on_cluster for sql in alters)
    for i, table in enumerate(TABLES):
        local, distributed = tables[2 * i], tables[2 * i + 1]
        assert local.startswith(f"CREATE TABLE IF NOT EXISTS `meter line`.{table.name}_local{on_cluster} (")
        assert distributed == (
            f"CREATE TABLE IF NOT EXISTS `meter line`.{table.name}{on_cluster} AS `meter line`.{table.name}_local\n"
            f"ENGINE = Distributed('prod', 'meter line', '{table.name}_local', {table.shard_by})"
        )
        version = f", {table.version}" if table.version else ""
        if topology.replicated:
            assert ("ENGINE = ReplicatedReplacingMergeTree("
                    f"'/clickhouse/tables/{{shard}}/{{database}}/{{table}}', '{{replica}}'{version})\n") in local
        else:
            assert "Replicated" not in local
        assert local.endswith(f"ORDER BY {table.order_by}{settings_clause(table)}")
        assert "SETTINGS" not in distributed
        if not topology.on_cluster:
            assert "ON CLUSTER" not in local + distributed


def test_the_cluster_rendering_differs_from_single_node_only_in_name_and_engine() -> None:
    """Columns, partitioning and sorting key are written once: a cluster's local table has the same."""
    single = creates(ddl("db"))[:-1]  # the last: the coarse-months map, single server only
    local = creates(ddl("db", CLUSTER))[::2]
    for table, one, other in zip(TABLES, single, local, strict=True):
        strip = re.compile(r"ENGINE = [^\n]*\n")
        assert strip.sub("", one).replace(f".{table.name} (", ".X (") == strip.sub("", other).replace(
            f".{table.name}_local ON CLUSTER `prod` (", ".X (")


def test_mutations_name_the_stored_rows() -> None:
    assert mutation_target("db", METER_WINDOWS) == "`db`.meter_windows"
    assert mutation_target("db", METER_WINDOWS, CLUSTER) == "`db`.meter_windows_local ON CLUSTER `prod`"
    assert mutation_target("db", METER_WINDOWS, PER_NODE) == "`db`.meter_windows_local"
    assert storage_name(EVENTS, SINGLE_NODE) == EVENTS


def test_names_are_quoted() -> None:
    assert quote_string("it's") == "'it\\'s'"
    evil = Topology(cluster="a`b")
    assert " ON CLUSTER `a\\`b`" in ddl("db", evil)[0]
    assert "Distributed('a`b'," in creates(ddl("db", evil))[1]


def test_an_empty_cluster_name_is_refused() -> None:
    with pytest.raises(ValueError, match="cluster"):
        Topology(cluster="")


def test_added_columns_are_created_with_the_table_and_added_to_older_tables() -> None:
    table = Table(name="t", columns="\n    a String\n", order_by="a", shard_by="cityHash64(a)",
                  added_columns=("b String DEFAULT ''",))
    assert table.column_names() == ["a", "b"]
    single = table.create("db")
    assert single[0].startswith("CREATE TABLE IF NOT EXISTS `db`.t (\n    a String,\n            b String DEFAULT ''\n)")
    assert single[1:] == ["ALTER TABLE `db`.t ADD COLUMN IF NOT EXISTS b String DEFAULT ''"]
    cluster = table.create("db", CLUSTER)
    assert cluster[1] == "ALTER TABLE `db`.t_local ON CLUSTER `prod` ADD COLUMN IF NOT EXISTS b String DEFAULT ''"
    assert cluster[3] == "ALTER TABLE `db`.t ON CLUSTER `prod` ADD COLUMN IF NOT EXISTS b String DEFAULT ''"
