"""Free ports and readiness polling for the local infrastructure subprocesses.

Why: tests and ``make run`` start several servers side by side; fixed ports would collide with each other
and with anything else on the machine, so every server binds a port the kernel just handed out.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class NotReadyError(RuntimeError):
    """Raised by `wait_for` when the named thing did not come up in time."""


def free_port(host: str = HOST) -> int:
    """Return a TCP port that is free right now (bind port 0 and let the kernel choose).

    The port is released before returning, so there is a tiny race with other processes; the kernel
    hands out ephemeral ports round-robin, which makes an immediate reuse very unlikely.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    """True if nothing listens on ``host:port``, i.e. a server could bind it now.

    SO_REUSEADDR as servers use it: connections a stopped server left in TIME_WAIT do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``predicate`` until it returns True; raise `NotReadyError` naming ``what`` otherwise.

    Exceptions from ``predicate`` count as "not yet" (a server that is still starting refuses
    connections); the last one is chained so the failure says why. ``alive`` lets the caller stop
    waiting at once when the process it is waiting for has already died.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if predicate():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
        if alive is not None and not alive():
            raise NotReadyError(f"{what} exited before it was ready") from last_error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise NotReadyError(f"{what} did not come up within {timeout:g}s{detail}") from last_error
        time.sleep(interval)
