"""SIGTERM to a real twistd: a relay in progress finishes, the process exits 0
and the relay's access record is written; past --shutdown-timeout the rest
is cut off."""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

import pytest

from socksident.socks4 import Command, ReplyCode, build_request, parse_reply
from tests.integration.twistd_server import LOOPBACK, TwistdServer, wait_for


class Echo:
    """A loopback echo server in a thread: the relays' destination."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def relay(server: TwistdServer, echo: Echo) -> socket.socket:
    client = socket.create_connection((server.host, server.port), timeout=10)
    client.sendall(build_request(Command.CONNECT, echo.port, LOOPBACK, "alice"))
    reply = client.recv(8)
    assert parse_reply(reply)[0] == ReplyCode.GRANTED
    client.sendall(b"before")
    assert client.recv(100) == b"before"
    return client


def test_a_relay_survives_sigterm_and_completes(tmp_path: Path) -> None:
    echo = Echo()
    server = TwistdServer(tmp_path, ["--shutdown-timeout", "60"])
    try:
        client = relay(server, echo)
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping: waiting up to 60 s for 1 open connections" in server.log(),
                 15, "the drain's log line")
        # No longer listening, but the open relay still carries bytes both ways.
        wait_for(lambda: _refused(server), 15, "the port to stop listening")
        client.sendall(b"after SIGTERM")
        assert client.recv(100) == b"after SIGTERM"
        assert server.process.poll() is None
        client.close()
        assert server.process.wait(15) == 0
        [line] = server.access_lines()
        assert "-> 90" in line and "up=19 down=19" in line and "cut off" not in line
        assert server.poison() == []
    finally:
        server.stop()
        echo.close()


def test_past_the_shutdown_timeout_a_relay_is_cut_off_with_its_record(tmp_path: Path) -> None:
    echo = Echo()
    server = TwistdServer(tmp_path, ["--shutdown-timeout", "1"])
    try:
        client = relay(server, echo)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        with pytest.raises(ConnectionResetError):  # cut off: aborted, not closed
            client.recv(100)
        [line] = server.access_lines()
        assert "cut off: server stopping (shutdown timeout)" in line
        assert server.poison() == []
    finally:
        server.stop()
        echo.close()


def test_a_second_sigterm_cuts_off_at_once(tmp_path: Path) -> None:
    echo = Echo()
    server = TwistdServer(tmp_path, ["--shutdown-timeout", "600"])
    try:
        client = relay(server, echo)
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping: waiting" in server.log(), 15, "the drain's log line")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        client.close()
        [line] = server.access_lines()
        assert "cut off: server stopping (second SIGTERM)" in line
    finally:
        server.stop()
        echo.close()


def _refused(server: TwistdServer) -> bool:
    try:
        socket.create_connection((server.host, server.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_under_workers_a_relay_survives_sigterm_to_the_parent(tmp_path: Path) -> None:
    echo = Echo()
    server = TwistdServer(tmp_path, ["--workers", "2", "--shutdown-timeout", "60"])
    try:
        wait_for(lambda: server.log().count("serving") >= 2, 30, "both workers serving")
        client = relay(server, echo)
        server.process.send_signal(signal.SIGTERM)
        # (a worker's events reach the parent's log rendered without format specs)
        wait_for(lambda: "stopping: waiting up to 60" in server.log(), 15, "the worker's drain")
        client.sendall(b"after SIGTERM")
        assert client.recv(100) == b"after SIGTERM"
        assert server.process.poll() is None
        client.close()
        assert server.process.wait(15) == 0
        [line] = server.access_lines()
        assert "-> 90" in line and "up=19 down=19" in line
        assert server.poison() == []
    finally:
        server.stop()
        echo.close()
