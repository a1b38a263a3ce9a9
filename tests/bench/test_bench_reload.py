"""P5's reload path at a tiny size: a real worker loads the ids generated in ClickHouse (bench/p5_reload.py).

What the 100M-id figure rests on, checked on what was measured, never on a timing: each partition's load
read exactly the ids the generated layout put on it (counted here from the layout's rule), the copies
of stored events were dropped and the fresh events stored, and both runs started empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE, PARTITIONS, MESSAGE_EVENTS, RUNS = 3_000, 3, 100, 2


@pytest.fixture(scope="module")
def reload(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench-reload")
    env = dict(os.environ, BENCH_RESULTS_DIR=str(out))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "tiny", "--only", "P5R", "--p5-reload", str(SIZE),
         "--p5-runs", str(RUNS), "--partitions", str(PARTITIONS)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    files = sorted(out.glob("*.json"))
    assert files, f"no results written; rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(files[-1].read_text())
    assert proc.returncode == 0 and data["errors"] == {}, f"{data['errors']}\n{proc.stdout[-3000:]}"
    return data["figures"]


def test_every_partition_loaded_exactly_its_generated_ids(reload: list[dict]) -> None:
    assert [f["name"].split(":")[0] for f in reload] == ["processor reload"] * 2
    details = reload[0]["details"]
    # Oracle: event n sits on partition (n // message_events) % partitions (bench/generate.py's layout).
    expected = Counter((n // MESSAGE_EVENTS) % PARTITIONS for n in range(SIZE))
    assert details["events_rows"] == details["dedupe_keys_rows"] == SIZE
    first = details["runs"][0]
    assert {x["partition"]: x["keys"] for x in first["partition_loads"]} == dict(expected)
    # The second worker also loads the first run's fresh events (one per partition).
    second = details["runs"][1]
    assert {x["partition"]: x["keys"] for x in second["partition_loads"]} == {p: k + 1 for p, k in expected.items()}
    for run in details["runs"]:
        assert run["all_counted"] is True and run["copies_dropped"] == PARTITIONS
        assert run["peak_rss_bytes"] >= run["rss_bytes"] > 0


def test_figures_carry_their_baselines_and_spread(reload: list[dict]) -> None:
    memory, seconds = reload
    assert memory["unit"] == "MB" and memory["baseline"] > 0 and memory["target"] == "<= 1024 MB"
    assert memory["details"]["naive_set_measured_at"] == SIZE and not memory["details"]["naive_set_extrapolated"]
    runs = memory["details"]["runs"]
    assert len(runs) == RUNS and memory["details"]["sink_read_seconds"] > 0
    loads = sorted(r["load_seconds"] for r in runs)
    assert memory["details"]["load_seconds_spread"] == [loads[0], loads[-1]]
    assert seconds["unit"] == "s" and seconds["value"] > 0


def test_reload_timeout_grows_with_the_ids_unless_given() -> None:
    from types import SimpleNamespace

    from bench.p5_reload import _timeout

    default = SimpleNamespace(options={"p5_reload_timeout": 0})
    assert _timeout(default, 1_000) == 30 * 60  # type: ignore[arg-type]
    assert _timeout(default, 100_000_000) == 100_000_000 * 30 / 1e6  # type: ignore[arg-type]
    assert _timeout(SimpleNamespace(options={"p5_reload_timeout": 42}), 100_000_000) == 42  # type: ignore[arg-type]
