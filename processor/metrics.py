"""Prometheus metrics of the processor, served at `/metrics` by the worker's Faust web server.

Why Faust's web server rather than `prometheus_client.start_http_server`: one port per worker serves
`/healthz`, `/readyz` and `/metrics` together, and it is already there (see `processor.app`).
Metrics live in the default registry, so `generate_latest()` renders them all.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("meterline_processor_events_total", "CloudEvents read from Kafka (including duplicates)")
ACCEPTED = Counter("meterline_processor_events_accepted_total", "First sightings written to ClickHouse events")
DUPLICATES = Counter("meterline_processor_duplicates_total", "Events dropped as duplicates of an earlier (source, id)")
DEAD_LETTERS = Counter("meterline_processor_dead_letters_total", "Dead-letter rows written", ["reason_code"])
LATE = Counter("meterline_processor_late_events_total", "Events older than late_horizon_days (dead-lettered too_late)")
MESSAGES = Counter("meterline_processor_messages_total", "Kafka messages processed")
BATCHES = Counter("meterline_processor_batches_total", "Batches written to ClickHouse and acked")
ASSIGNED = Gauge("meterline_processor_assigned_partitions", "Partitions of the events topic this worker owns now")
STALE = Counter("meterline_processor_stale_messages_total", "Messages of a revoked generation left unacked")
WRITE_SECONDS = Histogram(
    "meterline_processor_write_seconds", "Wall time of one batch's ClickHouse writes, retries included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
WRITE_RETRIES = Counter("meterline_processor_write_retries_total", "Failed ClickHouse operations retried", ["operation"])
LAST_WRITE = Gauge("meterline_processor_last_write_timestamp_seconds", "Unix time of the last successful batch write")
DEDUPE_LOADED = Counter("meterline_processor_dedupe_keys_loaded_total", "Dedupe keys loaded from ClickHouse")
DEDUPE_CONFLICTS = Counter(
    "meterline_processor_dedupe_conflicts_total",
    "Dedupe keys found stored at two positions (copies on two partitions decided by two workers before "
    "either was written); the later copy is retracted by its partition's owner")
DEDUPE_RETRACTED = Counter(
    "meterline_processor_dedupe_retracted_total",
    "Stored copies retracted after losing to another copy of their key (their windows replaced, rows deleted)")
DEDUPE_UNREPAIRED = Counter(
    "meterline_processor_dedupe_unrepaired_total",
    "Stored copies that lost to another copy of their key but could not be retracted (their month's "
    "windows were compacted first): counted twice; alert on any increase")
RETENTION_LOST = Counter(
    "meterline_processor_retention_lost_offsets_total",
    "Offsets retention deleted before they were processed (the worker stops on them)", ["partition"])
QUARANTINED = Counter("meterline_processor_quarantined_messages_total",
                      "Messages whose rows ClickHouse refused, dead-lettered whole as invalid_event")
PROCESSED_OFFSET = Gauge("meterline_processor_processed_offset",
                         "Per owned partition: every offset below this one is written", ["partition"])
LAG = Gauge("meterline_processor_lag_messages",
            "Per owned partition: messages in the log (broker end offset) not yet written", ["partition"])
OLDEST_UNPROCESSED_AGE = Gauge(
    "meterline_processor_oldest_unprocessed_age_seconds",
    "Per owned partition: upper bound of the age of the oldest message not yet written (0 when caught up); "
    "alert well before it reaches the topic's retention", ["partition"])

# Where a batch's time goes (P2's throughput and P4's freshness are read from these; docs/performance.md).
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2.5, 5, 10, 30)
BATCH_WAIT_SECONDS = Histogram(
    "meterline_processor_batch_wait_seconds",
    "Time the agent waited for a batch after finishing the previous one (fetch + processor_batch_seconds)",
    buckets=_STAGE_BUCKETS,
)
MESSAGE_AGE_SECONDS = Histogram(
    "meterline_processor_message_age_seconds",
    "Age of each message (since its broker timestamp) when its batch starts: ingest linger, broker, fetch, batch wait",
    buckets=_STAGE_BUCKETS,
)
BUILD_SECONDS = Histogram("meterline_processor_build_seconds", "CPU work of one batch: decode, dedupe, meter, rows",
                          buckets=_STAGE_BUCKETS)
FLUSH_SECONDS = Histogram("meterline_processor_dedupe_flush_seconds", "Persisting one batch's dedupe decisions",
                          buckets=_STAGE_BUCKETS)
WRITE_WAIT_SECONDS = Histogram(
    "meterline_processor_write_wait_seconds",
    "Time a decided batch waited for the previous batch's write (the part of the write its build did not hide)",
    buckets=_STAGE_BUCKETS,
)
