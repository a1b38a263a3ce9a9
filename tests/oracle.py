"""An independent oracle for metered usage, shared by the e2e and fault tests.

It never imports meterline's meter or window code: values are read with plain dict access, numbers
with `Decimal`, buckets with `zoneinfo`, so a bug in the pipeline cannot hide in the oracle too.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import Any
from zoneinfo import ZoneInfo

NUMERIC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
#: Wide enough that no sum, average or normalisation of stored values rounds (Python's default keeps 28
#: digits; Decimal128(9) values have up to 38 and query totals up to 76).
WIDE = Context(prec=200)


@dataclass(frozen=True)
class OracleMeter:
    """What a meter means, stated without JSONPath: top-level `data` fields only."""

    slug: str
    event_type: str
    aggregation: str
    value_field: str | None = None
    group_fields: tuple[str, ...] = ()


def config_yaml(meters: Iterable[OracleMeter]) -> str:
    """The config.yaml that means exactly what these oracle meters mean, so the two cannot drift apart."""
    lines = ["meters:"]
    for m in meters:
        lines += [f"  - slug: {m.slug}", f"    eventType: {m.event_type}", f"    aggregation: {m.aggregation}"]
        if m.value_field:
            lines.append(f"    valueProperty: $.{m.value_field}")
        if m.group_fields:
            lines.append("    groupBy: {" + ", ".join(f"{g}: $.{g}" for g in m.group_fields) + "}")
    return "\n".join(lines) + "\n"


def meter_body(m: OracleMeter) -> dict[str, Any]:
    """The `POST /api/v1/meters` body that means exactly what this oracle meter means (as `config_yaml`)."""
    body: dict[str, Any] = {"slug": m.slug, "eventType": m.event_type, "aggregation": m.aggregation}
    if m.value_field:
        body["valueProperty"] = f"$.{m.value_field}"
    if m.group_fields:
        body["groupBy"] = {g: f"$.{g}" for g in m.group_fields}
    return body


def numeric(value: Any) -> Decimal | None:
    """The metered number, or None when the value must not be metered."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str) and NUMERIC.match(value):
        return Decimal(value)
    return None


def bucket(t: datetime, window: str | None, tz: str, start: datetime) -> datetime:
    """Start of the window holding `t` in zone `tz` (None = the whole range, keyed by `start`)."""
    if window is None:
        return start
    local = t.astimezone(ZoneInfo(tz))
    if window == "MINUTE":
        local = local.replace(second=0, microsecond=0)
    elif window == "HOUR":
        local = local.replace(minute=0, second=0, microsecond=0)
    elif window == "DAY":
        local = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elif window == "MONTH":
        local = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    # Re-resolve the wall time in the zone so the offset is the one valid at the bucket start.
    return datetime(local.year, local.month, local.day, local.hour, local.minute, tzinfo=ZoneInfo(tz)).astimezone(UTC)


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)  # 3.11+ reads the "Z" suffix


Key = tuple[datetime, str | None, tuple[str | None, ...]]


def expected(
    events: Iterable[dict[str, Any]],
    meter: OracleMeter,
    *,
    start: datetime,
    end: datetime,
    window: str | None = "HOUR",
    tz: str = "UTC",
    group_by: Sequence[str] = (),
    by_subject: bool = True,
    where: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[Key, Decimal]:
    """Expected value per (window start, subject, groupBy values) over [start, end).

    `events` must already be deduplicated (first sighting of each (source, id) only). `where(event)`
    keeps only the events it accepts (filters). Windows keep their bucket's own start even when
    `start` cuts into the bucket (OpenMeter's shape); without a window the key is `start`.
    """
    acc: dict[Key, list[tuple[datetime, int, Any]]] = defaultdict(list)
    for rank, ev in enumerate(events):
        if ev["type"] != meter.event_type:
            continue
        t = parse_time(ev["time"])
        if not (start <= t < end) or (where is not None and not where(ev)):
            continue
        data = ev.get("data")
        data = data if isinstance(data, dict) else {}
        if meter.aggregation == "COUNT":
            value: Any = 1
        elif meter.aggregation == "UNIQUE_COUNT":
            raw = data.get(meter.value_field or "")
            if raw is None or isinstance(raw, dict | list):
                continue
            value = raw if isinstance(raw, str) else (str(raw).lower() if isinstance(raw, bool) else numeric(raw))
            if value is None:
                continue
            value = value if isinstance(value, str) else format(value.normalize(WIDE), "f")
        else:
            value = numeric(data.get(meter.value_field or ""))
            if value is None:
                continue
        groups = tuple(_group_text(data.get(g)) for g in group_by)
        key = (bucket(t, window, tz, start), ev["subject"] if by_subject else None, groups)
        acc[key].append((t, rank, value))
    with localcontext(WIDE):
        return {key: _aggregate(meter.aggregation, items) for key, items in acc.items()}


def _group_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _aggregate(aggregation: str, items: list[tuple[datetime, int, Any]]) -> Decimal:
    values = [v for _, _, v in items]
    if aggregation == "COUNT":
        return Decimal(len(values))
    if aggregation == "SUM":
        return sum(values, Decimal(0))
    if aggregation == "AVG":  # documented precision: 9 fractional digits, half-even
        return (sum(values, Decimal(0)) / len(values)).quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)
    if aggregation == "MIN":
        return min(values)
    if aggregation == "MAX":
        return max(values)
    if aggregation == "UNIQUE_COUNT":
        return Decimal(len(set(values)))
    if aggregation == "LATEST":
        return max(items, key=lambda item: (item[0], item[1]))[2]
    raise ValueError(aggregation)


def filter_matches(value: str | None, f: dict[str, Any]) -> bool:
    """An independent reading of OpenMeter's FilterString for the oracle: a missing value (None) matches
    only the negative operators ($ne $nin $nlike $nilike $ncontains); LIKE with `%` and `_`."""
    (op, arg), = ((k, v) for k, v in f.items() if v is not None)
    if op == "$or":
        return any(filter_matches(value, g) for g in arg)
    if op == "$and":
        return all(filter_matches(value, g) for g in arg)
    if op == "$exists":
        return (value is not None) == arg
    if value is None:
        return op in ("$ne", "$nin", "$nlike", "$nilike", "$ncontains")

    def like(pattern: str, fold: bool) -> bool:
        regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
        return re.fullmatch(regex, value, re.DOTALL | (re.IGNORECASE if fold else 0)) is not None

    checks: dict[str, Callable[[], bool]] = {
        "$eq": lambda: value == arg, "$ne": lambda: value != arg, "$in": lambda: value in arg,
        "$nin": lambda: value not in arg, "$like": lambda: like(arg, False), "$nlike": lambda: not like(arg, False),
        "$ilike": lambda: like(arg, True), "$nilike": lambda: not like(arg, True),
        "$contains": lambda: arg.lower() in value.lower(), "$ncontains": lambda: arg.lower() not in value.lower(),
        "$gt": lambda: value > arg, "$gte": lambda: value >= arg, "$lt": lambda: value < arg, "$lte": lambda: value <= arg,
    }
    return checks[op]()


def first_sightings(sent: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events that count: the first of each (source, id), in sending order."""
    seen: set[tuple[str, str]] = set()
    out = []
    for ev in sent:
        key = (ev["source"], ev["id"])
        if key not in seen:
            seen.add(key)
            out.append(ev)
    return out


def first_sighting_decider() -> Callable[[bytes, Any], bool]:
    """An in-memory `decide(key, position)` for the processor's row builder: a key's first call
    accepts, every later call is a duplicate (no replays, unlike processor/dedupe.py)."""
    seen: set[bytes] = set()

    def decide(key: bytes, position: Any) -> bool:
        if key in seen:
            return False
        seen.add(key)
        return True

    return decide


def response_windows(body: dict[str, Any], group_by: Sequence[str]) -> dict[Key, Decimal]:
    """The query API's answer keyed like `expected` (groupBy `subject` goes into the subject slot)."""
    out: dict[Key, Decimal] = {}
    for row in body["data"]:
        groups = row.get("groupBy") or {}
        key = (
            parse_time(row["windowStart"]),
            row.get("subject"),
            tuple(groups.get(g) for g in group_by),
        )
        assert key not in out, f"window returned twice: {key}"
        value = row["value"]
        # A float has lost digits already: parse bodies with `json.loads(text, parse_float=Decimal)`
        # to compare large values exactly.
        out[key] = value if isinstance(value, Decimal) else Decimal(str(value))
    return out


@dataclass
class EventFactory:
    """Generates realistic usage events with known content; `seed` makes a run reproducible."""

    seed: int = 0
    subjects: Sequence[str] = ("customer-1", "customer-2", "customer-3", "customer-4", "customer-5")
    start: datetime = datetime(2024, 1, 1, tzinfo=UTC)
    span: timedelta = timedelta(hours=6)
    rng: random.Random = field(init=False)
    counter: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def event(self, *, when: datetime | None = None, invalid_rate: float = 0.0, large_rate: float = 0.0) -> dict[str, Any]:
        """One event; `large_rate` of the token counts are 34-digit decimals (sent as strings, the only
        exact way), beyond the 28 digits of Python's default decimal context yet far enough below
        Decimal128(9)'s 10^29 that a 500-event message of them cannot overflow a window's sum."""
        rng = self.rng
        self.counter += 1
        offset_ms = rng.randrange(int(self.span.total_seconds() * 1000))
        t = when or (self.start + timedelta(milliseconds=offset_ms))
        kind = rng.choice(("prompt", "prompt", "prompt", "activity", "storage"))
        data: dict[str, Any]
        if kind == "prompt":
            tokens: Any = rng.randrange(1, 5000)
            tokens = rng.choice((tokens, str(tokens), f"{tokens}.25", f"{tokens}e1"))
            if large_rate and rng.random() < large_rate:
                large = Decimal(rng.randrange(-(10**34) + 1, 10**34)).scaleb(-9, WIDE)  # |value| < 10^25
                tokens = rng.choice((format(large, "f"), format(large.normalize(WIDE), "e")))
            if rng.random() < invalid_rate:
                tokens = rng.choice(("lots", None, True, "NaN", {"n": 1}))
            data = {"tokens": tokens, "model": rng.choice(("gpt-4", "gpt-3.5", "claude")), "type": rng.choice(("input", "output"))}
            if rng.random() < 0.05:
                del data["model"]  # the missing-group bucket
        elif kind == "activity":
            data = {"user_id": f"user-{rng.randrange(40)}"}
        else:
            data = {"bytes": rng.randrange(10**9), "tier": rng.choice(("hot", "cold"))}
        return {
            "specversion": "1.0",
            "id": f"evt-{self.seed}-{self.counter}",
            "source": rng.choice(("svc-a", "svc-b")),
            "type": kind,
            "subject": rng.choice(self.subjects),
            "time": t.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": data,
        }
