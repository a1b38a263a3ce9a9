"""Dead-letter replay on the real stack: a meter with a wrong valueProperty dead-letters every event
it should meter; the config is fixed (new config.yaml, processor restarted). Live meters rebuild the
meter's history from the stored events on their own, so every window equals the oracle before any replay;
`meterline dead-letters replay` (twice) then finds the old definition's dead letters superseded and must
not count anything twice.

Values that are invalid under any config stay dead letters (`still_rejected`); the oracle never counts
them either.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from meterline.adapters.clickhouse import connect
from meterline.jobs.deadletters import list_dead_letters
from meterline.localinfra.stack import LocalStack
from tests.faults.harness import (
    FAULT_CONFIG,
    MakeSender,
    MakeStack,
    Summary,
    begin,
    caught_up,
    compare,
    dead_letter_count,
    fault_events,
    fault_factory,
    fault_stream,
    finish,
)

pytestmark = pytest.mark.faults

BROKEN = "valueProperty: $.tokens\n    groupBy: {model: $.model, type: $.type}"
assert BROKEN in FAULT_CONFIG
BROKEN_CONFIG = FAULT_CONFIG.replace(BROKEN, "valueProperty: $.token\n    groupBy: {model: $.model, type: $.type}", 1)


def cli(stack: LocalStack, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "meterline.cli", "dead-letters", *args], env=stack.env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"meterline dead-letters {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_dead_letters_stable(stack: LocalStack, seconds: float = 5.0, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = dead_letter_count(stack)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > seconds:
            return n
        time.sleep(1)
    return last


def wait_switched(stack: LocalStack, slug: str, old_generation: int, timeout: float = 180.0) -> None:
    """Until the meter answers from a newer generation and no row of another generation is left."""
    deadline = time.monotonic() + timeout
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    try:
        while time.monotonic() < deadline:
            stack.assert_running()
            a = httpx.get(f"{stack.url}/api/v1/meters/{slug}", timeout=10).json()["annotations"]
            active = a["meterline.activeGeneration"]
            if a["meterline.state"] == "ready" and active > old_generation:
                stray = sum(int(client.query(
                    f"SELECT count() FROM {table} WHERE meter = {{m:String}} AND generation != {{g:UInt64}}",
                    parameters={"m": slug, "g": active}).result_rows[0][0]) for table in ("meter_windows", "dead_letters"))
                if stray == 0:
                    return
            time.sleep(0.5)
    finally:
        client.close()
    pytest.fail(f"{slug} did not switch to a rebuilt generation in time; logs in {stack.data_dir}/logs")


def test_replay_after_config_fix(make_stack: MakeStack, make_sender: MakeSender, summary: Summary) -> None:
    started, row, seed, rng = begin(summary("20 dead-letter replay after fix"), 7)
    stack = make_stack(processors=1, config=BROKEN_CONFIG)
    stream = fault_stream(seed, fault_events() // 5, rng,
                                 invalid_rate=0.05)
    sender = make_sender(stack.url)
    sender.send_all(stream, rng)
    counted = caught_up(stack, sender)
    dead = wait_dead_letters_stable(stack)
    broken = compare(stack, counted, slugs=["tokens_total"])
    assert broken.mismatches, "the broken meter should have metered nothing"
    prompts = sum(1 for e in counted if e["type"] == "prompt")
    assert dead_letter_count(stack, "value_missing") >= prompts * 0.9

    # Fix the config and restart the processor on it: the new definition is rebuilt from stored events
    # and switched to, and the old generation's windows and dead letters are dropped.
    old = httpx.get(f"{stack.url}/api/v1/meters/tokens_total", timeout=10).json()["annotations"]
    stack.config_file.write_text(FAULT_CONFIG)
    stack.restart_processor(0)
    wait_switched(stack, "tokens_total", old["meterline.activeGeneration"])
    rebuilt = compare(stack, counted)
    assert not rebuilt.mismatches, "after the rebuild:\n" + "\n".join(rebuilt.mismatches[:20])
    # Replaying (twice: it must be idempotent) must not count anything a second time.
    first = cli(stack, "replay", "--meter", "tokens_total")
    after_first = compare(stack, counted)
    second = cli(stack, "replay", "--meter", "tokens_total")
    after_second = compare(stack, counted)
    assert not after_first.mismatches, "after the first replay:\n" + "\n".join(after_first.mismatches[:20])
    assert not after_second.mismatches, "after the second replay:\n" + "\n".join(after_second.mismatches[:20])
    cli(stack, "list", "--meter", "tokens_total", "--limit", "5")

    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    try:
        left = list_dead_letters(client, str(stack.database), meter="tokens_total", limit=None)
    finally:
        client.close()
    assert left, "invalid token values must stay dead letters"
    assert {outcome for _, outcome in left} == {"still_rejected"}, {outcome for _, outcome in left}

    # New events after the fix are metered by the processor itself, next to the replayed windows.
    later = fault_factory(seed + 1)
    more = [later.event() for _ in range(500)]
    sender.send_all(more, rng)
    counted = caught_up(stack, sender)
    row.note = f"{dead} dead letters; replay: {first.strip()[:60]}"
    assert first.split(",")[0] == second.split(",")[0], (first, second)
    finish(row, stack, sender, counted, started)
