"""ClickHouse tables: the one place their names, columns and DDL live.

Every table is a ReplacingMergeTree whose sorting key ends in the row's deterministic identity and is
read with FINAL. That is what turns at-least-once delivery into exactly-once effect: a processor that
crashes after writing but before acking replays the same messages, produces byte-identical rows with
identical keys, and the engine collapses them (see docs/design.md, "Exactly-once effect").
"""

from __future__ import annotations

EVENTS = "events"
METER_WINDOWS = "meter_windows"
DEAD_LETTERS = "dead_letters"
DEAD_LETTER_REPLAYS = "dead_letter_replays"
API_KEYS = "api_keys"
SUBJECTS = "subjects"
PORTAL_TOKENS = "portal_tokens"

API_KEY_COLUMNS: tuple[str, ...] = (
    "key_id", "namespace", "scopes", "key_hash", "name", "created_at", "expires_at", "revoked_at", "updated_at",
)

PORTAL_TOKEN_COLUMNS: tuple[str, ...] = (
    "id", "namespace", "subject", "allowed_meters", "created_at", "expires_at", "invalidated_at", "updated_at",
)

SUBJECT_COLUMNS: tuple[str, ...] = (
    "namespace", "key", "id", "display_name", "metadata", "current_period_start", "current_period_end",
    "stripe_customer_id", "created_at", "updated_at", "deleted_at",
)

EVENT_COLUMNS: tuple[str, ...] = (
    "dedupe_key", "id", "source", "type", "subject", "time", "data", "ingested_at",
    "log_epoch", "kafka_partition", "kafka_offset", "batch_index", "validation_errors", "attributes",
)
"""`stored_at` is not written: it defaults to the moment ClickHouse stored the row (OpenMeter's storedAt)."""

WINDOW_COLUMNS: tuple[str, ...] = (
    "meter", "subject", "window_start", "group_key", "group",
    "log_epoch", "kafka_partition", "kafka_offset",
    "count", "sum", "min", "max", "uniques", "latest_time", "latest_value", "latest_rank",
)

DEAD_LETTER_COLUMNS: tuple[str, ...] = (
    "log_epoch", "kafka_partition", "kafka_offset", "batch_index", "meter",
    "id", "source", "type", "subject", "time", "data", "reason_code", "reason", "received_at",
)

# Decimal128(9): 29 integer digits and 9 fractional digits, exact for every value meters accept.
DECIMAL = "Decimal128(9)"


def ddl(database: str) -> list[str]:
    """Statements that create the database and every table; idempotent (IF NOT EXISTS)."""
    db = quote_identifier(database)
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}",
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{EVENTS} (
            dedupe_key FixedString(16),
            id String,
            source String,
            type LowCardinality(String),
            subject String,
            time DateTime64(6, 'UTC'),
            data String,
            ingested_at DateTime64(3, 'UTC'),
            log_epoch LowCardinality(String),
            kafka_partition UInt32,
            kafka_offset UInt64,
            batch_index UInt32,
            validation_errors Array(String),
            attributes String DEFAULT '',
            stored_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(time)
        ORDER BY (subject, time, dedupe_key)
        """,
        # Tables created before these columns existed gain them (the event list shows both).
        f"ALTER TABLE {db}.{EVENTS} ADD COLUMN IF NOT EXISTS attributes String DEFAULT ''",
        f"ALTER TABLE {db}.{EVENTS} ADD COLUMN IF NOT EXISTS stored_at DateTime64(3, 'UTC') DEFAULT now64(3)",
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{METER_WINDOWS} (
            meter LowCardinality(String),
            subject String,
            window_start DateTime('UTC'),
            group_key String,
            group Map(String, String),
            log_epoch LowCardinality(String),
            kafka_partition UInt32,
            kafka_offset UInt64,
            count UInt64,
            sum {DECIMAL},
            min Nullable({DECIMAL}),
            max Nullable({DECIMAL}),
            uniques Array(String),
            latest_time DateTime64(6, 'UTC'),
            latest_value Nullable({DECIMAL}),
            latest_rank UInt64
        )
        ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(window_start)
        ORDER BY (meter, subject, window_start, group_key, log_epoch, kafka_partition, kafka_offset)
        """,
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{DEAD_LETTERS} (
            log_epoch LowCardinality(String),
            kafka_partition UInt32,
            kafka_offset UInt64,
            batch_index UInt32,
            meter LowCardinality(String),
            id String,
            source String,
            type LowCardinality(String),
            subject String,
            time DateTime64(6, 'UTC'),
            data String,
            reason_code LowCardinality(String),
            reason String,
            received_at DateTime64(3, 'UTC')
        )
        ENGINE = ReplacingMergeTree
        ORDER BY (log_epoch, kafka_partition, kafka_offset, batch_index, meter)
        """,
        # What `meterline dead-letters replay` did with each dead letter; the newest outcome wins.
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{DEAD_LETTER_REPLAYS} (
            log_epoch LowCardinality(String),
            kafka_partition UInt32,
            kafka_offset UInt64,
            batch_index UInt32,
            meter LowCardinality(String),
            outcome LowCardinality(String),
            detail String,
            replayed_at DateTime64(3, 'UTC')
        )
        ENGINE = ReplacingMergeTree(replayed_at)
        ORDER BY (log_epoch, kafka_partition, kafka_offset, batch_index, meter)
        """,
        # API keys: only an HMAC of each key is stored (meterline/core/keys.py). Revoking writes a newer
        # version of the row; every process reloads the table every few seconds.
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{API_KEYS} (
            key_id String,
            namespace String,
            scopes Array(LowCardinality(String)),
            key_hash String,
            name String,
            created_at DateTime64(3, 'UTC'),
            expires_at Nullable(DateTime64(3, 'UTC')),
            revoked_at Nullable(DateTime64(3, 'UTC')),
            updated_at DateTime64(3, 'UTC')
        )
        ENGINE = ReplacingMergeTree(updated_at)
        ORDER BY key_id
        """,
        # OpenMeter's subjects (display name, metadata) per namespace; the newest version of a key wins.
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{SUBJECTS} (
            namespace String,
            key String,
            id String,
            display_name Nullable(String),
            metadata String,
            current_period_start Nullable(DateTime64(3, 'UTC')),
            current_period_end Nullable(DateTime64(3, 'UTC')),
            stripe_customer_id Nullable(String),
            created_at DateTime64(3, 'UTC'),
            updated_at DateTime64(3, 'UTC'),
            deleted_at Nullable(DateTime64(3, 'UTC'))
        )
        ENGINE = ReplacingMergeTree(updated_at)
        ORDER BY (namespace, key)
        """,
        # Portal tokens are signed JWTs; this table lists them and records invalidations (newest wins).
        f"""
        CREATE TABLE IF NOT EXISTS {db}.{PORTAL_TOKENS} (
            id String,
            namespace String,
            subject String,
            allowed_meters Array(String),
            created_at DateTime64(3, 'UTC'),
            expires_at DateTime64(3, 'UTC'),
            invalidated_at Nullable(DateTime64(3, 'UTC')),
            updated_at DateTime64(3, 'UTC')
        )
        ENGINE = ReplacingMergeTree(updated_at)
        ORDER BY (namespace, id)
        """,
    ]


def qualified(database: str, table: str) -> str:
    """`database`.table for SQL text; both names come from config and this module, never from requests."""
    return f"{quote_identifier(database)}.{table}"


def quote_identifier(name: str) -> str:
    """Backquote a database/table identifier; names come from config, never from requests."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
