"""meterline's error tree.

    MeterlineError
    ├── ConfigError                         config.yaml or settings are wrong
    ├── InvalidEventError                   an incoming event breaks the CloudEvents or size rules
    ├── MeterNotFoundError                  a query names a meter that config.yaml does not define
    ├── MeterChangeError                    a meter create/update/delete that cannot be applied
    │   ├── MeterConflictError              the slug exists, or the meter is managed by a file (409)
    │   └── InvalidMeterChangeError         a field of the request is invalid (400, names the field)
    ├── MeterBuildingError                  a brand-new meter's history is still being built (503)
    ├── InvalidQueryError                   query parameters are inconsistent (range, window, zone)
    │   └── QueryTooLargeError              the answer would exceed the query cost ceiling
    ├── RateLimitedError                    a key exceeded its request, event or concurrency limit
    ├── StorageError                        ClickHouse failed or could not be reached (retry)
    │   ├── StorageRejectedError            ClickHouse refused the rows themselves (never retry)
    │   └── QueryTimeoutError               a read ran past ClickHouse's max_execution_time
    └── BrokerUnavailableError              Kafka did not acknowledge in time

Adapters translate confluent-kafka and clickhouse-connect exceptions into these, so callers never
catch a dependency's exceptions, and only the HTTP layers map them to status codes.
"""

from __future__ import annotations

from typing import Any


class MeterlineError(Exception):
    """Base of every error meterline raises on purpose."""


class ConfigError(MeterlineError):
    """The configuration is invalid; the message lists every problem with file, meter and field."""


class InvalidEventError(MeterlineError):
    """One or more events are invalid; `errors` holds `{index, field, message}` for each problem."""

    def __init__(self, errors: list[dict[str, Any]], message: str | None = None) -> None:
        self.errors = errors
        super().__init__(message or f"{len(errors)} invalid event field(s)")


class MeterNotFoundError(MeterlineError):
    """Raised by `MeterSet.get` when a slug is not in config.yaml."""

    def __init__(self, slug: str) -> None:
        self.slug = slug
        super().__init__(f"meter not found: {slug}")


class MeterChangeError(MeterlineError):
    """A change to the meter store that cannot be applied."""


class MeterConflictError(MeterChangeError):
    """The slug is taken, or the meter is managed by `managed_by` (a config file) and not by the API."""

    def __init__(self, slug: str, message: str, managed_by: str | None = None) -> None:
        self.slug = slug
        self.managed_by = managed_by
        super().__init__(message)


class MeterVersionConflictError(MeterChangeError):
    """A change made against a version of the meter (HTTP If-Match) that is no longer its newest."""

    def __init__(self, slug: str, expected: list[int], current: int) -> None:
        self.slug = slug
        self.expected = expected
        self.current = current
        read = " or ".join(str(v) for v in expected)
        super().__init__(f"meter {slug!r} is at version {current}, not {read} (If-Match): it changed since it "
                         "was read; read it again and reapply the change")


class InvalidMeterChangeError(MeterChangeError):
    """A meter create/update request is invalid; `errors` holds `{field, message}` per problem."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


class MeterBuildingError(MeterlineError):
    """A meter has no complete generation yet: answering would be a silently partial number."""

    def __init__(self, slug: str, done: int, total: int) -> None:
        self.slug = slug
        self.done = done
        self.total = total
        super().__init__(f"meter {slug!r} is still being built from stored events ({done} of {total} events)")


class InvalidQueryError(MeterlineError):
    """Query parameters that cannot be answered exactly; `field` names the parameter."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class StorageError(MeterlineError):
    """ClickHouse failed; retrying may help."""


class StorageRejectedError(StorageError):
    """ClickHouse refused the data itself (a value it cannot parse or hold): the same rows fail every
    time, so the processor quarantines them instead of retrying, which would stall the partition."""


class BrokerUnavailableError(MeterlineError):
    """The Kafka broker did not acknowledge every message within the produce timeout."""


class QueryTooLargeError(InvalidQueryError):
    """The answer would have more rows (windows x series) than the ceiling; `field` names what to narrow."""


class QueryTimeoutError(StorageError):
    """ClickHouse stopped a read at max_execution_time (the query path's guard)."""


class RateLimitedError(MeterlineError):
    """A key went over one of its limits; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(message)
