"""Settings for every meterline process, read once in each entrypoint and passed down.

Sources, highest priority first: keyword arguments (tests), environment (`METERLINE_<FIELD>`, plus the
unprefixed `KAFKA_BOOTSTRAP` / `CLICKHOUSE_URL` that deploy tooling conventionally sets), then the
top-level keys of config.yaml (pydantic-settings' own `YamlConfigSettingsSource`). Meters come from
config.yaml's `meters:` list and are validated by `meterline.core.meters`, apart from the settings:
`Settings()` raises only for settings, and `Settings.meters()` for meters. Why: meters live in the durable
meter store, so a process with a broken `meters:` list (even one that is not YAML) starts with the stored
meters and says loudly why the file was not applied (docs/design.md, "Live meters"); settings exist only
here, so a process never guesses them.

Why unknown keys are errors: a misspelt key (`late_horizon_day: 1`) that is silently ignored leaves the
default in force while `meterline validate-config` says OK, so an operator believes a rule is active
that is not. Every settings problem is raised as one `ConfigError` naming where it came from (file and
key, or the environment variable), which `validate-config` prints and every process refuses to start with.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from meterline.core.errors import ConfigError
from meterline.core.meters import Meter, read_config, validate_meters
from meterline.core.schema import Topology

DEFAULT_CONFIG = "config.yaml"
ENV_PREFIX = "METERLINE_"
CONFIG_ENV = "METERLINE_CONFIG"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


def config_path() -> Path:
    """Where config.yaml lives: `METERLINE_CONFIG`, else ./config.yaml."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


class Settings(BaseSettings):
    """Typed service settings: every knob of every process, with its environment name `METERLINE_<FIELD>`.

    Building one raises `ConfigError` listing every unknown key and every invalid value with its origin.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True)

    config_file: str = Field(default=DEFAULT_CONFIG, validation_alias=AliasChoices(CONFIG_ENV, "config_file"))
    kafka_bootstrap: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP", "METERLINE_KAFKA_BOOTSTRAP", "kafka_bootstrap")
    )
    clickhouse_url: str | None = Field(
        default=None, validation_alias=AliasChoices("CLICKHOUSE_URL", "METERLINE_CLICKHOUSE_URL", "clickhouse_url")
    )
    # Kafka authentication (meterline/adapters/kafka.py `kafka_client_config`; deploy/ uses SASL/SCRAM). No
    # username = no authentication (PLAINTEXT); a username alone implies SASL_PLAINTEXT. The password is
    # given inline or as a file (a compose/Kubernetes secret), like the other secrets.
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: str | None = None
    kafka_ssl_cafile: str | None = None  # SASL_SSL: the CA that signed the brokers' certificates (else the system's)
    #: The password of clickhouse_url's user, read from a file (a compose/Kubernetes secret) rather than
    #: written into the URL; the query API's reads may use another (read-only) user: clickhouse_read_url.
    clickhouse_password_file: str | None = None
    clickhouse_read_url: str | None = None
    clickhouse_read_password_file: str | None = None
    #: A ClickHouse cluster (a `<remote_servers>` name): tables become `<name>_local` on every node plus a
    #: Distributed table sharded by subject, created ON CLUSTER (docs/design.md, "ClickHouse cluster mode").
    clickhouse_cluster: str | None = Field(default=None, min_length=1)
    #: With a cluster: ReplicatedReplacingMergeTree under the nodes' {shard}/{replica} macros (needs a keeper);
    #: false = shards without replicas (plain ReplacingMergeTree).
    clickhouse_replicated: bool = True
    #: A cluster without distributed DDL (no keeper, such as the embedded test cluster): the URL of every
    #: node, comma-separated. Mutations then run on each node's local table instead of `ON CLUSTER`.
    clickhouse_node_urls: str | None = Field(default=None, min_length=1)
    events_topic: str = Field(default="meterline-events", min_length=1)
    topic_partitions: int = Field(default=8, ge=1)
    consumer_group: str = Field(default="meterline-processor", min_length=1)
    #: How the processor creates the events topic when it is missing (an existing topic is left alone).
    #: Safe defaults for a real cluster; the local broker and single-node compose set 1 and 1.
    topic_replication_factor: int = Field(default=3, ge=1)
    topic_min_insync_replicas: int = Field(default=2, ge=1)
    #: Must exceed the longest processing outage you accept: what expires unprocessed is lost.
    topic_retention_hours: int = Field(default=14 * 24, ge=1)
    #: Whether ingest creates a missing topic at startup (tests, quick starts). In production the
    #: processor (or the operator) creates it with the settings above; ingest only publishes.
    ingest_creates_topic: bool = False

    dedupe_horizon_days: int = Field(default=32, ge=1)
    #: A worker taking over a partition it has no keys of loads them sorted by key and writes them as SST
    #: files RocksDB ingests whole (processor/dedupe.py); false: key by key, as before (a fallback).
    dedupe_bulk_load: bool = True
    late_horizon_days: int | None = Field(default=None, ge=1)
    window_size_seconds: int = Field(default=60, ge=1)
    #: Windows compaction (meterline/jobs/compaction.py): a month is compacted once it ended this long
    #: before `complete_until - late horizon`; also the clock skew tolerated between hosts (half of it).
    compaction_margin_minutes: int = Field(default=60, ge=1)
    #: The API process compacts every this many seconds beside the meter controller (None: only
    #: `meterline compact`).
    compaction_interval_seconds: float | None = Field(default=None, gt=0)
    strict_event_types: bool = False

    # ingest
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_batch_events: int = Field(default=10_000, ge=1)
    max_data_bytes: int = Field(default=64 * 1024, ge=1)
    max_data_depth: int = Field(default=32, ge=1)
    produce_timeout_seconds: float = Field(default=5.0, gt=0)
    #: The largest Kafka record the topic accepts (its `max.message.bytes`; Kafka's default is 1048588).
    #: Ingest cuts messages below it and answers 413, before producing anything, for an event that alone
    #: cannot fit -- a broker refusal after part of a request was delivered would be a 503 that never heals.
    max_message_bytes: int = Field(default=1_000_000, ge=16 * 1024)
    #: While this file exists, ingest answers 503 (`meterline run` creates it to drain before stopping).
    drain_file: str | None = None

    # HTTP server (`meterline serve` / `meterline run` defaults)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8888, ge=0, le=65535)
    #: uvicorn's `limit_concurrency`: connections plus tasks beyond this get a 503 at once instead of
    #: queueing without bound (memory) while every client times out.
    http_limit_concurrency: int = Field(default=1000, ge=1)
    log_level: LogLevel = "info"
    #: Written by `meterline run`'s supervisor; when set, /readyz also reports the processes it keeps up.
    supervisor_status_file: str | None = None

    # processor worker
    data_dir: str = ".data"
    state_dir: str | None = None  # processor's local RocksDB cache; default <data_dir>/processor-<worker>
    processor_batch_messages: int = Field(default=200, ge=1)
    processor_batch_seconds: float = Field(default=0.2, gt=0)
    #: How long the worker's consumer lets the broker hold a fetch for more data. Faust hard-codes
    #: aiokafka's 1500 ms, and against the local broker a fetch then answers only every ~0.5 s however
    #: much is waiting: half of P4's freshness (docs/performance.md). 50 ms costs an idle worker 20 small
    #: fetches a second.
    processor_fetch_max_wait_ms: int = Field(default=50, ge=1, le=60_000)
    #: How often every process looks for meter changes, and how long a silent processor worker still
    #: holds up a rebuild (docs/design.md, "Live meters").
    meter_poll_seconds: float = Field(default=1.0, gt=0)
    meter_worker_ttl_seconds: float = Field(default=15.0, gt=0)
    #: Broker session and rebalance timeouts: Faust's default 60 s makes every group join wait ~30 s.
    processor_session_timeout: float = Field(default=10.0, gt=0)
    processor_rebalance_timeout: float = Field(default=10.0, gt=0)
    processor_heartbeat: float = Field(default=2.0, gt=0)
    #: /healthz /readyz /metrics of a worker; port 0 = a free port.
    processor_web_port: int = Field(default=0, ge=0, le=65535)
    processor_web_host: str = "127.0.0.1"
    #: Names the worker's local state dir; unset = one per run (host + web port), removed on exit.
    processor_worker_id: str | None = None

    # Access (meterline/adapters/auth.py). Keys are verified with an HMAC under this server secret, which
    # every process (ingest, query, the `keys` CLI) must share; give it inline or as a file (a secret).
    auth_secret: SecretStr | None = None
    auth_secret_file: str | None = None
    # Local mode: requests WITHOUT a key act in `auth_local_namespace` with every scope. Only for a
    # server bound to loopback (`meterline serve` refuses otherwise); a presented key is always checked.
    auth_local_mode: bool = False
    auth_local_namespace: str = "default"
    portal_token_ttl_seconds: int = Field(default=3600, gt=0, le=31 * 86400)  # portal tokens are short-lived
    auth_refresh_seconds: float = Field(default=2.0, gt=0)  # how stale a process's view of keys and invalidations may get

    # Limits (meterline/adapters/limits.py, query/cost.py). Rates use `limits` notation ("100/second",
    # "6000/minute") and count per key and per process.
    rate_limit_requests: str = "500/second"
    rate_limit_events: str = "200000/second"
    max_concurrent_requests: int = Field(default=32, ge=1)  # per key and process, beyond which 429
    query_max_windows: int = Field(default=1_000_000, ge=1000)  # windows x named series a query may span
    query_max_rows: int = Field(default=100_000, ge=1000)  # rows (windows x series with data) of an answer
    query_timeout_seconds: float = Field(default=30.0, gt=0)  # ClickHouse max_execution_time of reads

    #: config.yaml's `meters:` as written (validated by `meters()`, not here: see the module docstring).
    meters_raw: Any = Field(default_factory=list, validation_alias=AliasChoices("meters", "meters_raw"))

    @model_validator(mode="after")
    def _passwords_from_files(self) -> Settings:
        """Put each password file's secret into its URL (the URL names the user, the file its password)."""
        self.clickhouse_url = _with_password(self.clickhouse_url, self.clickhouse_password_file)
        self.clickhouse_read_url = _with_password(self.clickhouse_read_url, self.clickhouse_read_password_file)
        return self

    @property
    def clickhouse_reader_url(self) -> str | None:
        """Where the query API reads: clickhouse_read_url (e.g. a read-only user), else clickhouse_url."""
        return self.clickhouse_read_url or self.clickhouse_url

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError("\n".join(_problems(type(self), exc, values))) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = getattr(init_settings, "init_kwargs", {})
        path = given.get("config_file") or given.get(CONFIG_ENV) or config_path()
        return (init_settings, env_settings, ConfigFileSource(settings_cls, Path(path)))

    @property
    def clickhouse_topology(self) -> Topology:
        """Where the tables live: one server, or every node of `clickhouse_cluster`."""
        nodes = tuple(u.strip() for u in (self.clickhouse_node_urls or "").split(",") if u.strip())
        return Topology(cluster=self.clickhouse_cluster, replicated=self.clickhouse_replicated,
                        on_cluster=not nodes, nodes=nodes)

    @property
    def clickhouse_database(self) -> str:
        """The database named by the URL path (`http://host:8123/db`), `meterline` by default."""
        path = urlsplit(self.clickhouse_url or "").path.strip("/")
        return path or "meterline"

    def auth_secret_bytes(self) -> bytes | None:
        """The server secret for key hashes and portal token signatures, or None if not configured."""
        if self.auth_secret is not None:
            value = self.auth_secret.get_secret_value()
        elif self.auth_secret_file:
            value = Path(self.auth_secret_file).read_text().strip()
        else:
            return None
        if len(value) < 32:
            raise ConfigError("auth_secret must be at least 32 characters (e.g. `openssl rand -base64 32`)")
        return value.encode()

    def meters(self) -> list[Meter]:
        """The validated meters of config.yaml; ConfigError listing every meter problem."""
        return validate_meters({"meters": self.meters_raw}, self.config_file)


def _with_password(url: str | None, password_file: str | None) -> str | None:
    if url is None or password_file is None:
        return url
    parts = urlsplit(url)
    password = quote(Path(password_file).read_text().strip(), safe="")
    netloc = f"{quote(parts.username or 'default', safe='')}:{password}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class ConfigFileSource(YamlConfigSettingsSource):
    """config.yaml's top-level keys, the lowest-priority source, so one file holds meters and settings.

    Refuses a file that is not YAML or not a mapping with `ConfigError` naming the file (pydantic-settings
    would raise a bare parser or `TypeError`), except a YAML error inside the `meters:` block alone: the
    settings are then read and `meters` carries the error (`meterline.core.meters.read_config`).
    """

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self.path = path
        super().__init__(settings_cls, yaml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            text = Path(file_path).read_text(encoding=self.yaml_file_encoding or "utf-8")
        except OSError as exc:
            raise ConfigError(f"{file_path}: cannot read: {exc.strerror or exc}") from None
        return read_config(text, str(file_path))


def _problems(cls: type[Settings], exc: ValidationError, given: dict[str, Any]) -> list[str]:
    """One line per error, prefixed with where the offending key came from (file, environment, argument)."""
    path = Path(given.get("config_file") or given.get(CONFIG_ENV) or config_path())
    from_file = ConfigFileSource(cls, path).yaml_data
    from_env = EnvSettingsSource(cls)()
    names = sorted({*cls.model_fields, "meters"})
    problems = []
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, names, n=1)
            message = "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")
        else:
            message = error["msg"]
        if key in given:
            where = f"argument {key}"
        elif key in from_env:
            where = f"environment {key if key.isupper() else ENV_PREFIX + key.upper()}"
        elif key in from_file:
            where = f"{path}: {key}"
        else:
            where = key
        problems.append(f"{where}: {message}")
    return problems
