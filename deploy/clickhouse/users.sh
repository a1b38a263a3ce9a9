#!/bin/bash
# First start of the ClickHouse container (/docker-entrypoint-initdb.d): meterline's two users, with
# passwords from compose secrets. The writer owns the database (processor inserts, schema, keys,
# portal tokens, subjects); the reader is what the query API reads with: read-only (readonly=2 lets the
# query path still send its per-query limits), bounded time, rows and memory even if a client forgets.
set -euo pipefail
writer=$(cat /run/secrets/clickhouse_password)
reader=$(cat /run/secrets/clickhouse_reader_password)
clickhouse client --multiquery <<SQL
CREATE DATABASE IF NOT EXISTS meterline;
CREATE USER IF NOT EXISTS meterline IDENTIFIED WITH sha256_password BY '${writer}';
GRANT ALL ON meterline.* TO meterline;
CREATE SETTINGS PROFILE IF NOT EXISTS meterline_reader SETTINGS
    readonly = 2, max_execution_time = 30, max_result_rows = 100000, result_overflow_mode = 'throw',
    max_rows_to_group_by = 100000, group_by_overflow_mode = 'throw', max_memory_usage = 4000000000;
CREATE USER IF NOT EXISTS meterline_reader IDENTIFIED WITH sha256_password BY '${reader}'
    SETTINGS PROFILE meterline_reader;
GRANT SELECT ON meterline.* TO meterline_reader;
SQL
