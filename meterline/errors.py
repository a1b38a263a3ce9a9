"""meterline's single exception tree.

    MeterlineError
     +-- ConfigError (alias InvalidMeterError)   bad config.yaml / meter definitions
     +-- InvalidEventError                       a CloudEvent that fails validation
     +-- MeterNotFoundError                      a query or lookup names an unknown meter slug
     +-- StorageError                            ClickHouse failed (adapters translate driver errors)
     +-- BrokerUnavailableError                  Kafka did not ack in time / unreachable

Adapters translate third-party exceptions into this tree so callers (and only
``routes.py`` for HTTP statuses) never catch a dependency's exceptions.
"""

from __future__ import annotations


class MeterlineError(Exception):
    """Base of every error meterline raises on purpose."""


class ConfigError(MeterlineError):
    """Configuration (settings or meter definitions) is invalid; message lists every problem."""


InvalidMeterError = ConfigError


class InvalidEventError(MeterlineError):
    """An incoming event is not a valid CloudEvent for meterline."""


class MeterNotFoundError(MeterlineError):
    """No meter with this slug is configured."""

    def __init__(self, slug: str) -> None:
        super().__init__(f"meter not found: {slug}")
        self.slug = slug


class StorageError(MeterlineError):
    """The storage backend (ClickHouse) failed."""


class BrokerUnavailableError(MeterlineError):
    """The Kafka broker is unreachable or did not acknowledge in time."""
