"""Settings for every meterline process, read once in each entrypoint and passed down.

Sources, highest priority first: keyword arguments (tests), environment (`METERLINE_*`, plus the
unprefixed `KAFKA_BOOTSTRAP` / `CLICKHOUSE_URL` that deploy tooling conventionally sets), then the
top-level keys of config.yaml. Meters come from config.yaml's `meters:` list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import AliasChoices, Field
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from meterline.core.meters import Meter, validate_meters

DEFAULT_CONFIG = "config.yaml"


def config_path() -> Path:
    """Where config.yaml lives: `METERLINE_CONFIG`, else ./config.yaml."""
    return Path(os.environ.get("METERLINE_CONFIG", DEFAULT_CONFIG))


class Settings(BaseSettings):
    """Typed service settings. Meter definitions are validated separately by `meterline.core.meters`."""

    model_config = SettingsConfigDict(env_prefix="METERLINE_", extra="ignore", populate_by_name=True)

    config_file: str = Field(default=DEFAULT_CONFIG, validation_alias=AliasChoices("METERLINE_CONFIG", "config_file"))
    kafka_bootstrap: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP", "METERLINE_KAFKA_BOOTSTRAP", "kafka_bootstrap")
    )
    clickhouse_url: str | None = Field(
        default=None, validation_alias=AliasChoices("CLICKHOUSE_URL", "METERLINE_CLICKHOUSE_URL", "clickhouse_url")
    )
    events_topic: str = "meterline-events"
    topic_partitions: int = 8
    consumer_group: str = "meterline-processor"

    dedupe_horizon_days: int = 32
    late_horizon_days: int | None = None
    window_size_seconds: int = 60
    strict_event_types: bool = False

    max_body_bytes: int = 10 * 1024 * 1024
    max_batch_events: int = 10_000
    max_data_bytes: int = 64 * 1024
    max_data_depth: int = 32
    produce_timeout_seconds: float = 5.0

    http_host: str = "127.0.0.1"
    http_port: int = 8888
    data_dir: str = ".data"
    state_dir: str | None = None  # processor's local RocksDB cache; default <data_dir>/processor-<worker>
    processor_batch_messages: int = 200
    processor_batch_seconds: float = 0.2

    meters_raw: list[Any] = Field(default_factory=list, validation_alias=AliasChoices("meters", "meters_raw"))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, init_settings))

    @property
    def clickhouse_database(self) -> str:
        """The database named by the URL path (`http://host:8123/db`), `meterline` by default."""
        path = urlsplit(self.clickhouse_url or "").path.strip("/")
        return path or "meterline"

    def meters(self) -> list[Meter]:
        """The validated meters of config.yaml."""
        return validate_meters({"meters": self.meters_raw}, self.config_file)


class _YamlSource(InitSettingsSource):
    """config.yaml's top-level keys as the lowest-priority source, so one file holds meters and settings."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource) -> None:
        given = getattr(init, "init_kwargs", {})
        path = Path(given.get("config_file") or given.get("METERLINE_CONFIG") or config_path())
        data: dict[str, Any] = {}
        if path.exists():
            loaded = yaml.safe_load(path.read_text()) or {}
            if isinstance(loaded, dict):
                data = dict(loaded)
        data.setdefault("config_file", str(path))
        super().__init__(settings_cls, data)
