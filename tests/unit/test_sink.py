"""ClickHouseSink's retry rules, with a scripted client standing in for clickhouse-connect.

Writing to a real ClickHouse (and surviving a real outage) is covered by tests/integration and
tests/faults/test_outages.py; this pins the rules those rely on: design order of the three inserts,
synchronous inserts, retry of storage and socket errors with bounded jittered backoff, a fresh
connection after a failure, and giving up only once stopped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from meterline.core.cluster import insert_token
from meterline.core.errors import StorageError, StorageRejectedError
from meterline.core.positions import Sighting
from meterline.core.retraction import Loser
from meterline.core.rows import Rows
from meterline.core.schema import EVENT_COLUMNS, SINGLE_NODE, Topology
from processor.sink import (
    ClickHouseSink,
    dedupe_key_columns,
    dedupe_key_rows,
    dedupe_load_query,
    foreign_keys_query,
    retraction_deletes,
    retraction_reads,
)


class ScriptedClient:
    """Fails the next `failures[table]` inserts of a table with the given error, records the rest."""

    def __init__(self, log: list[tuple[str, Any]], failures: dict[str, list[Exception]]) -> None:
        self.log = log
        self.failures = failures
        self.closed = False
        self.settings: list[tuple[str, dict[str, Any]]] = []

    def create_insert_context(self, table: str, column_names: list[str], column_types: Any = None,
                              column_oriented: bool = False, settings: dict[str, Any] | None = None) -> Any:
        """The sink asks a table's column types once (none here is a DateTime64 the sink converts), then
        builds each insert's context with them."""
        if column_types is None:
            return SimpleNamespace(column_types=[SimpleNamespace(nullable=False) for _ in column_names])
        return SimpleNamespace(table=table, column_names=column_names, column_types=column_types,
                               column_oriented=column_oriented, settings=settings, req_block_size=None)

    def insert(self, table: str | None = None, rows: Any = None, column_names: list[str] | None = None,
               settings: dict[str, Any] | None = None, column_types: Any = None, column_oriented: bool = False,
               *, data: Any = None, context: Any = None) -> None:
        if context is not None:  # the sink's path: one Native block of every row
            table, rows, column_names, settings = context.table, data, context.column_names, context.settings
            column_types, column_oriented = context.column_types, context.column_oriented
            assert context.req_block_size == len(rows[0])
        assert table is not None and column_names is not None and settings is not None
        pending = self.failures.get(table)
        if pending:
            self.log.append(("failed", table))
            raise pending.pop(0)
        assert column_oriented and len(rows) == len(column_names) == len(column_types)
        self.log.append(("insert", table, len(rows[0]), settings.get("async_insert")))
        self.settings.append((table, settings))

    def close(self) -> None:
        self.closed = True


def make_sink(failures: dict[str, list[Exception]], **kwargs: Any) -> tuple[ClickHouseSink, list[Any], list[float],
                                                                           list[ScriptedClient]]:
    log: list[Any] = []
    sleeps: list[float] = []
    clients: list[ScriptedClient] = []

    def connect(url: str, *, database: str | None = None, **options: Any) -> ScriptedClient:
        assert options.get("topology", SINGLE_NODE) == kwargs.get("topology", SINGLE_NODE)
        clients.append(ScriptedClient(log, failures))
        return clients[-1]

    sink = ClickHouseSink("http://nowhere:1/db", "db", connect=connect, sleep=sleeps.append, **kwargs)  # type: ignore[arg-type]
    return sink, log, sleeps, clients


def rows() -> Rows:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    return Rows(events=[[b"k" * 16, "id", "src", "t", "s", now, "", now, "e", 0, 0, 0, [], "{}", [], "default"]],
                dead_letters=[["e", 0, 0, 1, "m", "id", "src", "t", "s", now, "", "value_missing", "r", now, 5,
                               "default"]],
                windows=[["m", "s", now, "[]", {}, "e", 0, 0, 1, 0, None, None, [], now, None, 0, 5, "default"]])


def test_inserts_in_design_order_synchronously() -> None:
    sink, log, sleeps, _ = make_sink({})
    sink.write_sync(rows())
    assert log == [("insert", "events", 1, 0), ("insert", "dedupe_keys", 1, 0), ("insert", "dead_letters", 1, 0),
                   ("insert", "meter_windows", 1, 0)]
    assert sleeps == [] and not sink.failing


def test_every_events_row_has_a_dedupe_keys_row_with_its_key_position_and_broker_time() -> None:
    batch = rows()
    event = dict(zip(EVENT_COLUMNS, batch.events[0], strict=True))
    expected = [[event["dedupe_key"], event["log_epoch"], event["kafka_partition"], event["kafka_offset"],
                 event["batch_index"], event["ingested_at"]]]
    assert dedupe_key_rows(batch.events) == expected
    keys = dedupe_key_columns(list(zip(*batch.events, strict=True)))  # what the sink inserts
    assert [list(row) for row in zip(*keys, strict=True)] == expected


def test_each_insert_is_retried_until_it_succeeds_on_a_fresh_connection() -> None:
    failures: dict[str, list[Exception]] = {"events": [StorageError("down"), OSError("reset")],
                                            "meter_windows": [StorageError("down")]}
    sink, log, sleeps, clients = make_sink(failures, backoff_initial=0.4, backoff_max=0.6)
    sink.write_sync(rows())
    assert log == [("failed", "events"), ("failed", "events"), ("insert", "events", 1, 0),
                   ("insert", "dedupe_keys", 1, 0), ("insert", "dead_letters", 1, 0), ("failed", "meter_windows"), ("insert", "meter_windows", 1, 0)]
    # One wait per failure, jittered in [d/2, d] with d doubling from 0.4 and capped at 0.6, reset per insert.
    bounds = [(0.2, 0.4), (0.3, 0.6), (0.2, 0.4)]
    assert len(sleeps) == 3 and all(lo <= s <= hi for s, (lo, hi) in zip(sleeps, bounds, strict=True))
    assert len(clients) == 4 and all(c.closed for c in clients[:3]) and not clients[3].closed
    assert not sink.failing


def test_failing_flag_is_up_while_retrying() -> None:
    seen: list[bool] = []
    sink, _, _, _ = make_sink({"events": [StorageError("down")]})
    sink._sleep = lambda _s: seen.append(sink.failing)  # type: ignore[method-assign]
    sink.write_sync(rows())
    assert seen == [True] and not sink.failing


def test_other_errors_are_not_retried() -> None:
    sink, log, sleeps, _ = make_sink({"events": [KeyError("a bug, not an outage")]})
    with pytest.raises(KeyError):
        sink.write_sync(rows())
    assert log == [("failed", "events")] and sleeps == []


@pytest.mark.parametrize("error", [OverflowError("int too big to convert"), ValueError("bad value"),
                                   StorageRejectedError("Code: 53. TYPE_MISMATCH")])
def test_refused_rows_are_not_retried_and_name_their_table(error: Exception) -> None:
    """Rows storage refuses fail the same way every time: raised at once for the processor to quarantine."""
    sink, log, sleeps, _ = make_sink({"meter_windows": [error]})
    with pytest.raises(StorageRejectedError) as info:
        sink.write_sync(rows())
    assert info.value.table == "meter_windows"  # type: ignore[attr-defined]
    assert log[-1] == ("failed", "meter_windows") and sleeps == [] and not sink.failing


def test_stopped_sink_gives_up_and_writes_nothing_after() -> None:
    sink, log, sleeps, _ = make_sink({"events": [StorageError("down")]})
    sink.stop()
    with pytest.raises(StorageError):
        sink.write_sync(rows())
    assert log == [("failed", "events")] and sleeps == [] and sink.failing


async def test_async_write_retries_off_the_loop() -> None:
    sink, log, _, _ = make_sink({"dead_letters": [StorageError("down")]})
    await sink.write(rows())
    assert [entry[:2] for entry in log] == [("insert", "events"), ("insert", "dedupe_keys"), ("failed", "dead_letters"),
                                             ("insert", "dead_letters"), ("insert", "meter_windows")]


def test_cluster_inserts_carry_the_same_token_on_every_retry() -> None:
    """A retried insert must be recognisable by every replica: same token, derived from positions + salt."""
    topology = Topology(cluster="c")
    sink, log, _, clients = make_sink({"meter_windows": [StorageError("timeout")]}, topology=topology,
                                      token_salt="cfg")
    batch = rows()
    batch.events.append([b"j" * 16, "id2", "src", "t", "s", batch.events[0][5], "", batch.events[0][5], "e", 3, 7, 0, [], "{}", [],
                          "default"])
    sink.write_sync(batch)
    sent = [entry for client in clients for entry in client.settings]
    assert [table for table, _ in sent] == ["events", "dedupe_keys", "dead_letters", "meter_windows"]
    expected = {("e", 0, 0), ("e", 3, 7)}
    for table, settings in sent:
        assert settings["insert_deduplication_token"] == insert_token(table, expected, "cfg|m@5")
        assert settings["insert_quorum"] == "auto" and settings["async_insert"] == 0
    assert log[-2] == ("failed", "meter_windows")


def test_single_node_inserts_carry_no_token() -> None:
    sink, _, _, clients = make_sink({})
    sink.write_sync(rows())
    assert all("insert_deduplication_token" not in s for _, s in clients[0].settings)


def test_a_new_meter_generation_gets_a_new_token() -> None:
    """Same positions replayed after a live meter change: other rows, so the token must differ, or every
    replica would drop them as a duplicate of the old generation's block."""
    tokens = []
    for generation in (5, 6):
        sink, _, _, clients = make_sink({}, topology=Topology(cluster="c"))
        batch = rows()
        batch.windows[0][-2] = generation  # the namespace comes after it
        sink.write_sync(batch)
        tokens.append(dict(clients[0].settings)["meter_windows"]["insert_deduplication_token"])
    assert tokens[0] != tokens[1]


def test_the_tail_of_foreign_keys_reads_one_sorting_key_range_per_partition() -> None:
    """A partition met for the first time is read whole (any epoch, within the kept days); the others
    from their marker, in the current epoch only: ranges of dedupe_keys' (partition, epoch, offset) key."""
    sql, params = foreign_keys_query("db", {3: ("E", 40), 1: None}, 47)
    assert "FROM `db`.dedupe_keys WHERE ((kafka_partition = {p0:UInt32}) OR (kafka_partition = {p1:UInt32} " \
           "AND log_epoch = {e1:String} AND kafka_offset >= {o1:UInt64})) AND seen_at >= now() - " \
           "toIntervalDay({days:UInt32})" in sql
    assert params == {"days": 47, "p0": 1, "p1": 3, "e1": "E", "o1": 40}


def test_the_reload_of_an_owned_partition_reads_its_range_of_dedupe_keys_never_events() -> None:
    sql, params = dedupe_load_query("db", 5, 46, ("E", 9))
    assert sql == foreign_keys_query("db", {5: ("E", 9)}, 46)[0] and "events" not in sql
    assert params == {"days": 46, "p0": 5, "e0": "E", "o0": 9}
    assert dedupe_load_query("db", 5, 46, None) == foreign_keys_query("db", {5: None}, 46)


def test_retraction_reads_name_the_losers_messages_positions_and_keys() -> None:
    losers = [Loser(b"\x01" * 16, Sighting(9, "e", 2, 40, 3), Sighting(8, "e", 1, 7, 0)),
              Loser(b"\xab" * 16, Sighting(9, "e", 2, 40, 5), Sighting(8, "e", 0, 3, 1))]
    reads = retraction_reads("db", losers)
    sql, params = reads["events"]
    assert "FROM `db`.events WHERE (log_epoch, kafka_partition, kafka_offset) IN" in sql and "FINAL" not in sql
    assert "LIMIT 1 BY log_epoch, kafka_partition, kafka_offset, batch_index" in sql
    assert params == {"messages": [("e", 2, 40)]}  # one message for both losers
    sql, params = reads["windows"]
    assert sql.startswith("SELECT meter, subject, window_start, group_key, any(group), generation, any(namespace)")
    assert "FROM `db`.meter_windows" in sql and params == {"messages": [("e", 2, 40)]}
    assert reads["keys"][1] == {"keys": ["01" * 16, "AB" * 16]}
    sql, params = reads["claims"]
    assert "FROM `db`.dedupe_keys WHERE (log_epoch, kafka_partition, kafka_offset, batch_index) IN" in sql
    assert params == {"positions": [("e", 2, 40, 3), ("e", 2, 40, 5)]}


def test_retraction_deletes_target_the_stored_rows_on_a_cluster() -> None:
    sql, params = retraction_deletes("db", "events", [("e", 2, 40, 5), ("e", 2, 40, 3)])
    assert sql.startswith("DELETE FROM `db`.events WHERE (log_epoch, kafka_partition, kafka_offset, batch_index) IN")
    assert params == {"positions": [("e", 2, 40, 3), ("e", 2, 40, 5)]}
    sql, _ = retraction_deletes("db", "dedupe_keys", [], Topology(cluster="c"))
    assert sql.startswith("DELETE FROM `db`.dedupe_keys_local ON CLUSTER `c` WHERE")
