"""Kafka authentication settings -> the configs the clients are built with (meterline.adapters.kafka,
ingest.producer, processor.app): the confluent-kafka clients and Faust's aiokafka consumer must log in
with the same protocol, mechanism, user and password, and no message may carry the password.

Oracle: the librdkafka and aiokafka option names written out here from the settings the test chose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from ingest.producer import producer_config
from meterline.adapters import kafka
from meterline.core.errors import BrokerUnavailableError, ConfigError
from meterline.settings import Settings
from processor.app import broker_credentials

PASSWORD = "s3cret+/=with-symbols"


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(config_file=str(tmp_path / "absent.yaml"), kafka_bootstrap="k1:9092,k2:9092", **values)


def test_no_username_is_plaintext_everywhere(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    assert kafka.kafka_client_config(s) == {"bootstrap.servers": "k1:9092,k2:9092"}
    assert broker_credentials(s) is None
    assert not {k for k in producer_config(s) if k.startswith(("sasl.", "security."))}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_from_a_password_file(tmp_path: Path, mechanism: str) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    s = _settings(tmp_path, kafka_sasl_username="meterline", kafka_sasl_password_file=str(tmp_path / "pw"),
                  kafka_sasl_mechanism=mechanism)
    want = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism, "sasl.username": "meterline",
            "sasl.password": PASSWORD}
    assert kafka.kafka_client_config(s) == {"bootstrap.servers": "k1:9092,k2:9092", **want}
    produced = producer_config(s)
    assert {k: produced[k] for k in want} == want and produced["bootstrap.servers"] == "k1:9092,k2:9092"
    assert produced["acks"] == "all" and produced["client.id"] == "meterline-ingest"  # its own settings kept
    aio = credentials_to_aiokafka_auth(broker_credentials(s))  # what Faust hands aiokafka
    assert aio == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism,
                   "sasl_plain_username": "meterline", "sasl_plain_password": PASSWORD, "ssl_context": None}


def test_sasl_ssl_with_a_ca_and_an_inline_password(tmp_path: Path) -> None:
    import ssl

    ca = Path(ssl.get_default_verify_paths().cafile or "")
    if not ca.is_file():
        pytest.skip("no system CA bundle to stand in for the brokers' CA")
    s = _settings(tmp_path, kafka_security_protocol="SASL_SSL", kafka_sasl_username="u", kafka_sasl_password=PASSWORD,
                  kafka_ssl_cafile=str(ca))
    config = kafka.kafka_client_config(s)
    assert (config["security.protocol"], config["ssl.ca.location"], config["sasl.password"]) == ("SASL_SSL", str(ca), PASSWORD)
    aio = credentials_to_aiokafka_auth(broker_credentials(s))
    assert aio["security_protocol"] == "SASL_SSL" and isinstance(aio["ssl_context"], ssl.SSLContext)
    assert aio["ssl_context"].verify_mode == ssl.CERT_REQUIRED and aio["ssl_context"].check_hostname


@pytest.mark.parametrize(("values", "names"), [
    ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "USERNAME"),
    ({"kafka_sasl_username": "u"}, "PASSWORD_FILE"),
    ({"kafka_sasl_username": "u", "kafka_security_protocol": "PLAINTEXT", "kafka_sasl_password": "x"}, "SECURITY_PROTOCOL"),
    ({"kafka_sasl_username": "u", "kafka_sasl_password_file": "/nonexistent/pw"}, "kafka_sasl_password_file"),
])
def test_incomplete_settings_name_what_to_set(tmp_path: Path, values: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        kafka.kafka_client_config(_settings(tmp_path, **values))
    with pytest.raises(ConfigError, match=names):
        broker_credentials(_settings(tmp_path, **values))


def test_broker_errors_never_carry_the_password(tmp_path: Path) -> None:
    s = _settings(tmp_path, kafka_sasl_username="u", kafka_sasl_password=PASSWORD)
    config = kafka.kafka_client_config(s)
    config["bootstrap.servers"] = "127.0.0.1:1"  # nothing listens: every call fails
    for call in (lambda: kafka.partition_count(config, "t", timeout=0.5), lambda: kafka.log_epoch(config, "t", timeout=0.5)):
        with pytest.raises(BrokerUnavailableError) as failed:
            call()
        assert PASSWORD not in str(failed.value) and "127.0.0.1:1" in str(failed.value)
