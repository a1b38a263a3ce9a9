"""Log lines are JSON objects carrying the `extra` context fields."""

from __future__ import annotations

import io
import json
import logging

from meterline.adapters.logs import json_formatter


def test_extra_fields_become_json_keys() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger("meterline.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("batch failed", extra={"partition": 3, "meter": "tokens_total"})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["event"] == "batch failed"
    assert line["partition"] == 3 and line["meter"] == "tokens_total"
    assert line["level"] == "warning" and line["logger"] == "meterline.test_logs"
