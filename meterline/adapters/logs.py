"""Structured (JSON) logs for every meterline process, configured only in entrypoints.

Modules log with `logging.getLogger(__name__)` and pass context as `extra={...}` (event_id, meter,
partition, ...). structlog's stdlib formatter renders each record as one JSON object with those
fields, so logs of ingest, processor and query can be filtered by field instead of grepped.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

import structlog


def json_formatter() -> logging.Formatter:
    """The formatter `logging.config` builds by name (see `logging_config`)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ],
    )


def logging_config(level: str = "info") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: JSON lines on stderr. Faust's Worker and uvicorn take it too."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "meterline.adapters.logs.json_formatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
        },
    }


def configure_logging(level: str = "info") -> None:
    logging.config.dictConfig(logging_config(level))
