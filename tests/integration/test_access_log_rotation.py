"""`--access-log` under a real twistd: logrotate's rename + SIGUSR1 under load loses no line."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from .conftest import unused_port

TWISTD = Path(sys.executable).parent / "twistd"
CLIENTS, REQUESTS = 4, 150
ROTATIONS = 3


def start_twistd(tmp_path: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", f"--logfile={tmp_path / 'twistd.log'}", "socks4",
         "--port", f"tcp:{port}:interface=127.0.0.1",
         "--access-log", str(tmp_path / "access.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read())
            time.sleep(0.05)
    process.kill()
    raise AssertionError("twistd did not start listening")


def refused_connect(proxy_port: int, closed_port: int) -> bytes:
    """A CONNECT to a closed loopback port: the default policy grants, the connect fails."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as sock:
        sock.sendall(struct.pack("!BBH4s", 4, 1, closed_port, socket.inet_aton("127.0.0.1"))
                     + b"load\x00")
        reply = b""
        while len(reply) < 8:
            chunk = sock.recv(8 - len(reply))
            if not chunk:
                break
            reply += chunk
        return reply


def records(tmp_path: Path) -> list[dict]:
    found = []
    for path in sorted(tmp_path.glob("access.json*")):
        text = path.read_text()
        assert text == "" or text.endswith("\n"), f"{path.name} ends in half a line"
        found.extend(json.loads(line) for line in text.splitlines())
    return found


def test_rotation_under_load_keeps_every_record(tmp_path: Path) -> None:
    port, closed = unused_port(), unused_port()
    process = start_twistd(tmp_path, port)
    done = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            for i in range(REQUESTS):
                assert refused_connect(port, closed)[:2] == b"\x00\x5b"
                with lock:
                    done[0] += 1
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        access = tmp_path / "access.json"
        for rotation in range(1, ROTATIONS + 1):
            # Rotate while the clients are still sending: after each quarter.
            target = rotation * CLIENTS * REQUESTS // (ROTATIONS + 1)
            while done[0] < target and not errors and any(t.is_alive() for t in threads):
                time.sleep(0.01)
            access.rename(tmp_path / f"access.json.{rotation}")
            process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 20
            while not access.exists():  # reopened by the server
                assert time.monotonic() < deadline, "SIGUSR1 did not reopen the access log"
                time.sleep(0.01)
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        assert done[0] == CLIENTS * REQUESTS
        total = CLIENTS * REQUESTS + 1  # and the start-up probe, which sent no request
        deadline = time.monotonic() + 30
        while len(records(tmp_path)) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        found = records(tmp_path)
        assert len(found) == total
        refused = [r for r in found if r["code"] == 91]
        assert len(refused) == CLIENTS * REQUESTS
        assert all(r["command"] == "CONNECT" and r["port"] == closed for r in refused)
        assert all(r["refusal"] == "ConnectFailed" and r["next_hop"] is None for r in refused)
        assert {p.name for p in tmp_path.glob("access.json*")} == {
            "access.json", *(f"access.json.{n}" for n in range(1, ROTATIONS + 1))}
        # twistd's own --logfile rotated on the same signals: its handler was chained.
        assert (tmp_path / "twistd.log.1").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
