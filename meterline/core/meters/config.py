"""The ``meters`` list of config.yaml: validated all at once, every problem listed with file and key.

config.yaml holds two things with different lives: service settings (read only from the file and the
environment) and meters (synced into the durable meter store, where the last good ones stay). So a YAML
error confined to the ``meters:`` block must not make the settings unreadable: `read_config` then returns
the settings with ``meters`` set to an `UnreadableMeters`, and a process starts with the stored meters
(docs/design.md, "Live meters", hot reload and restart).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from meterline.core.errors import ConfigError
from meterline.core.meters.model import Meter

__all__ = ["UnreadableMeters", "load_meters", "read_config", "validate_meters"]


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
    if isinstance(raw, UnreadableMeters):
        raise ConfigError(raw.problem)
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


@dataclass(frozen=True, slots=True)
class UnreadableMeters:
    """The value of a ``meters:`` block that is not valid YAML while the rest of the file is."""

    problem: str


_TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(?:\s|$)")


def read_config(text: str, source: str) -> dict[str, Any]:
    """The top-level mapping of a config file (empty for an empty one).

    A YAML error inside the ``meters:`` block alone yields the other keys plus ``meters`` =
    `UnreadableMeters`; any other unreadable file raises ConfigError naming it.
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return _beside_broken_meters(text, source, exc)
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(doc).__name__}")
    return dict(doc)


def _beside_broken_meters(text: str, source: str, error: yaml.YAMLError) -> dict[str, Any]:
    """Parse each top-level block on its own; only a broken ``meters`` block is tolerated.

    Splitting is attempted only on plain block-style files: every line at column 0 is blank, a comment
    or an unquoted ``key:``. Anything else (document markers, directives, flow text at column 0), a
    repeated key, an alias into another block, or a settings block that does not parse on its own
    raises the whole file's error: the settings are then unknown and the process must not guess.
    """
    refused = ConfigError(f"{source}: invalid YAML: {error}")
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            if current is not None:
                current.append(line)
            continue
        if line[0] in " \t" or line == "-" or line.startswith("- "):  # indented, or a compact list item
            if current is None:
                raise refused
            current.append(line)
            continue
        match = _TOP_KEY.match(line)
        if match is None or match.group(1) in blocks:
            raise refused
        current = blocks[match.group(1)] = [line]
    out: dict[str, Any] = {}
    for key, lines in blocks.items():
        try:
            part = yaml.safe_load("\n".join(lines))
        except yaml.YAMLError:
            if key != "meters":
                raise refused from None
            out[key] = UnreadableMeters(f"{source}: meters: invalid YAML: {error}")
            continue
        if not isinstance(part, Mapping) or list(part) != [key]:
            raise refused
        out[key] = part[key]
    if not isinstance(out.get("meters"), UnreadableMeters):
        raise refused  # every block parses alone, so the error spans blocks: nothing is safe to read
    return out


def load_meters(path: str | Path) -> list[Meter]:
    """Read ``meters`` from a config.yaml (other top-level keys are service settings)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    return validate_meters(read_config(text, source).get("meters"), source)
