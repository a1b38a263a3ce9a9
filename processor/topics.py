"""The events topic, declared once, and the broker facts the processor needs before it starts.

Values stay raw bytes (`value_serializer="raw"`): the processor decodes the JSON array itself with
`meterline.events.decode_batch` -- one orjson call per message, the same codec ingest encodes with --
instead of paying Faust's codec layer per message.

Faust only creates its *internal* topics, so the events topic is created here with confluent-kafka's
AdminClient (idempotent: "already exists" is success).
"""

from __future__ import annotations

import logging
import time

import faust
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from meterline.errors import BrokerUnavailableError
from meterline.settings import Settings

logger = logging.getLogger(__name__)


def events_topic(app: faust.App, settings: Settings) -> faust.TopicT:
    """The Faust declaration of `settings.events_topic` (raw key = subject, raw value = JSON array)."""
    return app.topic(
        settings.events_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
    )


def ensure_events_topic(bootstrap: str, topic: str, partitions: int, *, timeout: float = 30.0) -> str:
    """Create the topic if missing and return the broker's cluster id (the processor's log epoch).

    The cluster id is the log epoch because the local memory broker gets a fresh id per start, so
    offsets of a reset log can never be mistaken for positions already recorded (design.md).
    Retries until `timeout` so a worker may start before the broker is ready.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while True:
        try:
            md = admin.list_topics(timeout=5)
            if topic not in md.topics or md.topics[topic].error is not None:
                futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
                for fut in futures.values():
                    try:
                        fut.result(timeout=10)
                    except KafkaException as exc:
                        if "TOPIC_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                            raise
                md = admin.list_topics(timeout=5)
            cluster_id = md.cluster_id
            if not cluster_id:
                raise BrokerUnavailableError(f"broker {bootstrap} reported no cluster id")
            return str(cluster_id)
        except (KafkaException, BrokerUnavailableError) as exc:
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(f"cannot prepare topic {topic} on {bootstrap}: {exc}") from exc
            logger.warning("broker not ready; retrying", extra={"bootstrap": bootstrap, "error": str(exc)})
            time.sleep(1.0)
