"""The published OpenMeter SDKs, installed into throwaway environments under `.local/sdk/` (pinned).

Why throwaway environments: the SDKs are what a user of OpenMeter runs; they must not share
meterline's virtualenv (their dependencies would leak into the project's and vice versa). Each
environment is installed once and reused while its pin is unchanged (a stamp file names the pin), so
reruns of `make test` are fast. `python -m tests.conformance.sdks` installs what is missing (`make test`
runs it first).

- Python: PyPI `openmeter` (the SDK generated in OpenMeter's repository, `api/client/python`). Its only
  final release, 2.0.0 (what `pip install openmeter` picks), is an older package that fails at import
  (`openmeter.types.entitlement_list_params` is missing), so the pin is a 1.0.0b release.
- JavaScript: npm `@openmeter/sdk`, run with the machine's Node (the package asks for Node 22 in
  `engines`; it runs on Node 20, which has `fetch`, so npm is told not to enforce engines).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

PYTHON_SDK = "openmeter==1.0.0b236"
JS_SDK = "@openmeter/sdk@1.0.0-beta.232"

ROOT = Path(__file__).resolve().parents[2]
SDK_DIR = ROOT / ".local" / "sdk"
PY_ENV = SDK_DIR / "python"
JS_ENV = SDK_DIR / "js"


def _stamped(env: Path, pin: str) -> bool:
    stamp = env / ".installed"
    return stamp.exists() and stamp.read_text().strip() == pin


def python_sdk() -> Path:
    """The interpreter of a virtualenv that has the pinned Python SDK (installed if missing)."""
    python = PY_ENV / "bin" / "python"
    if not _stamped(PY_ENV, PYTHON_SDK):
        shutil.rmtree(PY_ENV, ignore_errors=True)
        venv.EnvBuilder(with_pip=True).create(PY_ENV)
        subprocess.run([str(python), "-m", "pip", "install", "-q", PYTHON_SDK], check=True)
        (PY_ENV / ".installed").write_text(PYTHON_SDK + "\n")
    return python


def node() -> str:
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("node is not installed: the JavaScript SDK conformance tests need Node 20+")
    return found


def js_sdk() -> Path:
    """A directory whose node_modules has the pinned JavaScript SDK (installed if missing)."""
    if not _stamped(JS_ENV, JS_SDK):
        shutil.rmtree(JS_ENV, ignore_errors=True)
        JS_ENV.mkdir(parents=True)
        (JS_ENV / "package.json").write_text('{"name": "meterline-conformance", "private": true, "type": "module"}\n')
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed: the JavaScript SDK conformance tests need it")
        env = {**os.environ, "npm_config_engine_strict": "false", "npm_config_fund": "false",
               "npm_config_audit": "false", "npm_config_update_notifier": "false"}
        subprocess.run([npm, "install", "--silent", "--no-save", "--omit=peer", JS_SDK], cwd=JS_ENV, check=True,
                       env=env)
        (JS_ENV / ".installed").write_text(JS_SDK + "\n")
    return JS_ENV


if __name__ == "__main__":
    print(python_sdk(), js_sdk(), file=sys.stderr)
