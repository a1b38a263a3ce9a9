"""Settings: config.yaml < environment < arguments, unknown keys and bad values named by origin.

Each test writes its own config.yaml and sets its own environment; the expected values are the ones the
test wrote, never read back through meterline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meterline.cli import app
from meterline.core.errors import ConfigError
from meterline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No inherited METERLINE_* / KAFKA_BOOTSTRAP / CLICKHOUSE_URL, and no ./config.yaml in reach."""
    for name in list(os.environ):
        if name.upper().startswith("METERLINE_") or name.upper() in ("KAFKA_BOOTSTRAP", "CLICKHOUSE_URL"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_values_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, "late_horizon_days: 3\nprocessor_session_timeout: 4.5\nlog_level: DEBUG\n")
    s = Settings(config_file=str(path))
    assert (s.late_horizon_days, s.processor_session_timeout, s.log_level) == (3, 4.5, "debug")


def test_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "topic_partitions: 5\n", name="elsewhere.yaml")
    monkeypatch.setenv("METERLINE_CONFIG", str(path))
    s = Settings()
    assert (s.topic_partitions, s.config_file) == (5, str(path))


def test_env_overrides_file_and_arguments_override_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "dedupe_horizon_days: 10\nevents_topic: from-file\nmax_batch_events: 7\n")
    monkeypatch.setenv("METERLINE_DEDUPE_HORIZON_DAYS", "20")
    monkeypatch.setenv("METERLINE_EVENTS_TOPIC", "from-env")
    s = Settings(config_file=str(path), events_topic="from-argument")
    assert (s.dedupe_horizon_days, s.events_topic, s.max_batch_events) == (20, "from-argument", 7)


@pytest.mark.parametrize(
    ("env_name", "field", "raw", "expected"),
    [
        ("METERLINE_PROCESSOR_SESSION_TIMEOUT", "processor_session_timeout", "3.5", 3.5),
        ("METERLINE_PROCESSOR_REBALANCE_TIMEOUT", "processor_rebalance_timeout", "7", 7.0),
        ("METERLINE_PROCESSOR_HEARTBEAT", "processor_heartbeat", "0.5", 0.5),
        ("METERLINE_PROCESSOR_WEB_PORT", "processor_web_port", "18081", 18081),
        ("METERLINE_PROCESSOR_WEB_HOST", "processor_web_host", "0.0.0.0", "0.0.0.0"),
        ("METERLINE_PROCESSOR_WORKER_ID", "processor_worker_id", "w-1", "w-1"),
        ("METERLINE_LOG_LEVEL", "log_level", "WARNING", "warning"),
        ("METERLINE_PRODUCE_TIMEOUT_SECONDS", "produce_timeout_seconds", "1.25", 1.25),
        ("METERLINE_STRICT_EVENT_TYPES", "strict_event_types", "true", True),
    ],
)
def test_every_process_knob_has_its_environment_name(
    env_name: str, field: str, raw: str, expected: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert getattr(Settings(), field) != expected
    monkeypatch.setenv(env_name, raw)
    assert getattr(Settings(), field) == expected


@pytest.mark.parametrize("prefix", ["", "METERLINE_"])
def test_unprefixed_infrastructure_aliases(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prefix + "KAFKA_BOOTSTRAP", "broker:9092")
    monkeypatch.setenv(prefix + "CLICKHOUSE_URL", "http://ch:8123/usage")
    s = Settings()
    assert (s.kafka_bootstrap, s.clickhouse_url, s.clickhouse_database) == ("broker:9092", "http://ch:8123/usage", "usage")


def test_env_alias_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "kafka_bootstrap: file:9092\nclickhouse_url: http://file:8123/a\n")
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "env:9092")
    s = Settings(config_file=str(path))
    assert (s.kafka_bootstrap, s.clickhouse_url) == ("env:9092", "http://file:8123/a")


def test_unknown_key_is_named_with_file_and_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "late_horizon_day: 1\nbogus_knob: x\n")
    with pytest.raises(ConfigError) as caught:
        Settings(config_file=str(path))
    lines = str(caught.value).splitlines()
    assert f"{path}: late_horizon_day: unknown setting (did you mean late_horizon_days?)" in lines
    assert any(line.startswith(f"{path}: bogus_knob: unknown setting") for line in lines)
    assert len(lines) == 2


def test_unknown_argument_is_an_error() -> None:
    with pytest.raises(ConfigError, match="argument late_horizon_day: unknown setting"):
        Settings(late_horizon_day=1)


def test_unrelated_prefixed_environment_is_not_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test harness knobs (METERLINE_FAULT_*) share the prefix; only config keys are checked."""
    monkeypatch.setenv("METERLINE_FAULT_EVENTS", "10")
    assert Settings().topic_partitions == 8


@pytest.mark.parametrize(
    ("yaml_text", "key", "fragment"),
    [
        ("topic_partitions: many\n", "topic_partitions", "valid integer"),
        ("topic_partitions: 0\n", "topic_partitions", "greater than or equal to 1"),
        ("produce_timeout_seconds: -1\n", "produce_timeout_seconds", "greater than 0"),
        ("log_level: loud\n", "log_level", "'debug'"),
        ("strict_event_types: maybe\n", "strict_event_types", "valid boolean"),
        ("processor_web_port: 70000\n", "processor_web_port", "less than or equal to 65535"),
    ],
)
def test_bad_file_value_names_file_and_key(tmp_path: Path, yaml_text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as caught:
        Settings(config_file=str(path))
    (line,) = str(caught.value).splitlines()
    assert line.startswith(f"{path}: {key}: ") and fragment in line


def test_bad_env_value_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "processor_heartbeat: 1\n")
    monkeypatch.setenv("METERLINE_PROCESSOR_HEARTBEAT", "soon")
    with pytest.raises(ConfigError) as caught:
        Settings(config_file=str(path))
    (line,) = str(caught.value).splitlines()
    assert line.startswith("environment METERLINE_PROCESSOR_HEARTBEAT: ") and "valid number" in line


@pytest.mark.parametrize(("text", "fragment"), [("- a\n- b\n", "top level must be a mapping"),
                                                ("a: [1\n", "invalid YAML")])
def test_unreadable_file_is_named(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=fragment) as caught:
        Settings(config_file=str(path))
    assert str(path) in str(caught.value)


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert Settings(config_file=str(tmp_path / "absent.yaml")).meters() == []


def test_validate_config_lists_settings_and_meter_problems_together(tmp_path: Path) -> None:
    path = write(tmp_path, """
late_horizon_day: 1
max_body_bytes: lots
meters:
  - slug: Bad Slug
    eventType: x
    aggregation: COUNT
""")
    result = CliRunner().invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"{path}: late_horizon_day: unknown setting (did you mean late_horizon_days?)" in lines
    assert any(line.startswith(f"{path}: max_body_bytes: ") for line in lines)
    assert any(line.startswith(f"{path}: meters[0] (Bad Slug).slug") for line in lines)
    assert "OK" not in result.output


def test_validate_config_checks_the_environment_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "meters: []\n")
    assert CliRunner().invoke(app, ["validate-config", str(path)]).exit_code == 0
    monkeypatch.setenv("METERLINE_MAX_DATA_DEPTH", "deep")
    result = CliRunner().invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 1 and "environment METERLINE_MAX_DATA_DEPTH:" in result.output


@pytest.mark.parametrize("argv", [["-m", "processor"], ["-m", "meterline.cli", "serve", "ingest"]])
def test_processes_refuse_to_start_naming_the_key(tmp_path: Path, argv: list[str]) -> None:
    path = write(tmp_path, "late_horizon_day: 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(METERLINE_CONFIG=str(path), KAFKA_BOOTSTRAP="127.0.0.1:1", CLICKHOUSE_URL="http://127.0.0.1:1/x")
    done = subprocess.run([sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode != 0
    assert f"{path}: late_horizon_day: unknown setting" in done.stdout + done.stderr


def test_cluster_settings_become_a_topology(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from meterline.core.schema import SINGLE_NODE, Topology

    empty = tmp_path / "config.yaml"
    empty.write_text("meters: []\n")
    assert Settings(config_file=str(empty)).clickhouse_topology == SINGLE_NODE
    monkeypatch.setenv("METERLINE_CLICKHOUSE_CLUSTER", "prod")
    monkeypatch.setenv("METERLINE_CLICKHOUSE_REPLICATED", "false")
    assert Settings(config_file=str(empty)).clickhouse_topology == Topology(cluster="prod", replicated=False)
    # A cluster without distributed DDL: no ON CLUSTER, and every node named for per-node mutations.
    monkeypatch.setenv("METERLINE_CLICKHOUSE_NODE_URLS", "http://a:8123, http://b:8123")
    assert Settings(config_file=str(empty)).clickhouse_topology == Topology(
        cluster="prod", replicated=False, on_cluster=False, nodes=("http://a:8123", "http://b:8123"))


BROKEN_METERS = """
late_horizon_days: 3
meters:
- slug: calls
  eventType: prompt
  aggregation: COUNT
  groupBy: {model: $.model
window_size_seconds: 120
"""


@pytest.mark.parametrize(("meters", "fragment"), [
    (BROKEN_METERS, "meters: invalid YAML"),  # not YAML inside the meters block only
    ("late_horizon_days: 3\nwindow_size_seconds: 120\nmeters: {calls: 1}\n", "meters: must be a list"),
    ("late_horizon_days: 3\nwindow_size_seconds: 120\nmeters:\n  - slug: c\n    aggregation: MEDIAN\n",
     "meters[0] (c).eventType"),
])
def test_broken_meters_leave_the_settings_readable(tmp_path: Path, meters: str, fragment: str) -> None:
    """Meters live in the store (a process starts with the stored ones); settings only here: a broken
    meters list must not make the settings unreadable, and meters() still names every problem."""
    path = write(tmp_path, meters)
    settings = Settings(config_file=str(path))
    assert (settings.late_horizon_days, settings.window_size_seconds) == (3, 120)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
        settings.meters()
    assert str(path) in str(caught.value)
    result = CliRunner().invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 1 and fragment in result.output and "OK" not in result.output


@pytest.mark.parametrize("text", [
    "late_horizon_days: [3\nmeters: []\n",  # the settings block is broken: settings unknown
    "meters:\n  - &m {slug: a, eventType: x, aggregation: COUNT}\n  - [\nevents_topic: *m\n",  # an alias into meters
    "---\nmeters: [\n",  # not a plain block-style file
])
def test_a_file_whose_settings_cannot_be_read_still_refuses(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="invalid YAML"):
        Settings(config_file=str(path))
