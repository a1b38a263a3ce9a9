"""One real pipeline per e2e module: broker + ClickHouse (session fixtures), a Faust worker and the
HTTP server as subprocesses on free ports, stopped by PID at the end even when a test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meterline.localinfra.stack import LocalStack

E2E_CONFIG = """
meters:
  - slug: tokens_total
    eventType: prompt
    aggregation: SUM
    valueProperty: $.tokens
    groupBy: {model: $.model, type: $.type}
  - slug: prompt_count
    eventType: prompt
    aggregation: COUNT
    groupBy: {model: $.model}
  - slug: tokens_avg
    eventType: prompt
    aggregation: AVG
    valueProperty: $.tokens
  - slug: tokens_min
    eventType: prompt
    aggregation: MIN
    valueProperty: $.tokens
  - slug: tokens_max
    eventType: prompt
    aggregation: MAX
    valueProperty: $.tokens
  - slug: active_users
    eventType: activity
    aggregation: UNIQUE_COUNT
    valueProperty: $.user_id
  - slug: storage_latest
    eventType: storage
    aggregation: LATEST
    valueProperty: $.bytes
    groupBy: {tier: $.tier}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, clickhouse_url: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("stack")
    config = root / "config.yaml"
    config.write_text(E2E_CONFIG)
    with LocalStack(
        data_dir=root,
        config_file=config,
        processors=1,
        partitions=4,
        kafka_bootstrap=kafka_bootstrap,
        clickhouse_url=clickhouse_url,
    ) as running:
        yield running
