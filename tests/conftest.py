"""Session-wide infrastructure for integration and e2e tests (see tests/infra.py for where it comes from).

Tests get a fresh topic/database name from ``unique_name`` so they never see each other's data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

from meterline.localinfra.broker import LocalBroker
from meterline.localinfra.clickhouse_server import LocalClickHouse
from tests import infra

# Apps the tests build in process (TestClient) serve keyless requests in the default namespace, as
# `make run` does; tests of keys (tests/integration/test_auth.py) turn local mode off explicitly.
os.environ.setdefault("METERLINE_AUTH_LOCAL_MODE", "true")

# Property tests check results, never speed: hypothesis's default 200 ms deadline per example and its
# too-slow health check fail a correct test on a loaded 2-core machine (test_limits's window walk did,
# 3 runs in 5 under load). A test's own @settings still chooses its example count.
settings.register_profile("meterline", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meterline")


@pytest.fixture(scope="session")
def _kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LocalBroker | None]]:
    with infra.kafka(tmp_path_factory.mktemp("broker")) as found:
        yield found


@pytest.fixture(scope="session")
def kafka_bootstrap(_kafka: tuple[str, LocalBroker | None]) -> str:
    """``host:port`` of a Kafka-compatible broker: $KAFKA_BOOTSTRAP, testcontainers Kafka, or local tansu."""
    return _kafka[0]


@pytest.fixture(scope="session")
def broker(_kafka: tuple[str, LocalBroker | None]) -> LocalBroker | None:
    """The LocalBroker we started (for pause/resume), or None when the broker is external."""
    return _kafka[1]


@pytest.fixture(scope="session")
def _clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LocalClickHouse | None]]:
    with infra.clickhouse(tmp_path_factory.mktemp("clickhouse") / "data") as found:
        yield found


@pytest.fixture(scope="session")
def clickhouse_url(_clickhouse: tuple[str, LocalClickHouse | None]) -> str:
    """``http://[user:pass@]host:port`` (no database path): $CLICKHOUSE_URL, testcontainers, or local chdb."""
    return _clickhouse[0]


@pytest.fixture(scope="session")
def clickhouse_server(_clickhouse: tuple[str, LocalClickHouse | None]) -> LocalClickHouse | None:
    """The LocalClickHouse we started (for pause/kill), or None when ClickHouse is external."""
    return _clickhouse[1]


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """``unique_name("events")`` -> ``events_<12 hex>``: a fresh topic or database name per call."""
    return infra.unique
