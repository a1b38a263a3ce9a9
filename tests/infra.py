"""Where the test broker and ClickHouse come from: the environment, else Docker, else local subprocesses.

Why this order: CI or a developer may point tests at real clusters (``KAFKA_BOOTSTRAP``,
``CLICKHOUSE_URL``); with Docker, testcontainers gives the real Apache Kafka/ClickHouse; without either,
the local tansu broker and chdb ClickHouse run everything. Missing infrastructure is a failure that
names the variable to set, never a silent skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

from meterline.localinfra.broker import LocalBroker, broker_answers
from meterline.localinfra.clickhouse_server import LocalClickHouse, ping
from meterline.localinfra.ports import wait_for
from meterline.localinfra.server import LocalServer

log = logging.getLogger(__name__)

ServerT = TypeVar("ServerT", bound=LocalServer)

KAFKA_ENV = "KAFKA_BOOTSTRAP"
CLICKHOUSE_ENV = "CLICKHOUSE_URL"
CLICKHOUSE_IMAGE = os.environ.get("METERLINE_TEST_CLICKHOUSE_IMAGE", "clickhouse/clickhouse-server:26.9")
KAFKA_IMAGE = os.environ.get("METERLINE_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")


def docker_available() -> bool:
    """True if a Docker daemon answers (``docker info`` succeeds)."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def unique(prefix: str) -> str:
    """A fresh name valid as a Kafka topic and a ClickHouse database: ``prefix_<12 hex>``."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', prefix)}_{uuid.uuid4().hex[:12]}"


def _fail(what: str, env: str, example: str, exc: BaseException) -> NoReturn:
    pytest.fail(f"{what} is not available ({exc}); set {env}={example} to use an existing one", pytrace=False)


@contextlib.contextmanager
def _started(server: ServerT, what: str, env: str, example: str) -> Iterator[ServerT]:
    """Start a local server for the session and stop it afterwards; a failed start fails naming ``env``."""
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - reported as a test failure naming the variable
        server.stop()
        _fail(what, env, example, exc)
    try:
        yield server
    finally:
        server.stop()


def _wait_external(what: str, answers: Callable[[], bool], env: str, external: str, example: str) -> None:
    """Wait for a server named by `env`; one that never answers fails the test naming the variable."""
    try:
        wait_for(answers, 15, f"{what} at {env}={external}")
    except Exception as exc:  # noqa: BLE001 - reported as a test failure naming the variable
        _fail(f"{what} at {external}", env, example, exc)


@contextlib.contextmanager
def kafka(log_dir: Path) -> Iterator[tuple[str, LocalBroker | None]]:
    """Yield ``(bootstrap, LocalBroker or None)``; the broker object only when we started tansu."""
    external = os.environ.get(KAFKA_ENV)
    if external:
        _wait_external("Kafka", lambda: broker_answers(external), KAFKA_ENV, external, "host:9092")
        yield external, None
    elif docker_available():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE) as container:
            yield container.get_bootstrap_server(), None
    else:
        with _started(LocalBroker(log_dir), "the local tansu broker", KAFKA_ENV, "host:9092") as broker:
            yield broker.bootstrap, broker


@contextlib.contextmanager
def clickhouse(data_dir: Path) -> Iterator[tuple[str, LocalClickHouse | None]]:
    """Yield ``(server url without database, LocalClickHouse or None)``."""
    external = os.environ.get(CLICKHOUSE_ENV)
    if external:
        base = re.sub(r"^(https?://[^/]+).*$", r"\1", external.rstrip("/"))
        _wait_external("ClickHouse", lambda: ping(base), CLICKHOUSE_ENV, external, "http://host:8123")
        yield base, None
    elif docker_available():
        from testcontainers.community.clickhouse import ClickHouseContainer

        with ClickHouseContainer(CLICKHOUSE_IMAGE) as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(8123)
            url = f"http://{container.username}:{container.password}@{host}:{port}"
            wait_for(lambda: ping(f"http://{host}:{port}"), 60, f"ClickHouse container at {host}:{port}")
            yield url, None
    else:
        local = LocalClickHouse(data_dir)
        with _started(local, "the local chdb ClickHouse", CLICKHOUSE_ENV, "http://host:8123") as server:
            yield server.url, server
