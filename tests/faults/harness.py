"""What every fault scenario shares: the meters and their oracle, a retrying HTTP client that records
every answer, the catch-up wait, the window-by-window comparison and the summary row.

The comparison reads only through the query API (HOUR windows, grouped by subject and each meter's
groupBy keys) and compares EVERY window, in both directions, with tests/oracle.py -- a window the
pipeline invented counts as a mismatch just like a missing or wrong one.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from prometheus_client.parser import text_string_to_metric_families

from meterline.adapters.clickhouse import connect
from meterline.localinfra.ports import NotReadyError, wait_for
from meterline.localinfra.stack import LocalStack
from tests.oracle import (
    WIDE,
    EventFactory,
    OracleMeter,
    config_yaml,
    expected,
    first_sightings,
    response_windows,
)

METERS: dict[str, OracleMeter] = {
    "tokens_total": OracleMeter("tokens_total", "prompt", "SUM", "tokens", ("model", "type")),
    "prompt_count": OracleMeter("prompt_count", "prompt", "COUNT", None, ("model",)),
    "tokens_max": OracleMeter("tokens_max", "prompt", "MAX", "tokens"),
    "active_users": OracleMeter("active_users", "activity", "UNIQUE_COUNT", "user_id"),
    "activity_count": OracleMeter("activity_count", "activity", "COUNT"),
    "storage_latest": OracleMeter("storage_latest", "storage", "LATEST", "bytes", ("tier",)),
    "storage_count": OracleMeter("storage_count", "storage", "COUNT", None, ("tier",)),
}
#: One COUNT meter per event type: their totals say whether every accepted event has been processed.
FAULT_CONFIG = config_yaml(METERS.values())
PROGRESS_METERS = ("prompt_count", "activity_count", "storage_count")

START = datetime(2024, 1, 1, tzinfo=UTC)
SPAN = timedelta(hours=6)
#: The query range covers late events days before START and the whole generated span.
RANGE_FROM = START - timedelta(days=10)
RANGE_TO = START + timedelta(days=1)


# -- sizes and seeds (env-configurable) ----------------------------------------------------------

def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def fault_events() -> int:
    """Events of the biggest scenario (kill -9 loop); the others use fractions of it."""
    return env_int("METERLINE_FAULT_EVENTS", 20_000)


def fault_seed() -> int:
    return env_int("METERLINE_FAULT_SEED", 20240101)


def liveness_timeout() -> float:
    """How long the processor may take to catch up after the last fault: a liveness bound, not speed."""
    return float(env_int("METERLINE_FAULT_TIMEOUT", 300))


# -- event streams -------------------------------------------------------------------------------

def stream_with_retries(factory: EventFactory, n: int, rng: random.Random, dup_rate: float = 0.1,
                        invalid_rate: float = 0.0, large_rate: float = 0.0) -> list[dict[str, Any]]:
    """`n` fresh events plus `dup_rate * n` exact copies, each placed somewhere after its original
    (a client retrying an event it believes was lost); `large_rate`: see EventFactory.event."""
    fresh = [factory.event(invalid_rate=invalid_rate, large_rate=large_rate) for _ in range(n)]
    out = list(fresh)
    for i in sorted(rng.sample(range(n), int(n * dup_rate)), reverse=True):
        out.insert(rng.randrange(i + 1, len(out) + 1), dict(fresh[i]))
    return out


def fault_factory(seed: int) -> EventFactory:
    """Events of the fault span (START + SPAN), drawn from `seed`."""
    return EventFactory(seed=seed, start=START, span=SPAN)


def fault_stream(seed: int, n: int, rng: random.Random, **options: float) -> list[dict[str, Any]]:
    """`stream_with_retries` over `n` events of the fault span drawn from `seed` (what most scenarios send)."""
    return stream_with_retries(fault_factory(seed), n, rng, **options)


def batches(events: Sequence[dict[str, Any]], rng: random.Random, low: int = 1, high: int = 300) -> list[list[dict[str, Any]]]:
    out, i = [], 0
    while i < len(events):
        size = rng.randint(low, high)
        out.append(list(events[i : i + size]))
        i += size
    return out


# -- the client ----------------------------------------------------------------------------------

@dataclass
class Sender:
    """POSTs batches the way a real client does: a 503 or a dropped connection is retried (same
    events, same ids) until the batch gets a 2xx. Records every status and every accepted event."""

    url: str
    retry_delay: float = 0.5
    max_attempt_seconds: float = 30.0
    sent: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    statuses: Counter[int | str] = field(default_factory=Counter)
    #: (status, seconds) of every attempt, for bounded-latency assertions
    attempts: list[tuple[int | str, float]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._client = httpx.Client(base_url=self.url, timeout=self.max_attempt_seconds)

    def close(self) -> None:
        self._client.close()

    def post_once(self, batch: list[dict[str, Any]]) -> int | str:
        started = time.monotonic()
        try:
            resp = self._client.post(
                "/api/v1/events", json=batch, headers={"content-type": "application/cloudevents-batch+json"}
            )
            status: int | str = resp.status_code
            if status not in (204, 503):
                self.unexpected.append(f"{status}: {resp.text[:300]}")
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        with self._lock:
            self.sent += len(batch)
            self.statuses[status] += 1
            self.attempts.append((status, time.monotonic() - started))
            if status == 204:
                self.accepted.extend(batch)
        return status

    def send(self, batch: list[dict[str, Any]], *, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + liveness_timeout()
        while self.post_once(batch) != 204:
            if time.monotonic() > deadline:
                raise AssertionError(f"batch never accepted; statuses so far {dict(self.statuses)}")
            time.sleep(self.retry_delay)

    def send_chunks(self, chunks: Iterable[list[dict[str, Any]]], *, pace: float = 0.0) -> None:
        for chunk in chunks:
            self.send(chunk)
            if pace:
                time.sleep(pace)

    def send_all(self, events: Sequence[dict[str, Any]], rng: random.Random, low: int = 1,
                 high: int = 300) -> None:
        """Send `events` in random `batches` of `low`..`high` events, each retried until accepted."""
        self.send_chunks(batches(events, rng, low, high))


class Background(threading.Thread):
    """Runs a callable in a thread and re-raises its exception in `join_checked`."""

    def __init__(self, target: Any) -> None:
        super().__init__(daemon=True)
        self._fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = exc

    def join_checked(self, timeout: float | None = None) -> None:
        self.join(timeout)
        assert not self.is_alive(), "sender thread did not finish"
        if self.error is not None:
            raise self.error


def feed_in_background(sender: Sender, events: Sequence[dict[str, Any]], rng: random.Random,
                       over_seconds: float) -> Background:
    """Send `events` in random `batches` from a thread, spread over about `over_seconds` (at most 0.2 s
    apart), so the faults a test injects meanwhile land while messages are being produced and processed."""
    chunks = batches(events, rng)
    pace = max(0.0, min(0.2, over_seconds / len(chunks)))
    feeder = Background(lambda: sender.send_chunks(chunks, pace=pace))
    feeder.start()
    return feeder


# -- reading back --------------------------------------------------------------------------------

def query(stack: LocalStack, slug: str, params: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query", params=params, timeout=60)
    assert resp.status_code == 200, f"{slug}: {resp.status_code} {resp.text[:500]}"
    body: dict[str, Any] = json.loads(resp.text, parse_float=Decimal)  # every digit, not a float's 17
    return body


def totals(stack: LocalStack, slugs: Sequence[str] = PROGRESS_METERS, *, start: datetime = RANGE_FROM,
           end: datetime = RANGE_TO) -> tuple[Decimal, ...] | None:
    """Whole-range totals of the progress meters, or None while the query side cannot answer."""
    out = []
    try:
        for slug in slugs:
            resp = httpx.get(f"{stack.url}/api/v1/meters/{slug}/query",
                             params={"from": start.isoformat(), "to": end.isoformat()}, timeout=30)
            if resp.status_code != 200:
                return None
            data = json.loads(resp.text, parse_float=Decimal)["data"]
            with localcontext(WIDE):  # the default context would round totals past 28 digits
                out.append(sum((Decimal(r["value"]) for r in data), Decimal(0)))
    except httpx.HTTPError:
        return None
    return tuple(out)


def expected_totals(counted: Sequence[dict[str, Any]], slugs: Sequence[str] = PROGRESS_METERS, *,
                    start: datetime = RANGE_FROM, end: datetime = RANGE_TO) -> tuple[Decimal, ...]:
    with localcontext(WIDE):
        return tuple(
            sum(expected(counted, METERS[s], start=start, end=end, window=None, by_subject=False).values(),
                Decimal(0))
            for s in slugs
        )


def wait_caught_up(stack: LocalStack, counted: Sequence[dict[str, Any]], *, timeout: float | None = None,
                   stable_seconds: float = 60.0, start: datetime = RANGE_FROM,
                   end: datetime = RANGE_TO) -> tuple[Decimal, ...] | None:
    """Poll until the progress totals equal the oracle's, or have not changed for `stable_seconds`
    (then the comparison reports what differs), or the liveness bound passes. Returns the last totals.

    After a match it waits a little longer and requires the same totals again, so a late double
    count (a replay after the match) still shows up in the comparison.
    """
    want = expected_totals(counted, start=start, end=end)
    deadline = time.monotonic() + (timeout or liveness_timeout())
    last: tuple[Decimal, ...] | None = None
    changed = time.monotonic()
    while time.monotonic() < deadline:
        got = totals(stack, start=start, end=end)
        if got != last:
            last, changed = got, time.monotonic()
        if got == want:
            time.sleep(3.0)
            if totals(stack, start=start, end=end) == want:
                return got
        elif got is not None and time.monotonic() - changed > stable_seconds:
            return got
        time.sleep(1.0)
    return last


@dataclass
class Comparison:
    windows: int = 0
    mismatches: list[str] = field(default_factory=list)


def compare(stack: LocalStack, counted: Sequence[dict[str, Any]], *, slugs: Sequence[str] | None = None,
            start: datetime = RANGE_FROM, end: datetime = RANGE_TO) -> Comparison:
    """Every HOUR window (by subject and groupBy keys) of every meter vs the oracle, both directions."""
    result = Comparison()
    for slug in slugs or sorted(METERS):
        meter = METERS[slug]
        group_by = list(meter.group_fields)
        params: dict[str, Any] = {"from": start.isoformat(), "to": end.isoformat(), "windowSize": "HOUR",
                                  "groupBy": ["subject", *group_by]}
        got = response_windows(query(stack, slug, params), group_by)
        want = expected(counted, meter, start=start, end=end, window="HOUR", group_by=group_by)
        keys = set(got) | set(want)
        result.windows += len(keys)
        for key in sorted(keys, key=repr):
            if got.get(key) != want.get(key):
                result.mismatches.append(
                    f"{slug} {key[0].isoformat()} {key[1]} {key[2]}: got {got.get(key)} want {want.get(key)}"
                )
    return result


# -- what a processor worker reports (observable state to wait on instead of sleeping) -----------

def worker_metric(stack: LocalStack, index: int, name: str) -> float:
    """Sum over labels of metric `name` (without `_total`) from worker `index`'s /metrics."""
    text = httpx.get(stack.processor_url(index) + "/metrics", timeout=5).text
    return sum(s.value for family in text_string_to_metric_families(text) if family.name == name
               for s in family.samples if not s.name.endswith("_created"))


def assigned(stack: LocalStack, index: int) -> int:
    return int(worker_metric(stack, index, "meterline_processor_assigned_partitions"))


def wait_until(predicate: Callable[[], bool], what: str, stack: LocalStack, timeout: float = 120.0) -> None:
    """Poll `predicate` (exceptions = not yet) and fail naming `what`, with the processor logs."""
    try:
        wait_for(predicate, timeout=timeout, what=what, interval=0.2)
    except NotReadyError as exc:
        raise AssertionError(f"{what}: {exc}\nprocessor logs:\n{log_excerpt(stack)}") from exc


def wait_owners(stack: LocalStack, owners: Sequence[int], partitions: int) -> None:
    """Wait until exactly the live workers `owners` share every partition, each owning at least one."""
    def settled() -> bool:
        counts = [assigned(stack, i) for i in owners]
        return sum(counts) == partitions and all(counts)
    wait_until(settled, f"workers {list(owners)} to own all {partitions} partitions", stack)


# -- direct ClickHouse facts (for the summary and diagnosis) ---------------------------------------

def clickhouse_scalar(stack: LocalStack, sql: str) -> Any:
    client = connect(str(stack.clickhouse_url), database=str(stack.database))
    try:
        return client.query(sql).result_rows[0][0]
    finally:
        client.close()


def dead_letter_count(stack: LocalStack, reason_code: str | None = None) -> int:
    where = f" WHERE reason_code = '{reason_code}'" if reason_code else ""
    return int(clickhouse_scalar(stack, f"SELECT count() FROM dead_letters FINAL{where}"))


def stored_event_count(stack: LocalStack) -> int:
    return int(clickhouse_scalar(stack, "SELECT count() FROM events FINAL"))


def assert_worker_alive(stack: LocalStack, when: str, index: int = 0) -> None:
    """Fail (with the processor logs) if worker `index` has died: the documented behaviour under an
    outage is to retry, never to crash."""
    assert stack.workers[index].running, f"processor died {when}:\n{log_excerpt(stack)}"


def log_excerpt(stack: LocalStack, lines: int = 15) -> str:
    """The last lines of every processor log, for a failure message that points at the cause."""
    out = []
    for path in sorted(Path(stack.data_dir, "logs").glob("processor-*.log")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {path}\n" + "\n".join(text))
    return "\n".join(out)


@dataclass
class ScenarioRow:
    scenario: str
    sent: int = 0
    accepted: int = 0
    duplicates_dropped: int = 0
    late: int = 0
    dead_lettered: int = 0
    windows_checked: int = 0
    mismatches: int | str = "-"
    seconds: float = 0.0
    note: str = ""


#: The fixtures of tests/faults/conftest.py, as a scenario's parameters are annotated.
MakeStack = Callable[..., LocalStack]
MakeSender = Callable[..., Sender]
Summary = Callable[[str], ScenarioRow]


class Scenario(NamedTuple):
    """What every scenario starts with (unpack it): its clock for the summary's seconds, its summary row,
    its seed (`fault_seed()` + the scenario's own offset, so scenarios draw different events) and the
    random numbers drawn from that seed."""

    started: float
    row: ScenarioRow
    seed: int
    rng: random.Random


def begin(row: ScenarioRow, seed_offset: int = 0) -> Scenario:
    """`started, row, seed, rng = begin(summary("name"), offset)` at the top of a scenario."""
    seed = fault_seed() + seed_offset
    return Scenario(time.monotonic(), row, seed, random.Random(seed))


def caught_up(stack: LocalStack, sender: Sender, *, extra: Sequence[dict[str, Any]] = (),
              stable_seconds: float = 60.0) -> list[dict[str, Any]]:
    """What the oracle counts -- the first sighting of every accepted event, plus `extra` events a test
    wrote past ingest -- once the processor has caught up with it (`wait_caught_up`)."""
    counted = first_sightings(sender.accepted) + list(extra)
    wait_caught_up(stack, counted, stable_seconds=stable_seconds)
    return counted


def finish(row: ScenarioRow, stack: LocalStack, sender: Sender, counted: Sequence[dict[str, Any]],
           started: float, *, start: datetime = RANGE_FROM, end: datetime = RANGE_TO) -> None:
    """`compare` every window of every meter in [start, end), fill the summary row from the oracle and
    ClickHouse, then fail with a diagnosis on any mismatch."""
    comparison = compare(stack, counted, start=start, end=end)
    row.sent = sender.sent
    row.accepted = len(sender.accepted)
    row.duplicates_dropped = len(sender.accepted) - len(first_sightings(sender.accepted))
    try:
        row.dead_lettered = dead_letter_count(stack)
    except Exception as exc:  # noqa: BLE001 - the summary must not hide the real assertion
        row.note += f" dead-letter count failed: {exc}"
    row.windows_checked = comparison.windows
    row.mismatches = len(comparison.mismatches)
    row.seconds = time.monotonic() - started
    assert not comparison.mismatches, (
        f"{row.scenario}: {len(comparison.mismatches)} of {comparison.windows} windows differ "
        f"(seed {fault_seed()}):\n" + "\n".join(comparison.mismatches[:25])
        + f"\nprocessor logs ({stack.data_dir}/logs):\n{log_excerpt(stack)}"
    )
    assert len(counted) > 0


def dead_letters_api(stack: LocalStack, **params: Any) -> list[dict[str, Any]]:
    """GET /api/v1/dead-letters (params: meter, reasonCode, from, to, limit <= 1000)."""
    params.setdefault("limit", 1000)
    resp = httpx.get(f"{stack.url}/api/v1/dead-letters", params=params, timeout=30)
    assert resp.status_code == 200, resp.text[:500]
    return list(resp.json())


def settle(row: ScenarioRow, stack: LocalStack, sender: Sender, started: float) -> None:
    """Wait until the processor has caught up with every accepted event, then compare every window
    with the oracle and fill the summary row (fails with a diagnosis on any mismatch)."""
    finish(row, stack, sender, caught_up(stack, sender), started)
