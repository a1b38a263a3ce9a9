"""Local infrastructure for ``make run`` and tests: a tansu broker and a chdb-backed ClickHouse server.

Both run as subprocesses on free ports and are stopped by PID (never by name), so several stacks can run
side by side and nothing outlives the process that started it.

Exports resolve lazily: the submodules are also run with ``python -m`` (``fetch_tansu``, ``_chdb_serve``),
and importing them eagerly here would load confluent-kafka into the ClickHouse server process and make
runpy warn about a module imported twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meterline.localinfra.broker import LocalBroker as LocalBroker
    from meterline.localinfra.broker import TopicMismatchError as TopicMismatchError
    from meterline.localinfra.broker import ensure_topic as ensure_topic
    from meterline.localinfra.broker import new_cluster_id as new_cluster_id
    from meterline.localinfra.clickhouse_server import LocalClickHouse as LocalClickHouse
    from meterline.localinfra.fetch_tansu import TansuFetchError as TansuFetchError
    from meterline.localinfra.fetch_tansu import tansu_path as tansu_path
    from meterline.localinfra.ports import NotReadyError as NotReadyError
    from meterline.localinfra.ports import free_port as free_port
    from meterline.localinfra.ports import wait_for as wait_for

_EXPORTS = {
    "LocalBroker": "broker",
    "TopicMismatchError": "broker",
    "ensure_topic": "broker",
    "new_cluster_id": "broker",
    "LocalClickHouse": "clickhouse_server",
    "TansuFetchError": "fetch_tansu",
    "tansu_path": "fetch_tansu",
    "NotReadyError": "ports",
    "free_port": "ports",
    "wait_for": "ports",
}

__all__ = [
    "LocalBroker",
    "LocalClickHouse",
    "NotReadyError",
    "TansuFetchError",
    "TopicMismatchError",
    "ensure_topic",
    "free_port",
    "new_cluster_id",
    "tansu_path",
    "wait_for",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
