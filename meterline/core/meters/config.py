"""The ``meters`` list of config.yaml: validated all at once, every problem listed with file and key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from meterline.core.errors import ConfigError
from meterline.core.meters.model import Meter

__all__ = ["load_meters", "validate_meters"]


_IGNORED_KEYS = frozenset({"windowSize"})
"""Legacy OpenMeter key; meterline always stores minute windows and picks the size per query."""


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "meter"


def validate_meters(raw: Any, source: str) -> list[Meter]:
    """Validate the ``meters`` list of a config file and return Meter objects.

    ``raw`` is the value of the ``meters`` key (a whole config mapping is also accepted).
    Every problem in every meter is collected, then one ConfigError lists them all as
    ``"<source>: meters[<i>] (<slug>).<field>: <message>"`` so an operator fixes the file
    in one pass instead of one error per restart.
    """
    if isinstance(raw, Mapping):
        raw = raw.get("meters")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: meters: must be a list, got {type(raw).__name__}")
    problems: list[str] = []
    meters: list[Meter] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            problems.append(f"{source}: meters[{i}]: must be a mapping, got {type(item).__name__}")
            continue
        slug = item.get("slug")
        where = f"{source}: meters[{i}] ({slug if isinstance(slug, str) else '?'})"
        data = {k: v for k, v in item.items() if k not in _IGNORED_KEYS}
        try:
            meter = Meter.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "missing":
                    msg = "is required"
                problems.append(f"{where}.{_fmt_loc(tuple(err['loc']))}: {msg}")
            continue
        if meter.slug in seen:
            problems.append(f"{where}.slug: duplicate slug (first defined at meters[{seen[meter.slug]}])")
        else:
            seen[meter.slug] = i
            meters.append(meter)
    if problems:
        raise ConfigError("\n".join(problems))
    return meters


def load_meters(path: str | Path) -> list[Meter]:
    """Read ``meters`` from a config.yaml (other top-level keys are service settings)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    if doc is None:
        return []
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(doc).__name__}")
    return validate_meters(doc.get("meters"), source)
