"""The published OpenMeter SDKs against one real meterline stack (broker, Faust worker, ClickHouse, HTTP).

`sdk_call(sdk, calls)` runs a list of SDK calls in the SDK's own process (Python: its virtualenv; JS:
the machine's Node) and returns each call's result or error, so the tests see exactly what a user of
that SDK sees.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline.localinfra.stack import LocalStack
from tests.conformance import sdks
from tests.oracle import OracleMeter, config_yaml

DRIVERS = Path(__file__).parent / "drivers"
METERS = {
    m.slug: m
    for m in (
        OracleMeter("tokens_total", "prompt", "SUM", "tokens", ("model", "type")),
        OracleMeter("prompt_count", "prompt", "COUNT", None, ("model",)),
        OracleMeter("tokens_avg", "prompt", "AVG", "tokens", ("model",)),
        OracleMeter("active_users", "activity", "UNIQUE_COUNT", "user_id"),
        OracleMeter("storage_latest", "storage", "LATEST", "bytes", ("tier",)),
    )
}

SdkCall = Callable[[str, list[dict[str, Any]]], list[dict[str, Any]]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, clickhouse_url: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("conformance")
    config = root / "config.yaml"
    config.write_text(config_yaml(METERS.values()))
    with LocalStack(data_dir=root, config_file=config, processors=1, partitions=2,
                    kafka_bootstrap=kafka_bootstrap, clickhouse_url=clickhouse_url) as running:
        yield running


@pytest.fixture(scope="session")
def sdk_envs() -> dict[str, list[str]]:
    """Command lines that run each SDK's driver (installs the pinned SDKs under .local/sdk if missing)."""
    python = sdks.python_sdk()
    js_dir = sdks.js_sdk()
    # ESM resolves `@openmeter/sdk` next to the importing file, so the driver runs from the SDK's directory.
    shutil.copyfile(DRIVERS / "openmeter_js.mjs", js_dir / "driver.mjs")
    return {
        "python": [str(python), str(DRIVERS / "openmeter_py.py")],
        "js": [sdks.node(), str(js_dir / "driver.mjs")],
    }


@pytest.fixture(scope="module")
def sdk_call(stack: LocalStack, sdk_envs: dict[str, list[str]]) -> SdkCall:
    def call(sdk: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        request = json.dumps({"endpoint": stack.url, "calls": calls})
        done = subprocess.run(sdk_envs[sdk], input=request, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"{sdk} driver failed:\n{done.stderr[-4000:]}"
        results: list[dict[str, Any]] = json.loads(done.stdout)
        assert len(results) == len(calls)
        return results

    return call
