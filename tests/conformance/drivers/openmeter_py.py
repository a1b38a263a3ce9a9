"""Drives the published OpenMeter Python SDK (run by the SDK's own virtualenv, never meterline's).

stdin: {"endpoint": url, "token": API key or absent, "calls": [{"op": "meters.query_json", "args": [...], "kwargs": {...}}]}
stdout: one JSON list, per call {"ok": result} or {"error": {"class", "status", "message", "problem"}}.

The calls use the SDK the way its examples do; arguments arrive as JSON and are turned into what the
SDK expects: `*_time` keys and `from_parameter`/`to`/`ingested_at_*` into datetimes, `model:Name`
wrappers into the SDK's model classes.
"""

import datetime
import itertools
import json
import sys
from collections.abc import Mapping

from corehttp.exceptions import HttpResponseError
from openmeter import Client, models

TIME_KEYS = {"from_parameter", "to", "ingested_at_from", "ingested_at_to"}


def convert(value, key=None):
    if isinstance(value, dict) and set(value) == {"model", "value"}:
        return getattr(models, value["model"])(convert(value["value"]))
    if isinstance(value, dict):
        return {k: convert(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [convert(v) for v in value]
    if key in TIME_KEYS and isinstance(value, str):
        return datetime.datetime.fromisoformat(value)
    return value


def plain(value):
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if hasattr(value, "__next__") or type(value).__name__ in ("ItemPaged", "AsyncItemPaged"):
        return [plain(v) for v in itertools.islice(value, 1000)]  # a pager: follows nextCursor page by page
    return value


def main():
    request = json.load(sys.stdin)
    # With a key, as OpenMeter's SDK sends it: `Authorization: Bearer <token>`.
    client = Client(endpoint=request["endpoint"], token=request.get("token"))
    out = []
    for call in request["calls"]:
        target = client
        for part in call["op"].split("."):
            target = getattr(target, part)
        try:
            result = target(*convert(call.get("args", [])), **convert(call.get("kwargs", {})))
            out.append({"ok": plain(result)})
        except HttpResponseError as exc:
            model = getattr(exc, "model", None)
            out.append({"error": {"class": type(exc).__name__, "status": exc.status_code, "message": str(exc),
                                  "problem": plain(model) if model is not None else None}})
        except Exception as exc:  # noqa: BLE001 - reported to the test, which decides
            out.append({"error": {"class": type(exc).__name__, "status": None, "message": str(exc), "problem": None}})
    json.dump(out, sys.stdout)


main()
