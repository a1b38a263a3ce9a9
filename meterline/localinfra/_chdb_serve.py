"""Entry point of the local ClickHouse server subprocess: ``python -m meterline.localinfra._chdb_serve DATA_DIR``.

Why this trick: chdb embeds the full ClickHouse engine but no server binary. ``SYSTEM START LISTEN``
opens the HTTP/TCP listeners configured in ``./config.xml`` (read from the working directory), and an
endless ``sleepEachRow`` query keeps the embedded engine, and so the listeners, alive. Only
`LocalClickHouse` should start this; it sets the working directory and stops the process by PID.
"""

from __future__ import annotations

import os
import sys
import threading
import time

SERVE_QUERY = (
    "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
    "SELECT sleepEachRow(1) FROM numbers(1000000000) "
    "SETTINGS max_block_size=1, function_sleep_max_microseconds_per_block=0"
)


def _exit_when_orphaned(parent: int) -> None:
    """Exit if our parent goes away, covering starts where PR_SET_PDEATHSIG could not be used."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m meterline.localinfra._chdb_serve DATA_DIR", file=sys.stderr)
        return 2
    if not os.path.exists("config.xml"):
        print("config.xml missing from the working directory", file=sys.stderr)
        return 2
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    import chdb._chdb as chdb_native  # imported late: it is heavy and only needed here

    print(f"chdb serving data dir {argv[0]}", flush=True)
    chdb_native.query(SERVE_QUERY, "TabSeparated", path=argv[0])  # type: ignore[attr-defined]
    print("chdb serve query ended", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
