"""ClickHouse tables: the one place their names, columns and DDL live.

Every table is a ReplacingMergeTree whose sorting key ends in the row's deterministic identity and is
read with FINAL. That is what turns at-least-once delivery into exactly-once effect: a processor that
crashes after writing but before acking replays the same messages, produces byte-identical rows with
identical keys, and the engine collapses them (see docs/design.md, "Exactly-once effect").

Each table is declared once, as a `Table`, and rendered for a `Topology`: one server, or a ClickHouse
cluster where each table becomes a `<name>_local` table on every node (ReplicatedReplacingMergeTree, or
ReplacingMergeTree when not replicated) plus a Distributed table under the plain name, sharded by the
table's `shard_by`. Readers and writers keep using the plain names; only mutations must name the local
tables (`mutation_target`), since ClickHouse cannot DELETE through a Distributed table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meterline.core.positions import KEY_VERSION

EVENTS = "events"


def dedupe_keys_table(key_version: int) -> str:
    """The table of stored keys of one `dedupe_key` encoding (`positions.KEY_VERSION`).

    Its rows hold computed keys, so keys of two encodings must never share a row identity (a position):
    a new encoding gets a new table, which the backfill fills from `events`' `(source, id)`
    (processor/key_backfill.py), and the old one empties by its TTL. Version 2, the encoding the table
    shipped with, keeps the plain name."""
    return "dedupe_keys" if key_version == 2 else f"dedupe_keys_v{key_version}"


DEDUPE_KEYS = dedupe_keys_table(KEY_VERSION)
#: One row per completed backfill of `dedupe_keys` from `events` (processor/key_backfill.py).
DEDUPE_KEY_BACKFILLS = "dedupe_key_backfills"
METER_WINDOWS = "meter_windows"
#: Closed months' windows as 15-minute rows, written only by windows compaction (docs/design.md).
COARSE_WINDOWS = "meter_windows_coarse"
#: Which closed months' coarse rows may answer, as a key-value map queries read inside their own SQL
#: (`joinGet`, no round trip): partition -> the fingerprint its coarse rows were built for, 0 once a writer
#: announced a write into it (docs/design.md, "Coarse rows"). Single server only, like compaction.
COARSE_VALID = "meter_windows_coarse_valid"
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
METER_VERSIONS = "meter_versions"
#: Inserts into meter_versions remembered for deduplication: two writers racing for one version insert
#: within milliseconds, far fewer than this many other meter changes apart.
METER_VERSIONS_DEDUP_WINDOW = 1000
METER_REBUILDS = "meter_rebuilds"
METER_WORKERS = "meter_workers"
PARTITION_PROGRESS = "partition_progress"
WINDOW_COMPACTIONS = "window_compactions"
WINDOW_WRITERS = "window_writers"
WINDOW_COMPACTION_COLUMNS: tuple[str, ...] = (
    "partition", "compaction_id", "state", "watermarks", "rows_before", "rows_after", "owner", "fingerprint",
)
"""`updated_at` is not written: it defaults to ClickHouse's clock, which every reader compares with."""
WINDOW_WRITER_COLUMNS: tuple[str, ...] = ("writer", "partitions", "state")
PARTITION_PROGRESS_COLUMNS: tuple[str, ...] = (
    "topic", "kafka_partition", "log_epoch", "next_offset", "complete_until", "updated_at",
)

SUBJECT_COLUMNS: tuple[str, ...] = (
    "namespace", "key", "id", "display_name", "metadata", "current_period_start", "current_period_end",
    "stripe_customer_id", "created_at", "updated_at", "deleted_at",
)

#: The tenant a row belongs to (docs/design.md, "Namespaces"). Not in any sorting key: a row's identity is
#: its log position (or a dedupe key that hashes the namespace in), which one namespace owns; rows from
#: before namespaces existed belong to `default`. Every read of the query API filters on it (query/store.py).
NAMESPACE_COLUMN = "namespace LowCardinality(String) DEFAULT 'default'"
#: The tables whose rows belong to a namespace.
NAMESPACED_TABLES: tuple[str, ...] = (EVENTS, METER_WINDOWS, COARSE_WINDOWS, DEAD_LETTERS)

EVENT_COLUMNS: tuple[str, ...] = (
    "dedupe_key", "id", "source", "type", "subject", "time", "data", "ingested_at",
    "log_epoch", "kafka_partition", "kafka_offset", "batch_index", "validation_errors", "attributes", "rejections",
    "namespace",
)
"""`stored_at` is not written: it defaults to the moment ClickHouse stored the row (OpenMeter's storedAt)."""

STORED_EVENT_COLUMNS: tuple[str, ...] = (
    "log_epoch", "kafka_partition", "kafka_offset", "batch_index", "id", "source", "type", "subject", "time",
    "data", "rejections", "namespace",
)
"""What `meterline.core.rows.stored_messages` reads back from `events` to re-meter stored events."""

DEDUPE_KEY_COLUMNS: tuple[str, ...] = (
    "dedupe_key", "log_epoch", "kafka_partition", "kafka_offset", "batch_index", "seen_at",
)
"""One `dedupe_keys` row per `events` row: its key, position and broker time (`events.ingested_at`)."""

DEDUPE_KEY_BACKFILL_COLUMNS: tuple[str, ...] = ("key_version", "covers_from", "key_rows")
"""`done_at` is not written: it defaults to ClickHouse's clock."""

WINDOW_COLUMNS: tuple[str, ...] = (
    "meter", "subject", "window_start", "group_key", "group",
    "log_epoch", "kafka_partition", "kafka_offset",
    "count", "sum", "min", "max", "uniques", "latest_time", "latest_value", "latest_rank", "generation", "namespace",
)

DEAD_LETTER_COLUMNS: tuple[str, ...] = (
    "log_epoch", "kafka_partition", "kafka_offset", "batch_index", "meter",
    "id", "source", "type", "subject", "time", "data", "reason_code", "reason", "received_at", "generation",
    "namespace",
)

WINDOWS_ORDER_BY = "(meter, subject, window_start, group_key, log_epoch, kafka_partition, kafka_offset, generation)"
DEAD_LETTER_IDENTITY = "log_epoch, kafka_partition, kafka_offset, batch_index, meter"
"""Which dead letter a row is about (its message position and meter): `dead_letter_replays` is keyed and
sharded by it, so a dead letter and its replay outcomes land on one shard."""
DEAD_LETTERS_ORDER_BY = f"({DEAD_LETTER_IDENTITY}, generation)"
"""Both identities end in the meter definition's generation (docs/design.md, "Live meters")."""

#: `events.rejections`: (meter or '' for the whole event, reason code) per rejection, what logic reads
#: (`meterline.core.reasons`); `validation_errors` keeps the human text. Rows stored before the column
#: existed compute it from that text on read, once, here: the whole-event entries ('*: ...') by their two
#: fixed wordings, per-meter entries by the slug before ': ' (slugs cannot contain it), code ''.
REJECTIONS_COLUMN = (
    "rejections Array(Tuple(meter String, code String)) DEFAULT arrayMap(e -> tuple("
    "if(startsWith(e, '*: '), '', splitByString(': ', e)[1]), "
    "multiIf(startsWith(e, '*: event time is older than the late horizon'), 'too_late', "
    "startsWith(e, '*: no meter has eventType'), 'unknown_type', '')), validation_errors)"
)

# Decimal128(9): 29 integer digits and 9 fractional digits, exact for every value meters accept.
DECIMAL = "Decimal128(9)"



@dataclass(frozen=True, slots=True)
class Topology:
    """Where the tables live: one server (`cluster` None) or every node of a named ClickHouse cluster.

    `replicated`: local tables are ReplicatedReplacingMergeTree under the `{shard}`/`{replica}` macros of
    each node's config (False: plain ReplacingMergeTree shards, no replicas). `on_cluster`: DDL and
    mutations carry `ON CLUSTER` so one statement reaches every node through the cluster's keeper; False
    renders per-node statements for a caller that runs them on each node itself (a server without
    distributed DDL, such as the embedded test cluster). `nodes`: with `on_cluster` False, the URL of
    every node, where the adapters run each mutation (`meterline.adapters.clickhouse.mutate`).
    """

    cluster: str | None = None
    replicated: bool = True
    on_cluster: bool = True
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.cluster is not None and not self.cluster:
            raise ValueError("cluster name must not be empty")


SINGLE_NODE = Topology()

LOCAL_SUFFIX = "_local"

# ClickHouse expands these macros from each node's <macros> (and the table's own database and name).
REPLICA_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
REPLICA_NAME = "{replica}"


@dataclass(frozen=True, slots=True)
class Table:
    """One table's shape, independent of where it lives.

    `shard_by` is the Distributed sharding expression. It must be a function of the row's identity
    (the end of `order_by`): FINAL collapses duplicates only within one shard, so every row that can
    share an identity must land on the same shard. `version` is ReplacingMergeTree's version column.
    `added_columns` are column definitions added after the table first shipped: created with the
    table, and added by `ALTER ... ADD COLUMN IF NOT EXISTS` to tables created before them.
    `settings` (`name = value`) are storage settings: created with the table and set by
    `ALTER ... MODIFY SETTING` on tables created before them.
    """

    name: str
    columns: str
    order_by: str
    shard_by: str
    partition_by: str | None = None
    version: str | None = None
    added_columns: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()

    def column_names(self) -> list[str]:
        """Every column's name, in table order."""
        lines = [line.strip() for line in self.columns.strip().splitlines()]
        return [definition.split()[0] for definition in (*lines, *self.added_columns) if definition]

    def engine(self, topology: Topology) -> str:
        """The storage engine of the table that holds the rows (the local table on a cluster)."""
        if topology.cluster is not None and topology.replicated:
            args = [quote_string(REPLICA_PATH), quote_string(REPLICA_NAME)]
            if self.version:
                args.append(self.version)
            return f"ReplicatedReplacingMergeTree({', '.join(args)})"
        return f"ReplacingMergeTree({self.version})" if self.version else "ReplacingMergeTree"

    def create(self, database: str, topology: Topology = SINGLE_NODE) -> list[str]:
        """CREATE statements for this table: one on a single server, local + Distributed on a cluster."""
        db = quote_identifier(database)
        storage = f"{db}.{storage_name(self.name, topology)}{on_cluster(topology)}"
        partition = f"PARTITION BY {self.partition_by}\n" if self.partition_by else ""
        columns = self.columns.rstrip()
        if self.added_columns:
            columns += "," + ",".join(f"\n            {c}" for c in self.added_columns)
        create = (
            f"CREATE TABLE IF NOT EXISTS {storage} ({columns}\n)\n"
            f"ENGINE = {self.engine(topology)}\n{partition}ORDER BY {self.order_by}"
        )
        if self.settings:
            create += f"\nSETTINGS {', '.join(self.settings)}"
        statements = [create]
        statements += [f"ALTER TABLE {storage} ADD COLUMN IF NOT EXISTS {c}" for c in self.added_columns]
        if self.settings:
            statements.append(f"ALTER TABLE {storage} MODIFY SETTING {', '.join(self.settings)}")
        if topology.cluster is not None:
            distributed = ", ".join([
                quote_string(topology.cluster), quote_string(database),
                quote_string(storage_name(self.name, topology)), self.shard_by,
            ])
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {db}.{self.name}{on_cluster(topology)} "
                f"AS {db}.{storage_name(self.name, topology)}\nENGINE = Distributed({distributed})"
            )
            statements += [f"ALTER TABLE {db}.{self.name}{on_cluster(topology)} ADD COLUMN IF NOT EXISTS {c}"
                           for c in self.added_columns]
        return statements


_WINDOW_COLUMNS_DDL = f"""
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
            latest_rank UInt64,
            generation UInt64
        """
"""`meter_windows` and `meter_windows_coarse` (namespace is added after them: NAMESPACE_COLUMN)."""


_DEAD_LETTER_IDENTITY_COLUMNS = """
            log_epoch LowCardinality(String),
            kafka_partition UInt32,
            kafka_offset UInt64,
            batch_index UInt32,
            meter LowCardinality(String),"""
"""The DEAD_LETTER_IDENTITY columns, first in both dead-letter tables."""


TABLES: tuple[Table, ...] = (
    Table(
        name=EVENTS,
        columns="""
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
            validation_errors Array(String)
        """,
        order_by="(subject, time, dedupe_key)",
        shard_by="cityHash64(subject)",
        partition_by="toYYYYMM(time)",
        # The event list shows both; tables created before they existed gain them.
        added_columns=(
            "attributes String DEFAULT ''",
            "stored_at DateTime64(3, 'UTC') DEFAULT now64(3)",
            REJECTIONS_COLUMN,
            NAMESPACE_COLUMN,
        ),
    ),
    # Every stored first sighting's key, ordered by log position: what a worker tails, partition by
    # partition, to see the keys other workers stored (global dedupe, docs/design.md "Exactly-once
    # effect"). Sharded by partition so one insert of a partition's keys is visible on one shard at once.
    Table(
        name=DEDUPE_KEYS,
        columns="""
            dedupe_key FixedString(16),
            log_epoch LowCardinality(String),
            kafka_partition UInt32,
            kafka_offset UInt64,
            batch_index UInt32,
            seen_at DateTime64(3, 'UTC')
        """,
        order_by="(kafka_partition, log_epoch, kafka_offset, batch_index)",
        shard_by="cityHash64(kafka_partition)",
        partition_by="toYYYYMM(seen_at)",
    ),
    # That `dedupe_keys` of `key_version` holds every key `events` stored since `covers_from` (broker
    # time): written once a backfill finished, so a crash part-way makes the next start backfill again.
    Table(
        name=DEDUPE_KEY_BACKFILLS,
        columns="""
            key_version UInt32,
            covers_from DateTime('UTC'),
            key_rows UInt64,
            done_at DateTime64(3, 'UTC') DEFAULT now64(3)
        """,
        order_by="(key_version, covers_from)",
        shard_by="key_version",
    ),
    Table(
        name=METER_WINDOWS,
        columns=_WINDOW_COLUMNS_DDL,
        order_by=WINDOWS_ORDER_BY,
        shard_by="cityHash64(subject)",
        partition_by="toYYYYMM(window_start)",
        added_columns=(NAMESPACE_COLUMN,),
    ),
    # The same rows per 15 minutes for closed months, filled and swapped in only by windows compaction
    # (meterline/jobs/compaction.py); a query reads them only where `window_compactions` says they
    # match the month's minute rows (docs/design.md, "Coarse rows").
    Table(
        name=COARSE_WINDOWS,
        columns=_WINDOW_COLUMNS_DDL,
        order_by=WINDOWS_ORDER_BY,
        shard_by="cityHash64(subject)",
        partition_by="toYYYYMM(window_start)",
        added_columns=(NAMESPACE_COLUMN,),
    ),
    Table(
        name=DEAD_LETTERS,
        columns=f"""{_DEAD_LETTER_IDENTITY_COLUMNS}
            id String,
            source String,
            type LowCardinality(String),
            subject String,
            time DateTime64(6, 'UTC'),
            data String,
            reason_code LowCardinality(String),
            reason String,
            received_at DateTime64(3, 'UTC'),
            generation UInt64
        """,
        order_by=DEAD_LETTERS_ORDER_BY,
        shard_by=f"cityHash64({DEAD_LETTER_IDENTITY})",
        added_columns=(NAMESPACE_COLUMN,),
    ),
    # What `meterline dead-letters replay` did with each dead letter; the newest outcome wins.
    Table(
        name=DEAD_LETTER_REPLAYS,
        columns=f"""{_DEAD_LETTER_IDENTITY_COLUMNS}
            outcome LowCardinality(String),
            detail String,
            replayed_at DateTime64(3, 'UTC')
        """,
        order_by=f"({DEAD_LETTER_IDENTITY})",
        shard_by=f"cityHash64({DEAD_LETTER_IDENTITY})",
        version="replayed_at",
    ),
    # API keys: only an HMAC of each key is stored (meterline/core/keys.py). Revoking writes a newer
    # version of the row; every process reloads the table every few seconds.
    Table(
        name=API_KEYS,
        columns="""
            key_id String,
            namespace String,
            scopes Array(LowCardinality(String)),
            key_hash String,
            name String,
            created_at DateTime64(3, 'UTC'),
            expires_at Nullable(DateTime64(3, 'UTC')),
            revoked_at Nullable(DateTime64(3, 'UTC')),
            updated_at DateTime64(3, 'UTC')
        """,
        order_by="key_id",
        shard_by="cityHash64(key_id)",
        version="updated_at",
    ),
    # OpenMeter's subjects (display name, metadata) per namespace; the newest version of a key wins.
    Table(
        name=SUBJECTS,
        columns="""
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
        """,
        order_by="(namespace, key)",
        shard_by="cityHash64(namespace, key)",
        version="updated_at",
    ),
    # Portal tokens are signed JWTs; this table lists them and records invalidations (newest wins).
    Table(
        name=PORTAL_TOKENS,
        columns="""
            id String,
            namespace String,
            subject String,
            allowed_meters Array(String),
            created_at DateTime64(3, 'UTC'),
            expires_at DateTime64(3, 'UTC'),
            invalidated_at Nullable(DateTime64(3, 'UTC')),
            updated_at DateTime64(3, 'UTC')
        """,
        order_by="(namespace, id)",
        shard_by="cityHash64(namespace, id)",
        version="updated_at",
    ),
    # Live meters (docs/design.md): one row per change of a meter; the newest version is its state.
    Table(
        name=METER_VERSIONS,
        columns="""
            namespace LowCardinality(String),
            slug String,
            version UInt64,
            action LowCardinality(String),
            id String,
            managed_by String,
            actor String,
            changed_at DateTime64(6, 'UTC'),
            created_at DateTime64(6, 'UTC'),
            generation UInt64,
            active_generation UInt64,
            file_mtime Float64,
            definition String
        """,
        order_by="(namespace, slug, version)",
        shard_by="cityHash64(namespace, slug)",
        # Appending is compare-and-set on the version (adapters/meter_store.py, MeterStore.append): of two
        # inserts of one version with the same insert_deduplication_token, the second is dropped. A plain
        # MergeTree deduplicates only with a window (replicated tables have one by default).
        settings=(f"non_replicated_deduplication_window = {METER_VERSIONS_DEDUP_WINDOW}",),
    ),
    # Progress of a generation's rebuild from stored events; the newest row wins.
    Table(
        name=METER_REBUILDS,
        columns="""
            namespace LowCardinality(String),
            slug String,
            generation UInt64,
            state LowCardinality(String),
            events_done UInt64,
            events_total UInt64,
            owner String,
            updated_at DateTime64(6, 'UTC')
        """,
        order_by="(namespace, slug, generation)",
        shard_by="cityHash64(namespace, slug)",
        version="updated_at",
    ),
    # How far each partition of the events topic is written (processor/progress.py); the newest row wins.
    # complete_until: every message the broker acknowledged before it is written (queries' completeUntil).
    Table(
        name=PARTITION_PROGRESS,
        columns="""
            topic String,
            kafka_partition UInt32,
            log_epoch LowCardinality(String),
            next_offset UInt64,
            complete_until DateTime64(3, 'UTC'),
            updated_at DateTime64(6, 'UTC')
        """,
        order_by="(topic, kafka_partition)",
        shard_by="cityHash64(topic, kafka_partition)",
        version="updated_at",
    ),
    # Windows compaction (meterline/jobs/compaction.py): one row per state of a partition's compaction;
    # the newest wins. `updated_at` is ClickHouse's clock at the write: a record not refreshed within the
    # lease is a compactor that died.
    Table(
        name=WINDOW_COMPACTIONS,
        columns="""
            partition String,
            compaction_id String,
            state LowCardinality(String),
            watermarks Array(Tuple(String, UInt32, UInt64)),
            rows_before UInt64,
            rows_after UInt64,
            owner String,
            updated_at DateTime64(6, 'UTC') DEFAULT now64(6)
        """,
        order_by="(partition, compaction_id)",
        shard_by="cityHash64(partition, compaction_id)",
        version="updated_at",
        # `meter_windows`' partition fingerprint right after the swaps of a done compaction (0: no
        # coarse rows were built): coarse rows answer only while the partition still has it.
        added_columns=("fingerprint UInt64 DEFAULT 0",),
    ),
    # Writers that may write into old `meter_windows` partitions (replays, rebuilds, recompute, dead-letter
    # replay) announce themselves here before they look for compactions (meterline/adapters/compactions.py).
    Table(
        name=WINDOW_WRITERS,
        columns="""
            writer String,
            partitions Array(String),
            state LowCardinality(String),
            updated_at DateTime64(6, 'UTC') DEFAULT now64(6)
        """,
        order_by="writer",
        shard_by="cityHash64(writer)",
        version="updated_at",
    ),
    # Which meter versions each processor worker applies (its heartbeat); the newest row wins.
    Table(
        name=METER_WORKERS,
        columns="""
            worker String,
            applied Map(String, UInt64),
            seen_at DateTime64(6, 'UTC')
        """,
        order_by="worker",
        shard_by="cityHash64(worker)",
        version="seen_at",
    ),
)


def generation_migrations(database: str, topology: Topology = SINGLE_NODE) -> dict[str, list[str]]:
    """Per table, what brings a `meter_windows` / `dead_letters` created before live meters up to date.

    `generation` joins the sorting key at its end: ClickHouse only lets a column added in the same ALTER
    be appended to an existing key (so `added_columns` cannot do it). Old rows get generation 0, which no
    meter definition uses: they are rebuilt into a real generation (docs/design.md, "Live meters").
    """
    db = quote_identifier(database)
    out: dict[str, list[str]] = {}
    for table, key in ((METER_WINDOWS, WINDOWS_ORDER_BY), (DEAD_LETTERS, DEAD_LETTERS_ORDER_BY)):
        target = f"{db}.{storage_name(table, topology)}{on_cluster(topology)}"
        statements = [f"ALTER TABLE {target} ADD COLUMN generation UInt64, MODIFY ORDER BY {key}"]
        if topology.cluster is not None:
            distributed = f"{db}.{table}{on_cluster(topology)}"
            statements.append(f"ALTER TABLE {distributed} ADD COLUMN IF NOT EXISTS generation UInt64")
        out[table] = statements
    return out


def ddl(database: str, topology: Topology = SINGLE_NODE) -> list[str]:
    """Statements that create the database and every table; idempotent (IF NOT EXISTS)."""
    statements = [f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}{on_cluster(topology)}"]
    for table in TABLES:
        statements += table.create(database, topology)
    if topology.cluster is None:  # compaction, hence coarse rows, exist on a single server only
        statements.append(coarse_valid_ddl(database))
    return statements


def coarse_valid_ddl(database: str) -> str:
    """`COARSE_VALID`: a Join-engine table, i.e. an in-memory hash map that `joinGet` reads inside any query
    at no extra cost (a ReplacingMergeTree read would cost a pipeline), persisted by ClickHouse (each
    insert a small file, reloaded at startup). `join_any_take_last_row`: an insert replaces a key's value."""
    return (f"CREATE TABLE IF NOT EXISTS {qualified(database, COARSE_VALID)} (partition String, fingerprint UInt64)\n"
            "ENGINE = Join(ANY, LEFT, partition) SETTINGS join_any_take_last_row = 1")


def join_table_name(database: str, table: str) -> str:
    """A table as `joinGet` names it: `database.table` in a string, unquoted (it does not parse backquotes)."""
    return f"{database}.{table}"


def storage_name(table: str, topology: Topology = SINGLE_NODE) -> str:
    """The table that stores the rows: `table` itself, or `table_local` on every node of a cluster."""
    return table + LOCAL_SUFFIX if topology.cluster is not None else table


def on_cluster(topology: Topology) -> str:
    """` ON CLUSTER 'name'` for statements that must reach every node, else ''."""
    if topology.cluster is None or not topology.on_cluster:
        return ""
    return f" ON CLUSTER {quote_identifier(topology.cluster)}"


def mutation_target(database: str, table: str, topology: Topology = SINGLE_NODE) -> str:
    """What `DELETE FROM` / `ALTER TABLE` must name: the stored rows, on every node of a cluster.

    A Distributed table holds no rows and refuses mutations, so on a cluster this is the local table
    `ON CLUSTER`. With `on_cluster` False the caller must run the statement on every node itself.
    """
    return qualified(database, storage_name(table, topology)) + on_cluster(topology)


def qualified(database: str, table: str) -> str:
    """`database`.table for SQL text; both names come from config and this module, never from requests."""
    return f"{quote_identifier(database)}.{table}"


def bind_if(params: dict[str, Any], where: list[str], name: str, value: Any, condition: str) -> None:
    """Add `condition` (which reads the query parameter `name`) only when a value is given: the one
    spelling of an optional filter, for every SQL builder."""
    if value is not None:
        params[name] = value
        where.append(condition)


def quote_identifier(name: str) -> str:
    """Backquote a database/table identifier; names come from config, never from requests."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(value: str) -> str:
    """A single-quoted SQL string literal (engine arguments take literals, not identifiers)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
