"""What ships: the wheel carries the core, adapters, jobs and the three processes, never the dev stack."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_leaves_out_the_local_dev_stack(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("meterline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith(".py")}
    assert {"meterline/core", "meterline/adapters", "meterline/jobs", "ingest", "processor", "query"} <= packages
    assert not [n for n in names if n.startswith("meterline/localinfra")]
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not [r for r in runtime if "chdb" in r or "httpx" in r], runtime


def test_dockerfile_runtime_stage_gets_only_the_wheel_and_config() -> None:
    """Sources copied into the runtime stage would bring the dev stack back; only built wheels may come in."""
    stages = (ROOT / "deploy" / "Dockerfile").read_text().split("\nFROM ")
    runtime = stages[-1]
    copies = [line.split()[1:] for line in runtime.splitlines() if line.startswith("COPY ")]
    assert copies, "the runtime stage copies nothing"
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        from_build = any(a.startswith("--from=") for a in args)
        assert from_build or sources == ["config.yaml"], f"runtime stage copies sources: COPY {' '.join(args)}"
    installs = [line for line in runtime.splitlines() if "pip install" in line]
    assert installs and all(".whl" in line for line in installs), installs
