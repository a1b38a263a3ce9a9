"""`meterline keys` against a running stack with local mode off: keys created and revoked by the CLI
(one process) take effect in the HTTP server (another process), and scopes hold end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meterline.localinfra.stack import LocalStack
from tests.oracle import OracleMeter, config_yaml, meter_body
from tests.tenants import create_meters

pytestmark = pytest.mark.e2e

METER = OracleMeter("calls", "call", "COUNT", None)


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, clickhouse_url: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("keyed")
    config = root / "config.yaml"
    config.write_text(config_yaml([METER]))
    with LocalStack(
        data_dir=root, config_file=config, processors=1, partitions=2, kafka_bootstrap=kafka_bootstrap,
        clickhouse_url=clickhouse_url,
        extra_env={"METERLINE_AUTH_LOCAL_MODE": "false", "METERLINE_AUTH_REFRESH_SECONDS": "0.5",
                   "METERLINE_RATE_LIMIT_EVENTS": "1000/minute"},
    ) as running:
        yield running


def keys_cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `meterline keys ...` as an operator would, with the addresses the `make run` banner prints."""
    env = dict(os.environ, CLICKHOUSE_URL=stack.clickhouse_db_url, METERLINE_AUTH_SECRET_FILE=str(stack.auth_secret_file))
    return subprocess.run([sys.executable, "-m", "meterline.cli", "keys", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=True)


def create_key(stack: LocalStack, namespace: str, scopes: str) -> str:
    out = keys_cli(stack, "create", "--namespace", namespace, "--scopes", scopes).stdout.strip()
    assert out.startswith("mlk_") and "\n" not in out, out  # stdout is the key alone, for scripts
    return out


def _events(n: int) -> list[dict[str, object]]:
    return [{"specversion": "1.0", "type": "call", "id": f"e{i}", "source": "keys-test", "subject": f"s{i % 3}",
             "time": "2024-01-01T00:00:00Z"} for i in range(n)]


def test_cli_keys_scopes_and_revocation(keyed_stack: LocalStack) -> None:
    ingest_key = create_key(keyed_stack, "acme", "ingest")
    read_key = create_key(keyed_stack, "acme", "read")
    url = keyed_stack.url
    events = _events(7)
    batch = {"Content-Type": "application/cloudevents-batch+json"}
    with httpx.Client(base_url=url, timeout=10) as http:
        # acme's own meter (config.yaml's belong to the default namespace), made with an admin key
        create_meters(http, {"Authorization": f"Bearer {create_key(keyed_stack, 'acme', 'read,admin')}"},
                      [meter_body(METER)])
        assert http.post("/api/v1/events", json=events, headers=batch).status_code == 401
        assert http.post("/api/v1/events", json=events,
                         headers={**batch, "Authorization": f"Bearer {read_key}"}).status_code == 403
        assert http.post("/api/v1/events", json=events,
                         headers={**batch, "Authorization": f"Bearer {ingest_key}"}).status_code == 204
        assert http.get("/api/v1/meters", headers={"Authorization": f"Bearer {ingest_key}"}).status_code == 403

        query = "/api/v1/meters/calls/query?from=2024-01-01T00:00:00Z&to=2024-01-02T00:00:00Z"
        reader = {"Authorization": f"Bearer {read_key}"}
        deadline = time.monotonic() + 60
        while True:
            keyed_stack.assert_running()
            data = http.get(query, headers=reader).json()["data"]
            if data and data[0]["value"] == len(events):
                break
            assert time.monotonic() < deadline, f"meter never reached {len(events)}: {data}"
            time.sleep(0.2)

        listing = keys_cli(keyed_stack, "list", "--namespace", "acme").stdout
        key_id = ingest_key.split("_")[1]
        assert key_id in listing and ingest_key not in listing and read_key not in listing
        keys_cli(keyed_stack, "revoke", key_id)
        deadline = time.monotonic() + 15
        while http.post("/api/v1/events", json=events[:1],
                        headers={**batch, "Authorization": f"Bearer {ingest_key}"}).status_code != 401:
            assert time.monotonic() < deadline, "revoked key still accepted"
            time.sleep(0.1)
        assert "revoked" in keys_cli(keyed_stack, "list").stdout


def test_event_rate_limit_per_key(keyed_stack: LocalStack) -> None:
    noisy, quiet = create_key(keyed_stack, "acme", "ingest"), create_key(keyed_stack, "beta", "ingest")
    batch = _events(600)
    with httpx.Client(base_url=keyed_stack.url, timeout=10) as http:
        def post(key: str) -> httpx.Response:
            return http.post("/api/v1/events", json=batch, headers={
                "Content-Type": "application/cloudevents-batch+json", "Authorization": f"Bearer {key}"})

        assert post(noisy).status_code == 204
        refused = post(noisy)  # 1200 events within a minute: over 1000/minute
        assert refused.status_code == 429, refused.text
        # Sliding-window counter (core/ratelimit.py): the 600 must wait for the current minute to end and
        # then for its 600 to decay under 1000 - 600 + 1, i.e. up to 60 + 60 * (600 - 401) / 600 seconds.
        assert 1 <= int(refused.headers["retry-after"]) <= math.ceil(60 + 60 * (600 - 401) / 600)
        assert refused.headers["content-type"] == "application/problem+json"
        assert post(quiet).status_code == 204  # another key is unaffected
