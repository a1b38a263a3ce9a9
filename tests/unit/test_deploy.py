"""The compose file is what operators run on real clusters; keep it parseable and complete."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_names_every_service() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "clickhouse", "ingest", "processor", "query"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert services["processor"]["deploy"]["replicas"] == 2


def test_services_take_addresses_from_env() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in ("ingest", "processor", "query"):
        env = compose["services"][name]["environment"]
        assert env["KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["CLICKHOUSE_URL"].startswith("http://clickhouse:8123/")


