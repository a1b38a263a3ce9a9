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
    assert kafka_host in SERVICES and f"://:{kafka_port}" in SERVICES[kafka_host]["environment"]["KAFKA_LISTENERS"]
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


def _kafka_listeners() -> dict[str, tuple[str, str]]:
    """Listener name -> (bind address, security protocol), from the broker's compose environment."""
    env = SERVICES["kafka"]["environment"]
    protocols = dict(pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    out = {}
    for listener in env["KAFKA_LISTENERS"].split(","):
        name, address = listener.split("://")
        out[name] = (address.rsplit(":", 1)[0], protocols[name])
    return out


def _broker_script(tmp_path: Path, password: str) -> tuple[dict[str, str], str]:
    """Run the broker's start script as compose would (`$$` -> `$`), with its secret and output paths
    moved under tmp_path and the image's `run` replaced by `env`: (the environment it hands over, the
    client.properties it wrote)."""
    import subprocess

    (tmp_path / "kafka_password").write_text(password + "\n")
    kafka = SERVICES["kafka"]
    assert kafka["entrypoint"] == ["/bin/sh", "-c"] and "exec /etc/kafka/docker/run" in kafka["command"][0]
    script = (kafka["command"][0].replace("$$", "$")
              .replace("/run/secrets/kafka_password", str(tmp_path / "kafka_password"))
              .replace("/tmp/client.properties", str(tmp_path / "client.properties"))
              .replace("exec /etc/kafka/docker/run", "exec env -0"))
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True, env={"PATH": os.environ["PATH"]})
    env = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    properties = tmp_path / "client.properties"
    assert properties.stat().st_mode & 0o077 == 0, "client.properties holds the password: owner only"
    return env, properties.read_text()


def test_kafka_takes_only_authenticated_clients_on_the_network(tmp_path: Path) -> None:
    """Every listener the compose network can reach is SASL; the JAAS users are built from the secret,
    for the listener and mechanism the broker enables, with the user and password meterline sends."""
    env = SERVICES["kafka"]["environment"]
    listeners = _kafka_listeners()
    exposed = {name: proto for name, (host, proto) in listeners.items() if host not in ("127.0.0.1", "localhost")}
    assert exposed and all(proto.startswith("SASL_") for proto in exposed.values()), listeners
    advertised = {a.split("://")[0] for a in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert advertised <= set(exposed) and env["KAFKA_INTER_BROKER_LISTENER_NAME"] in exposed
    assert "kafka_password" in SERVICES["kafka"]["secrets"]
    assert not any("password" in str(v).lower() for v in env.values()), "no password in the broker's environment"
    mechanism = env["KAFKA_SASL_ENABLED_MECHANISMS"]
    assert mechanism == "PLAIN" == env["KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL"]
    password = "pw+/=0123456789abcdefABCDEF"  # what `openssl rand -base64 32` may contain
    handed, client = _broker_script(tmp_path, password)
    for name in exposed:  # the image maps KAFKA_LISTENER_NAME_<L>_<M>_SASL_JAAS_CONFIG to listener.name.<l>.<m>...
        jaas = handed[f"KAFKA_LISTENER_NAME_{name}_{mechanism}_SASL_JAAS_CONFIG"]
        assert jaas.startswith("org.apache.kafka.common.security.plain.PlainLoginModule required ") and jaas.endswith(";")
        options = dict(re.findall(r'(\w+)="([^"]*)"', jaas))
        for service in OURS:  # every meterline process can log in as the user it is configured with
            user = SERVICES[service]["environment"]["METERLINE_KAFKA_SASL_USERNAME"]
            assert options[f"user_{user}"] == password
        assert options["username"] in {k.removeprefix("user_") for k in options if k.startswith("user_")}
    props = dict(line.split("=", 1) for line in client.splitlines() if line)
    assert props["security.protocol"] == exposed[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] and props["sasl.mechanism"] == mechanism
    assert dict(re.findall(r'(\w+)="([^"]*)"', props["sasl.jaas.config"]))["password"] == password
    assert "--command-config /tmp/client.properties" in " ".join(SERVICES["kafka"]["healthcheck"]["test"])


@pytest.mark.parametrize("service", OURS)
def test_meterline_clients_authenticate_with_the_secret(service: str, compose_env: None,
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The client config each service builds from its compose environment: SASL on the listener's
    protocol and the broker's mechanism, the password read from its secret file (never from compose)."""
    from meterline.adapters.kafka import kafka_client_config

    for k, v in _with_secret_files(service, tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("METERLINE_CONFIG", str(ROOT / "config.yaml"))
    config = kafka_client_config(Settings())
    host, port = config["bootstrap.servers"].split(":")
    (listener,) = [name for name, (_, _) in _kafka_listeners().items()
                   if f"{name}://:{port}" in SERVICES[host]["environment"]["KAFKA_LISTENERS"]]
    assert config == {
        "bootstrap.servers": "kafka:9092",
        "security.protocol": _kafka_listeners()[listener][1],
        "sasl.mechanism": SERVICES["kafka"]["environment"]["KAFKA_SASL_ENABLED_MECHANISMS"],
        "sasl.username": SERVICES[service]["environment"]["METERLINE_KAFKA_SASL_USERNAME"],
        "sasl.password": (tmp_path / "kafka_password").read_text().strip(),
    }
