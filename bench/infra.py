"""The infrastructure one bench run shares: a broker and a ClickHouse, started once for all figures.

Each figure then takes its own fresh topic and database (via `LocalStack`, which reuses the broker and
ClickHouse it is handed), so figures never see each other's data. `KAFKA_BOOTSTRAP` / `CLICKHOUSE_URL`
point the bench at existing servers instead; everything started here is stopped by PID in `close`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from meterline.adapters.clickhouse import connect, create_schema
from meterline.localinfra.broker import LocalBroker, ensure_topic
from meterline.localinfra.clickhouse_server import LocalClickHouse
from meterline.localinfra.stack import LocalStack


@dataclass
class Infra:
    data_dir: Path
    kafka_bootstrap: str = ""
    clickhouse_url: str = ""
    _broker: LocalBroker | None = None
    _clickhouse: LocalClickHouse | None = None
    _stacks: list[LocalStack] = field(default_factory=list)

    def start(self) -> Infra:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.kafka_bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "")
        self.clickhouse_url = os.environ.get("CLICKHOUSE_URL", "")
        try:
            if not self.kafka_bootstrap:
                self._broker = LocalBroker(log_dir=self.data_dir / "logs").start()
                self.kafka_bootstrap = self._broker.bootstrap
            if not self.clickhouse_url:
                self._clickhouse = LocalClickHouse(data_dir=self.data_dir / "clickhouse").start()
                self.clickhouse_url = self._clickhouse.url
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every stack, then ClickHouse and the broker; safe after a partial start."""
        for stack in reversed(self._stacks):
            stack.stop()
        self._stacks.clear()
        for proc in (self._clickhouse, self._broker):
            if proc is not None:
                proc.stop()

    @property
    def broker_pid(self) -> int | None:
        return self._broker.pid if self._broker is not None else None

    @property
    def clickhouse_pid(self) -> int | None:
        """The local ClickHouse server's PID (None when `CLICKHOUSE_URL` names another server)."""
        return self._clickhouse.pid if self._clickhouse is not None else None

    # ------------------------------------------------------------------------------- per figure
    def topic(self, prefix: str, partitions: int) -> str:
        name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
        ensure_topic(self.kafka_bootstrap, name, partitions)
        return name

    def database(self, prefix: str) -> tuple[str, Client]:
        """A fresh database with meterline's schema and a client bound to it."""
        name = f"bench_{prefix}_{uuid.uuid4().hex[:8]}"
        client = connect(self.clickhouse_url)
        create_schema(client, name)
        client.close()
        return name, connect(self.clickhouse_url, database=name)

    def stack(self, config_file: Path, **kwargs: Any) -> LocalStack:
        """A LocalStack on this broker and ClickHouse (fresh topic, database and consumer group), not yet
        started. Its own consumer group: workers a previous figure stopped (or killed) must not hold this
        figure's first rebalance until their sessions time out."""
        extra_env = {"METERLINE_CONSUMER_GROUP": f"bench-{uuid.uuid4().hex[:8]}", **kwargs.pop("extra_env", {})}
        stack = LocalStack(
            data_dir=self.data_dir / f"stack-{uuid.uuid4().hex[:8]}",
            config_file=config_file,
            kafka_bootstrap=self.kafka_bootstrap,
            clickhouse_url=self.clickhouse_url,
            extra_env=extra_env,
            **kwargs,
        )
        self._stacks.append(stack)
        return stack


def produce_all(producer: Producer, topic: str, messages: Iterable[tuple[bytes, bytes]], **kwargs: Any) -> None:
    """Queue every `(key, value)`, waiting for room whenever librdkafka's local queue is full."""
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, **kwargs)
                break
            except BufferError:
                producer.poll(0.01)
    producer.poll(0)  # serve delivery reports once per call, not per message: keeps the loop cheap


def scalar_int(client: Client, sql: str) -> int:
    """`client.command` of a query answering one number, as an int (its declared result type is a union)."""
    value: Any = client.command(sql)
    return int(value)
