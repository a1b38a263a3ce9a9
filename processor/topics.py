"""The events topic, declared once, and the broker facts the processor needs before it starts.

Values stay raw bytes (`value_serializer="raw"`): the processor decodes the JSON array itself with
`meterline.core.events.decode_batch` -- one orjson call per message, the same codec ingest encodes with --
instead of paying Faust's codec layer per message.

Faust only creates its *internal* topics, so the events topic is created here with confluent-kafka's
AdminClient (`meterline.adapters.kafka.create_topic_if_missing`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import faust

from meterline.adapters.kafka import create_topic_if_missing, log_epoch
from meterline.core.errors import BrokerUnavailableError
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


def ensure_events_topic(bootstrap: str | Mapping[str, str], topic: str, partitions: int, *, timeout: float = 30.0,
                        replication_factor: int = 1, config: Mapping[str, str] | None = None) -> str:
    """Create the topic if missing and return the log epoch (`meterline.adapters.kafka.log_epoch`).

    The cluster id is the log epoch because the local memory broker gets a fresh id per start, so
    offsets of a reset log can never be mistaken for positions already recorded (design.md).
    Retries until `timeout` so a worker may start before the broker is ready.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            create_topic_if_missing(bootstrap, topic, partitions, replication_factor=replication_factor,
                                    config=config)
            return log_epoch(bootstrap, topic)
        except BrokerUnavailableError as exc:
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(f"cannot prepare topic {topic}: {exc}") from exc
            logger.warning("broker not ready; retrying", extra={"error": str(exc)})
            time.sleep(1.0)
