"""The relay's contract, on real sockets, for both paths: `--relay splice`
(the kernel moves the bytes between two plain TCP sockets) and `--relay
twisted`.  The same assertions hold for each: every byte in order, both
half-closes, early data ahead of the rest, flow control against a reader
that stops, the byte counts and the path taken in the access record."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import pytest

from socksident.socks4 import Command, build_request, parse_reply

from .conftest import recv_exactly
from .twistd_server import LOOPBACK, wait_for

MODES = ("splice", "twisted")
MiB = 1 << 20


def destination() -> socket.socket:
    listener = socket.create_server((LOOPBACK, 0), backlog=8)
    listener.settimeout(20)
    return listener


def through(server, listener: socket.socket, early: bytes = b"") -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection((LOOPBACK, server.port), timeout=20)
    client.sendall(build_request(Command.CONNECT, listener.getsockname()[1], LOOPBACK, "c") + early)
    assert parse_reply(recv_exactly(client, 8))[0] == 90
    accepted, _ = listener.accept()
    accepted.settimeout(20)
    return client, accepted


def records(access_log) -> list[dict]:
    return [json.loads(line) for line in access_log.read_text().splitlines()]


def drain(sock: socket.socket, into: "hashlib._Hash") -> int:
    total = 0
    while chunk := sock.recv(1 << 18):
        into.update(chunk)
        total += len(chunk)
    return total


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 4096  # 1 MiB with a period that shows reordering
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize("mode", MODES)
def test_every_byte_both_ways_in_order_with_both_half_closes(twistd_server, tmp_path, mode):
    access_log = tmp_path / f"access-{mode}.jsonl"
    server = twistd_server("--relay", mode, "--access-log", str(access_log))
    listener = destination()
    up, down = pattern(24 * MiB), pattern(16 * MiB)[::-1]
    client, remote = through(server, listener, early=b"early:")
    got_up, got_down = hashlib.sha256(), hashlib.sha256()
    counts = {}

    def remote_side() -> None:
        counts["up"] = drain(remote, got_up)  # up to the client's FIN
        remote.sendall(down)  # the other direction still flows after it
        remote.shutdown(socket.SHUT_WR)

    worker = threading.Thread(target=remote_side)
    worker.start()
    client.sendall(up)
    client.shutdown(socket.SHUT_WR)
    counts["down"] = drain(client, got_down)
    worker.join(30)
    client.close()
    remote.close()
    assert counts == {"up": len(up) + 6, "down": len(down)}
    assert got_up.digest() == hashlib.sha256(b"early:" + up).digest()
    assert got_down.digest() == hashlib.sha256(down).digest()
    wait_for(lambda: access_log.exists() and records(access_log), 20, "the access record")
    (record,) = records(access_log)
    assert (record["bytes_up"], record["bytes_down"]) == (len(up) + 6, len(down))
    assert record["code"] == 90 and record["relay"] == mode
    listener.close()


@pytest.mark.parametrize("mode", MODES)
def test_the_remote_closing_first_reaches_the_client_after_its_bytes(twistd_server, mode):
    server = twistd_server("--relay", mode)
    listener = destination()
    client, remote = through(server, listener)
    for _ in range(3):  # steady flow both ways first
        client.sendall(b"ping")
        assert recv_exactly(remote, 4) == b"ping"
        remote.sendall(b"pong")
        assert recv_exactly(client, 4) == b"pong"
    payload = pattern(3 * MiB)
    remote.sendall(payload)
    remote.shutdown(socket.SHUT_WR)
    got = hashlib.sha256()
    assert drain(client, got) == len(payload)
    assert got.digest() == hashlib.sha256(payload).digest()
    client.sendall(b"after the FIN")  # our direction stays open
    assert recv_exactly(remote, 13) == b"after the FIN"
    client.close()
    assert remote.recv(10) == b""
    remote.close()
    listener.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_reader_that_stops_holds_the_writer_back_not_the_proxy_memory(twistd_server, mode):
    server = twistd_server("--relay", mode)
    listener = destination()
    client, remote = through(server, listener)
    remote.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.settimeout(1.0)
    chunk = b"x" * 65536
    sent = 0
    try:
        while sent < 512 * MiB:
            sent += client.send(chunk)
    except socket.timeout:
        pass
    # Held back by the kernel buffers and at most a pipe (splice) or a
    # write buffer (twisted) in the proxy: far less than what was offered.
    assert sent < 64 * MiB, f"{sent} bytes went into the proxy with nobody reading"
    rss = int(next(line for line in open(f"/proc/{server.pid}/status") if line.startswith("VmRSS")).split()[1])
    got = hashlib.sha256()
    client.shutdown(socket.SHUT_WR)
    assert drain(remote, got) == sent
    assert got.digest() == hashlib.sha256(chunk * (sent // len(chunk)) + chunk[: sent % len(chunk)]).digest()
    assert rss < 200 * 1024, f"proxy RSS {rss} KiB"
    client.close()
    remote.close()
    listener.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_reset_while_spliced_closes_the_other_side_and_frees_the_descriptors(twistd_server, mode):
    import struct

    server = twistd_server("--relay", mode, "--linger-timeout", "1")
    listener = destination()
    time.sleep(0.2)
    baseline = server.descriptors()
    client, remote = through(server, listener)
    client.sendall(b"hello")
    assert recv_exactly(remote, 5) == b"hello"
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    assert remote.recv(10) == b""
    remote.close()
    wait_for(lambda: server.descriptors() <= baseline, 20, "the relay's descriptors to close")
    listener.close()
