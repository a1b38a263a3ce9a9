"""deploy/ agrees with the code it runs: what operators start must be what meterline understands.

Each check reads the deploy files and asks the code (Settings, the CLI parser, pyproject's package
list) rather than restating values, so a renamed setting, command or package fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from meterline.cli import app
from meterline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
#: Services running the meterline image (the others are the infrastructure they use).
OURS = sorted(name for name, svc in SERVICES.items() if svc.get("image") == "meterline:latest")


def env_names() -> set[str]:
    """Every environment variable Settings reads: METERLINE_<FIELD> plus declared aliases."""
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"METERLINE_{name.upper()}")
        choices = getattr(field.validation_alias, "choices", ())
        names.update(c for c in choices if isinstance(c, str) and c.isupper())
    return names


@pytest.fixture
def compose_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what compose sets; the config file is the repository's, as the image copies it."""
    for name in list(os.environ):
        if name.upper().startswith("METERLINE_") or name.upper() in ("KAFKA_BOOTSTRAP", "CLICKHOUSE_URL"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT)


def test_meterline_services_exist() -> None:
    assert {"ingest", "processor", "query"} <= set(OURS)


@pytest.mark.parametrize("service", OURS)
def test_every_environment_variable_is_a_setting(service: str) -> None:
    """An unknown name would be silently ignored by the environment source, unlike a config.yaml key."""
    unknown = set(SERVICES[service]["environment"]) - env_names()
    assert not unknown, f"{service} sets variables meterline does not read: {sorted(unknown)}"


@pytest.mark.parametrize("service", OURS)
def test_environment_points_at_the_compose_infrastructure(service: str, compose_env: None,
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = _with_secret_files(service, tmp_path)
    env["METERLINE_CONFIG"] = str(ROOT / "config.yaml")  # the image's /app/config.yaml is this file
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    assert settings.meters(), "the shipped config defines meters"
    kafka_host, kafka_port = str(settings.kafka_bootstrap).split(":")
    assert kafka_host in SERVICES and f"PLAINTEXT://:{kafka_port}" in SERVICES[kafka_host]["environment"]["KAFKA_LISTENERS"]
    ch = urlsplit(str(settings.clickhouse_url))
    assert ch.hostname in SERVICES and f"localhost:{ch.port}" in " ".join(SERVICES[ch.hostname]["healthcheck"]["test"])
    assert set(SERVICES[service]["depends_on"]) == {kafka_host, ch.hostname}
    if service == "processor":
        replicas = SERVICES[service]["deploy"]["replicas"]
        assert 1 <= replicas <= settings.topic_partitions, "a replica beyond the partition count would idle"


def _with_secret_files(service: str, tmp_path: Path) -> dict[str, str]:
    """The service's environment with each /run/secrets/<name> replaced by a local file of that name."""
    env = {k: str(v) for k, v in SERVICES[service]["environment"].items()}
    for k, v in env.items():
        if v.startswith("/run/secrets/"):
            name = v.removeprefix("/run/secrets/")
            assert name in SERVICES[service].get("secrets", []), f"{service}: {k} names secret {name} it is not given"
            (tmp_path / name).write_text(f"{name}-value-0123456789-0123456789\n")
            env[k] = str(tmp_path / name)
    return env


@pytest.mark.parametrize("service", OURS)
def test_secure_by_default(service: str, compose_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Served beyond loopback with keys verifiable, never keyless; passwords from secrets, never in the file."""
    from meterline.adapters.auth import check_exposure

    for k, v in _with_secret_files(service, tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("METERLINE_CONFIG", str(ROOT / "config.yaml"))
    settings = Settings()
    assert not settings.auth_local_mode
    check_exposure(settings, "0.0.0.0")  # what the command binds inside the container
    from urllib.parse import unquote

    for url, secret in ((settings.clickhouse_url, "clickhouse_password"),
                        (settings.clickhouse_read_url, "clickhouse_reader_password")):
        if url is not None:  # the password is the secret file's content
            assert unquote(urlsplit(url).password or "") == (tmp_path / secret).read_text().strip()
    assert all(":" not in urlsplit(str(v)).netloc.split("@")[0] for v in SERVICES[service]["environment"].values()
               if str(v).startswith("http")), "no password written into compose"
    if service == "query":
        assert urlsplit(str(settings.clickhouse_reader_url)).username == "meterline_reader"


def test_only_the_api_is_published_and_only_on_loopback() -> None:
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        if name not in OURS:
            assert not svc.get("ports"), f"infrastructure service {name} must not be published"
    users = (DEPLOY / "clickhouse" / "users.sh").read_text()
    assert "./clickhouse/users.sh:/docker-entrypoint-initdb.d/users.sh:ro" in SERVICES["clickhouse"]["volumes"]
    assert "readonly = 2" in users and "GRANT SELECT ON meterline.* TO meterline_reader" in users


@pytest.mark.parametrize("service", OURS)
def test_command_is_a_real_entrypoint(service: str) -> None:
    argv = SERVICES[service]["command"]
    assert argv[:2] == ["python", "-m"]
    if argv[2] == "processor":
        from processor.app import main  # noqa: F401 - `python -m processor` runs processor.app.main
        assert len(argv) == 3
        return
    assert argv[2] == "meterline.cli"
    command = typer.main.get_command(app)
    ctx = command.make_context("meterline", list(argv[3:]), resilient_parsing=False)
    sub = command.get_command(ctx, argv[3])  # type: ignore[attr-defined]
    assert sub is not None, f"no such command: {argv[3]}"
    params = sub.make_context(argv[3], list(argv[4:])).params
    published = {int(p.split(":")[1]) for p in SERVICES[service].get("ports", [])}
    assert published == {params["port"]}, "the published port is the one the server listens on"
    probe = " ".join(SERVICES[service].get("healthcheck", {}).get("test", []))
    if probe:
        assert f"localhost:{params['port']}/healthz" in probe


def test_image_contains_every_shipped_package() -> None:
    """The Dockerfile copies sources by hand: a new top-level package must be copied too."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set()
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(Path(p).name for p in shlex.split(line)[1:-1])
    assert shipped <= copied, f"Dockerfile does not copy {sorted(shipped - copied)}"


def test_image_config_path_is_where_config_is_copied() -> None:
    final = (DEPLOY / "Dockerfile").read_text().split("\nFROM ")[-1]
    workdir = re.search(r"^WORKDIR (\S+)", final, re.MULTILINE)
    copied = re.search(r"^COPY config\.yaml (\S+)", final, re.MULTILINE)
    env = re.search(r"^ENV METERLINE_CONFIG=(\S+)", final, re.MULTILINE)
    assert workdir and copied and env
    assert PurePosixPath(workdir[1], copied[1]) == PurePosixPath(env[1])
    for service in OURS:  # compose mounts the operator's config.yaml at the same path
        mounts = SERVICES[service]["volumes"]
        assert any(m.split(":")[1] == SERVICES[service]["environment"]["METERLINE_CONFIG"] for m in mounts)


def test_password_file_goes_into_the_url_exactly(tmp_path: Path) -> None:
    from urllib.parse import unquote

    secret = "p@ss:w/rd%?#"
    (tmp_path / "pw").write_text(secret + "\n")
    settings = Settings(clickhouse_url="http://meterline@ch:8123/db", clickhouse_password_file=str(tmp_path / "pw"))
    parts = urlsplit(str(settings.clickhouse_url))
    assert (parts.username, unquote(parts.password or ""), parts.hostname, parts.port) == ("meterline", secret, "ch", 8123)
    assert settings.clickhouse_database == "db" and settings.clickhouse_reader_url == settings.clickhouse_url


def test_kafka_keeps_its_log_and_cluster_id_on_its_volume() -> None:
    """Re-creating the Kafka container must keep the backlog and offsets (log dir on the volume), and a
    deployment must not share the image's default cluster id (it is part of the log epoch)."""
    kafka = SERVICES["kafka"]
    env = kafka["environment"]
    mounts = {str(v).split(":", 1)[1] for v in kafka["volumes"] if ":" in str(v)}
    assert env["KAFKA_LOG_DIRS"] in mounts
    assert re.fullmatch(r"\$\{KAFKA_CLUSTER_ID:\?.+\}", str(env["CLUSTER_ID"])), "CLUSTER_ID must be required per deployment"


def test_processor_health_is_reachable_by_the_orchestrator() -> None:
    """A worker bound to 127.0.0.1 (the default) cannot be probed from outside its container."""
    processor = SERVICES["processor"]
    env = processor["environment"]
    settings = Settings(processor_web_host=env["METERLINE_PROCESSOR_WEB_HOST"],
                        processor_web_port=int(env["METERLINE_PROCESSOR_WEB_PORT"]))
    assert settings.processor_web_host == "0.0.0.0"
    assert f":{settings.processor_web_port}/readyz" in " ".join(processor["healthcheck"]["test"])
    assert "ports" not in processor  # the compose network only
