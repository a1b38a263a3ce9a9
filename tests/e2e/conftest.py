"""One real pipeline per e2e module: broker + ClickHouse (session fixtures), a Faust worker and the
HTTP server as subprocesses on free ports, stopped by PID at the end even when a test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meterline.localinfra.stack import LocalStack
from tests.oracle import OracleMeter, config_yaml

METERS = {
    m.slug: m
    for m in (
        OracleMeter("tokens_total", "prompt", "SUM", "tokens", ("model", "type")),
        OracleMeter("prompt_count", "prompt", "COUNT", None, ("model",)),
        OracleMeter("tokens_avg", "prompt", "AVG", "tokens"),
        OracleMeter("tokens_min", "prompt", "MIN", "tokens"),
        OracleMeter("tokens_max", "prompt", "MAX", "tokens"),
        OracleMeter("active_users", "activity", "UNIQUE_COUNT", "user_id"),
        OracleMeter("storage_latest", "storage", "LATEST", "bytes", ("tier",)),
        # tests/e2e/test_exact_decimals.py: values at the edges of Decimal128(9)
        OracleMeter("big_count", "big", "COUNT"),
        OracleMeter("big_sum", "big", "SUM", "v"),
        OracleMeter("big_avg", "big", "AVG", "v"),
        OracleMeter("big_min", "big", "MIN", "v"),
        OracleMeter("big_max", "big", "MAX", "v"),
        OracleMeter("big_latest", "big", "LATEST", "v"),
    )
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, clickhouse_url: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("stack")
    config = root / "config.yaml"
    config.write_text(config_yaml(METERS.values()))
    with LocalStack(
        data_dir=root,
        config_file=config,
        processors=1,
        partitions=4,
        kafka_bootstrap=kafka_bootstrap,
        clickhouse_url=clickhouse_url,
    ) as running:
        yield running
