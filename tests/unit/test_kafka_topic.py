"""meterline.adapters.kafka: the events topic is created with the configured durability, not client defaults."""

from __future__ import annotations

from pathlib import Path

from meterline.adapters.kafka import events_topic_config
from meterline.settings import Settings


def test_events_topic_config_follows_settings(tmp_path: Path) -> None:
    settings = Settings(config_file=str(tmp_path / "absent.yaml"), topic_replication_factor=5,
                        topic_min_insync_replicas=3, topic_retention_hours=36)
    replication, config = events_topic_config(settings)
    assert replication == 5
    assert int(config["retention.ms"]) == 36 * 3600 * 1000
    assert config["min.insync.replicas"] == "3"
    assert config["message.timestamp.type"] == "LogAppendTime"  # broker time: monotonic per partition


def test_defaults_are_safe_for_a_real_cluster(tmp_path: Path) -> None:
    settings = Settings(config_file=str(tmp_path / "absent.yaml"))
    replication, config = events_topic_config(settings)
    assert replication >= 3 and 2 <= int(config["min.insync.replicas"]) < replication
    assert not settings.ingest_creates_topic
