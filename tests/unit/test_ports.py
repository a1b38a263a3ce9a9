"""Free ports and `wait_for`: the failure message must say what did not come up and why."""

from __future__ import annotations

import socket

import pytest

from meterline.localinfra.ports import NotReadyError, free_port, port_is_free, wait_for


def test_free_port_is_bindable_and_detected_when_taken() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    assert port_is_free(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not port_is_free(port)


def test_wait_for_returns_once_predicate_holds() -> None:
    calls = iter([False, False, True])
    wait_for(lambda: next(calls), timeout=5, what="thing", interval=0.001)


def test_wait_for_names_what_and_chains_last_error() -> None:
    def boom() -> bool:
        raise ConnectionRefusedError("nope")

    with pytest.raises(NotReadyError, match=r"the widget did not come up within 0.05s.*nope") as info:
        wait_for(boom, timeout=0.05, what="the widget", interval=0.01)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_wait_for_stops_at_once_when_process_died() -> None:
    with pytest.raises(NotReadyError, match="the server exited before it was ready"):
        wait_for(lambda: False, timeout=60, what="the server", alive=lambda: False)
