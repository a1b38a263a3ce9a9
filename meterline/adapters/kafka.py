"""Kafka admin shared by every process: create the events topic when it is missing.

Every function takes the broker as a bootstrap address or as `kafka_client_config(settings)` (the
address plus SASL credentials), the one place that decides how a process authenticates to Kafka.
One place decides what "already exists" means, so ingest (best effort), the processor (retries until
the broker is up, then reads the cluster id) and the local stack (strict partition check) differ only in
policy. confluent-kafka errors surface as `BrokerUnavailableError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from meterline.core.errors import BrokerUnavailableError, ConfigError
from meterline.settings import Settings

log = logging.getLogger(__name__)


def events_topic_config(settings: Settings) -> tuple[int, dict[str, str]]:
    """(replication factor, topic configs) the events topic is created with.

    `message.timestamp.type=LogAppendTime`: message timestamps are the broker's, so they never go
    backwards within a partition and cannot be forged by a producer -- the processor judges "too late"
    and completeness (`complete_until`) on them.
    """
    return settings.topic_replication_factor, {
        "retention.ms": str(settings.topic_retention_hours * 3_600_000),
        "min.insync.replicas": str(settings.topic_min_insync_replicas),
        "message.timestamp.type": "LogAppendTime",
    }


def log_epoch(bootstrap: str | Mapping[str, str], topic: str, timeout: float = 10.0) -> str:
    """`<cluster id>/<topic id>`: what identifies one run of the topic's log.

    Offsets restart at 0 whenever the log restarts -- a memory broker restarted (new cluster id), a
    topic deleted and re-created or a Kafka volume lost (new topic id) -- so positions (epoch, partition,
    offset) must carry both, or rows of the new log would replace rows of the old one.
    """
    admin = AdminClient(_client(bootstrap))
    try:
        cluster_id = admin.list_topics(topic=topic, timeout=timeout).cluster_id
        topic_id = admin.describe_topics(TopicCollection([topic]))[topic].result(timeout).topic_id
    except KafkaException as exc:
        raise BrokerUnavailableError(f"cannot describe topic {topic} on {_address(bootstrap)}: {exc}") from exc
    if not cluster_id:
        raise BrokerUnavailableError(f"broker {_address(bootstrap)} reported no cluster id")
    return f"{cluster_id}/{topic_id}" if topic_id else str(cluster_id)


def partition_count(bootstrap: str | Mapping[str, str], topic: str, timeout: float = 10.0) -> int:
    """How many partitions `topic` has (0 when it does not exist)."""
    admin = AdminClient(_client(bootstrap))
    try:
        found = admin.list_topics(topic=topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise BrokerUnavailableError(f"cannot describe topic {topic} on {_address(bootstrap)}: {exc}") from exc
    return 0 if found is None or found.error is not None else len(found.partitions)


def committed_offsets(bootstrap: str | Mapping[str, str], group: str, topic: str, partitions: Iterable[int],
                      timeout: float = 10.0) -> dict[int, int]:
    """The offsets `group` committed on `topic`'s `partitions` (next offset to read); partitions without
    a commit are left out. A consumer that never subscribes only fetches offsets: it does not join."""
    consumer = Consumer({**_client(bootstrap), "group.id": group, "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnavailableError(f"cannot fetch {group}'s offsets on {topic} from {_address(bootstrap)}: {exc}") from exc
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in found if tp.error is None and tp.offset >= 0}


def log_start_offsets(bootstrap: str | Mapping[str, str], topic: str, partitions: Iterable[int],
                      timeout: float = 10.0) -> dict[int, int]:
    """Each partition's log start offset (the low watermark): offsets below it were deleted by retention
    (or DeleteRecords). Asked of the partition leaders, not cached."""
    consumer = Consumer({**_client(bootstrap), "group.id": "meterline-watermarks", "enable.auto.commit": False})
    try:
        return {p: int(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)[0])
                for p in partitions}
    except KafkaException as exc:
        raise BrokerUnavailableError(f"cannot read the log start of {topic} on {_address(bootstrap)}: {exc}") from exc
    finally:
        consumer.close()


def create_topic_if_missing(bootstrap: str | Mapping[str, str], topic: str, partitions: int, timeout: float = 10.0, *,
                            replication_factor: int = 1, config: Mapping[str, str] | None = None
                            ) -> ClusterMetadata:
    """Create `topic` with `partitions` partitions unless it exists; return the cluster's metadata.

    An existing topic is left as it is (operators may provision their own partition count); callers
    that need an exact count check `metadata.topics[topic].partitions` themselves.
    """
    admin = AdminClient(_client(bootstrap))
    try:
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor,
                      config=dict(config or {}))],
            operation_timeout=timeout,
        )
        try:
            futures[topic].result(timeout)
            log.info("created topic %s with %d partitions", topic, partitions)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise
        return admin.list_topics(topic=topic, timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnavailableError(f"cannot prepare topic {topic} on {_address(bootstrap)}: {exc}") from exc


def kafka_client_config(settings: Settings) -> dict[str, str]:
    """librdkafka settings every confluent-kafka client of a process starts from: the bootstrap servers
    and, when `kafka_sasl_username` is set, the SASL credentials (password from `kafka_sasl_password` or
    the file `kafka_sasl_password_file`). ConfigError naming the setting when they do not add up.

    One function, so the producer, the admin calls and the offset checks can never disagree on how
    they authenticate (the processor's Faust consumer gets the same through `sasl_credentials`).
    """
    config = {"bootstrap.servers": str(settings.kafka_bootstrap or "")}
    auth = sasl_credentials(settings)
    if auth is None:
        return config
    protocol, mechanism, username, password = auth
    config.update({"security.protocol": protocol, "sasl.mechanism": mechanism, "sasl.username": username,
                   "sasl.password": password})
    if protocol == "SASL_SSL" and settings.kafka_ssl_cafile:
        config["ssl.ca.location"] = settings.kafka_ssl_cafile
    return config


def sasl_credentials(settings: Settings) -> tuple[str, str, str, str] | None:
    """(security protocol, mechanism, username, password), or None for an unauthenticated PLAINTEXT broker."""
    protocol = settings.kafka_security_protocol or ("SASL_PLAINTEXT" if settings.kafka_sasl_username else "PLAINTEXT")
    if protocol == "PLAINTEXT":
        if settings.kafka_sasl_username:
            raise ConfigError("kafka_sasl_username is set but kafka_security_protocol is PLAINTEXT: "
                              "set METERLINE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT (or SASL_SSL)")
        return None
    if not settings.kafka_sasl_username:
        raise ConfigError(f"kafka_security_protocol {protocol} needs METERLINE_KAFKA_SASL_USERNAME")
    if settings.kafka_sasl_password is not None:
        password = settings.kafka_sasl_password.get_secret_value()
    elif settings.kafka_sasl_password_file:
        try:
            password = Path(settings.kafka_sasl_password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"kafka_sasl_password_file: cannot read {settings.kafka_sasl_password_file}: "
                              f"{exc.strerror}") from None
    else:
        raise ConfigError("kafka SASL needs METERLINE_KAFKA_SASL_PASSWORD_FILE (or METERLINE_KAFKA_SASL_PASSWORD)")
    if not password:
        raise ConfigError("kafka_sasl_password is empty")
    return protocol, settings.kafka_sasl_mechanism, settings.kafka_sasl_username, password


def _client(bootstrap: str | Mapping[str, str]) -> dict[str, str | int | float | bool]:
    """A bootstrap address, or a whole `kafka_client_config`, as a librdkafka config to extend."""
    return {"bootstrap.servers": bootstrap} if isinstance(bootstrap, str) else dict(bootstrap)


def _address(bootstrap: str | Mapping[str, str]) -> str:
    """The bootstrap servers alone, for messages (never the credentials beside them)."""
    return bootstrap if isinstance(bootstrap, str) else str(bootstrap.get("bootstrap.servers", ""))
