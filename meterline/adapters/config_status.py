"""config.yaml's meters as a process reports them, and the rule for starting with a broken file.

Meters live in the durable meter store; config.yaml is one way to change them. So a file that cannot be
applied never stops a process that already has meters in the store: hot reload keeps the last good
meters, and a restart starts with them too. Either way the process says loudly why the file was not
applied: an ERROR log, `meterline_config_valid` 0 on its /metrics, the `config` detail of its /readyz
(and `meterline validate-config` exits 1). Only a processor's first start (the store holds no meter at
all) with a broken file has nothing to run with, and refuses naming the file (docs/design.md, "Live
meters"); the API then starts anyway, so meters can be created through it.

The gauges live here, not in a process package, because the API (meter controller) and the processor
both report them and one Python process (tests) may import both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge

from meterline.adapters.meter_store import MeterCatalog
from meterline.core.errors import ConfigError
from meterline.core.meters import load_meters
from meterline.settings import Settings

logger = logging.getLogger(__name__)

CONFIG_VALID = Gauge("meterline_config_valid", "1 if the last config.yaml read was valid, else 0")
CONFIG_RELOADS = Counter("meterline_config_reloads_total", "config.yaml changes applied")
CONFIG_ERRORS = Counter("meterline_config_reload_errors_total", "config.yaml changes refused as invalid")


@dataclass
class ConfigStatus:
    """What /readyz and the log say about config.yaml."""

    path: str
    valid: bool = True
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    mtime: float | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "status": "valid" if self.valid else "invalid"}
        if self.detail:
            out["detail"] = self.detail
        if self.problems:
            out["notApplied"] = self.problems
        return out

    def mark_valid(self, detail: str = "") -> None:
        self.valid, self.detail = True, detail
        CONFIG_VALID.set(1)

    def mark_invalid(self, detail: str) -> None:
        self.valid, self.detail = False, detail
        CONFIG_VALID.set(0)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def start_meters(catalog: MeterCatalog, settings: Settings, *, actor: str) -> ConfigStatus:
    """Sync config.yaml's meters into the store (if newer than its last sync) and load the catalog.

    A broken `meters:` list is logged and reported, and the catalog keeps the stored meters; raises
    ConfigError only when the store holds no meter yet (first start: nothing to run with).
    """
    path = Path(settings.config_file)
    status = ConfigStatus(str(path), mtime=_mtime(path))
    try:
        status.problems = catalog.sync_settings(settings, actor=actor)
    except ConfigError as exc:
        catalog.refresh(force=True)
        if not catalog.states:
            raise ConfigError(
                f"{exc}\n{path} is invalid and the meter store holds no meter yet (a first start): refusing "
                "to start with nothing to meter. Fix the file (`meterline validate-config`) and start again."
            ) from None
        status.mark_invalid(str(exc))
        logger.error("config.yaml NOT applied: it is invalid. Running with the %d meters in the store until the "
                     "file is fixed:\n%s", sum(not s.deleted for s in catalog.states.values()), exc)
    else:
        status.mark_valid("" if path.exists() else "no config file")
    for problem in status.problems:
        logger.warning("config meter not applied: %s", problem)
    catalog.refresh(force=True)
    return status


def recheck(status: ConfigStatus) -> bool:
    """Re-validate the file when its mtime moved (without applying it); True if it was re-read."""
    path = Path(status.path)
    mtime = _mtime(path)
    if mtime == status.mtime:
        return False
    status.mtime = mtime
    if mtime is None:
        status.mark_valid("no config file")
        return True
    try:
        load_meters(path)
    except ConfigError as exc:
        if status.valid or exc.args[0] != status.detail:
            logger.error("config.yaml is invalid; the meters in the store stay in force:\n%s", exc)
        status.mark_invalid(str(exc))
        return True
    if not status.valid:
        logger.info("config.yaml is valid again; the meter controller applies it", extra={"path": str(path)})
    status.mark_valid()
    return True
