"""The SQL of the one-time `dedupe_keys` backfill, and the table a key encoding's keys live in."""

from __future__ import annotations

from meterline.core.positions import KEY_VERSION
from meterline.core.schema import DEDUPE_KEYS, TABLES, dedupe_keys_table
from processor.key_backfill import covered_query, events_query


def test_a_backfill_counts_only_if_it_is_of_the_current_key_encoding_and_covers_the_keep_window() -> None:
    sql, params = covered_query("db", 47)
    assert sql == ("SELECT count() FROM `db`.dedupe_key_backfills WHERE key_version = {version:UInt32} "
                   "AND covers_from <= now() - toIntervalDay({days:UInt32})")
    assert params == {"version": KEY_VERSION, "days": 47}


def test_the_backfill_reads_what_keys_are_recomputed_from_never_the_stored_key() -> None:
    sql, params = events_query("db", 1_700_000_000)
    assert sql.startswith("SELECT source, id, namespace, log_epoch, kafka_partition, kafka_offset, batch_index, "
                          "ingested_at FROM `db`.events WHERE ingested_at >= toDateTime({from:UInt32}, 'UTC')")
    assert "dedupe_key" not in sql and params == {"from": 1_700_000_000}


def test_each_key_encoding_has_its_own_table() -> None:
    """Keys of two encodings at one position would share a ReplacingMergeTree identity: a new
    KEY_VERSION must name a new table (filled by the backfill), never reuse the old one."""
    assert dedupe_keys_table(2) == "dedupe_keys"  # the name it shipped with
    assert dedupe_keys_table(3) == "dedupe_keys_v3" != dedupe_keys_table(4)
    assert DEDUPE_KEYS == dedupe_keys_table(KEY_VERSION) and DEDUPE_KEYS in {t.name for t in TABLES}
