"""`KeepAliveHttpToolsProtocol` closes idle keep-alive connections when uvicorn's own protocol does.

Both protocols serve a small app under uvicorn on free ports, and real sockets measure when the server
closes a connection after its last response: uvicorn's stock httptools protocol is the oracle beside
ours, and both must close `timeout_keep_alive` seconds after the last response (not before: a request
sent a moment earlier is served on the same connection), whatever requests came before it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from meterline.adapters.http_protocol import KeepAliveHttpToolsProtocol
from meterline.localinfra.ports import free_port

TIMEOUT = 0.6
REQUEST = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    await asyncio.sleep(0.05 if scope["path"] == "/slow" else 0)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=["httptools", "keep-alive-once"])
def port(request: pytest.FixtureRequest) -> Iterator[int]:
    chosen = free_port()
    http: Any = KeepAliveHttpToolsProtocol if request.param == "keep-alive-once" else "httptools"
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=chosen, log_level="warning", http=http,
                                           timeout_keep_alive=TIMEOUT))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{chosen}/x", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
        yield chosen
    finally:
        server.should_exit = True
        thread.join(10)


def exchange(conn: socket.socket, request: bytes = REQUEST) -> float:
    """Send one request, read its whole response; the time it completed."""
    conn.sendall(request)
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = conn.recv(4096)
        assert chunk, f"the server closed the connection mid-exchange (got {data!r})"
        data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    return time.monotonic()


def closed_after(conn: socket.socket, last: float) -> float:
    """Seconds from `last` until the server closes the idle connection."""
    conn.settimeout(TIMEOUT * 5)
    assert conn.recv(1) == b""
    return time.monotonic() - last


def test_an_idle_connection_closes_one_timeout_after_its_last_response(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        last = exchange(conn)
        time.sleep(TIMEOUT * 0.6)
        last = exchange(conn)  # still open: idle for less than the timeout
        time.sleep(TIMEOUT * 0.6)  # past the first response's timeout, not this one's
        last = exchange(conn)
        assert TIMEOUT - 0.05 <= closed_after(conn, last) < TIMEOUT + 0.4


def test_a_busy_connection_stays_open_and_then_times_out(port: int) -> None:
    """Requests (some slow, in flight when a timer fires) for three timeouts on one connection."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = last = time.monotonic()
        while time.monotonic() - started < 3 * TIMEOUT:
            last = exchange(conn, REQUEST.replace(b"/x", b"/slow"))
            time.sleep(TIMEOUT / 7)
        assert TIMEOUT - 0.05 <= closed_after(conn, last) < TIMEOUT + 0.4
