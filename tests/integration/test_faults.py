"""Faults that must keep costing nothing, against a real twistd or the in-process server.

Descriptor exhaustion under a low RLIMIT_NOFILE, ten thousand silent clients
and clients trickling a byte a second, a destination pushing 1 GiB to a
client that never reads, hostile identds, and the check that an unhandled
Deferred failure cannot pass unseen.  Waits are bounds on events, not
measurements; the one CPU figure is a bound on spinning (a busy loop uses a
whole core), far from what an idle server uses.
"""

from __future__ import annotations

import resource
import socket
import struct
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory, Protocol

from socksident.policy import DefaultPolicy, IdentMode
from socksident.settings import ServerSettings
from socksident.socks4 import Command, build_request, parse_reply

from .conftest import LOOPBACK, bounded, logged_failures, recv_exactly
from .twistd_server import wait_for

MiB = 1024 * 1024


def echo_destination() -> tuple[socket.socket, threading.Thread]:
    """A blocking echo server in a thread (one connection at a time is enough)."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(64)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def echo_once(proxy_port: int, dest_port: int, payload: bytes = b"still served") -> bytes:
    with socket.create_connection((LOOPBACK, proxy_port), timeout=20) as sock:
        sock.sendall(build_request(Command.CONNECT, dest_port, LOOPBACK, "good"))
        assert parse_reply(recv_exactly(sock, 8))[0] == 90
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


# -- descriptor exhaustion ------------------------------------------------------------


def test_descriptor_exhaustion_neither_spins_nor_breaks_relays(twistd_server):
    """Under RLIMIT_NOFILE 64: relays until the table is full; the open relays
    keep working, the server does not spin on its listening socket, and once
    descriptors are free new clients are served again."""
    limit = 64

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    server = twistd_server(preexec=low_limit)
    listener, _ = echo_destination()
    dest = listener.getsockname()[1]
    relays = []
    refused = 0
    for _ in range(limit):  # each relay takes two descriptors: more than the table holds
        sock = socket.create_connection((LOOPBACK, server.port), timeout=20)
        sock.sendall(build_request(Command.CONNECT, dest, LOOPBACK, "fill"))
        try:
            reply = recv_exactly(sock, 8)
        except (AssertionError, ConnectionError):
            refused += 1
            sock.close()
            continue
        if parse_reply(reply)[0] == 90:
            relays.append(sock)
        else:
            refused += 1
            sock.close()
    assert refused > 0, "the table never filled"
    assert server.descriptors() >= limit - 2
    # clients knocking while the table is full: accepted and closed, not spun on
    knocking = [socket.create_connection((LOOPBACK, server.port), timeout=20) for _ in range(5)]
    cpu = server.cpu_seconds()
    time.sleep(2)
    assert server.cpu_seconds() - cpu < 1.0, "the server spins while out of descriptors"
    for sock in relays[:3]:  # the open relays still move bytes
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    for sock in relays + knocking:
        sock.close()
    wait_for(lambda: server.descriptors() < limit // 2, 30, "descriptors to free up")
    assert echo_once(server.port, dest) == b"still served"
    listener.close()


# -- silent and trickling clients ---------------------------------------------------------


def test_ten_thousand_silent_clients_and_tricklers_are_closed_at_the_request_timeout(
    twistd_server,
):
    silent_count, trickle_count, timeout = 10_000, 10, 4
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = silent_count + 1000
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    server = twistd_server(
        "--request-timeout", str(timeout),
        endpoint="tcp:{port}:interface={interface}:backlog=4096",
        preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(needed, hard))),
    )
    listener, _ = echo_destination()
    dest = listener.getsockname()[1]
    baseline = server.descriptors()
    silent = [socket.create_connection((LOOPBACK, server.port), timeout=20)
              for _ in range(silent_count)]
    trickled: list[str] = []

    def trickle() -> None:
        with socket.create_connection((LOOPBACK, server.port), timeout=30) as sock:
            # a request whose USERID never ends, one byte a second
            wire = build_request(Command.CONNECT, dest, LOOPBACK)[:-1] + b"u" * 200
            try:
                for byte in wire:
                    sock.sendall(bytes([byte]))
                    time.sleep(1)
            except OSError:
                pass
            try:
                trickled.append("eof" if sock.recv(16) == b"" else "data")
            except OSError:
                trickled.append("reset")

    tricklers = [threading.Thread(target=trickle) for _ in range(trickle_count)]
    for thread in tricklers:
        thread.start()
    # while they all wait, a well-formed client is served
    assert echo_once(server.port, dest) == b"still served"
    for thread in tricklers:
        thread.join(60)
    assert sorted(set(trickled)) in (["eof"], ["reset"], ["eof", "reset"]), trickled
    assert len(trickled) == trickle_count
    server.wait_descriptors(baseline, 60, "after the request timeout ")
    closed = 0
    for sock in silent:
        sock.settimeout(10)
        try:
            closed += sock.recv(1) == b""
        except ConnectionError:
            closed += 1
        sock.close()
    assert closed == silent_count
    timed_out = f"(no complete request within {timeout} s)"
    wait_for(
        lambda: sum(timed_out in line for line in server.access_lines())
        >= silent_count + trickle_count,
        60,
        "an access record for each closed client",
    )
    others = [line for line in server.access_lines() if timed_out not in line]
    assert len(others) == 1 and " -> 90 " in others[0], others[:5]  # the good client
    listener.close()


# -- a destination that pushes 1 GiB to a client that never reads ------------------------------


def test_a_destination_pushing_a_gibibyte_to_a_client_that_never_reads(twistd_server):
    server = twistd_server("--linger-timeout", "1")
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(4)
    baseline_fds, baseline_rss = server.descriptors(), server.rss_kib()
    client = socket.create_connection((LOOPBACK, server.port), timeout=20)
    client.sendall(build_request(Command.CONNECT, listener.getsockname()[1], LOOPBACK))
    assert parse_reply(recv_exactly(client, 8))[0] == 90
    dest, _ = listener.accept()
    sent = [0]

    def push() -> None:
        chunk = b"\x00" * MiB
        try:
            for _ in range(1024):  # 1 GiB, if anyone took it
                dest.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass

    pusher = threading.Thread(target=push)
    pusher.start()
    # the proxy stops reading once the client's buffers are full: the push stalls
    last = -1
    while last != sent[0]:
        last = sent[0]
        time.sleep(1)
    assert sent[0] < 64 * MiB, f"the proxy took {sent[0]} bytes for a client that reads nothing"
    growth = server.rss_kib() - baseline_rss
    assert growth < 16 * 1024, f"the proxy's RSS grew by {growth} KiB"
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    pusher.join(60)  # the destination side is reset after the linger time
    assert not pusher.is_alive()
    server.wait_descriptors(baseline_fds, 30, "after the client's reset ")
    dest.close()
    listener.close()


# -- hostile identds -----------------------------------------------------------------------


class HostileIdentd(Protocol):
    behaviour = "silent"

    def connectionMade(self) -> None:
        if self.behaviour == "reset":
            self.transport.abortConnection()
        elif self.behaviour == "flood":
            self.transport.write(b"x" * MiB)
        elif self.behaviour == "trickle":
            self._trickle = task.LoopingCall(self.transport.write, b"6")
            self._trickle.start(0.05)

    def connectionLost(self, reason: Any = None) -> None:
        trickle = getattr(self, "_trickle", None)
        if trickle is not None and trickle.running:
            trickle.stop()


@pytest.mark.parametrize("behaviour", ["silent", "reset", "flood", "trickle"])
@pytest_twisted.ensureDeferred
async def test_hostile_identds_get_a_verdict_within_the_ident_timeout(
    start_proxy, listen_tcp, log_capture, behaviour
):
    """Slow (silent), reset, flooding without a newline, trickling a byte at a
    time: each ends in 92 (no answer) by the ident timeout, nothing buffered."""
    factory = Factory.forProtocol(type("Identd", (HostileIdentd,), {"behaviour": behaviour}))
    ident_port = listen_tcp(factory)
    ident_timeout = 2.0
    proxy = start_proxy(
        DefaultPolicy(IdentMode.REQUIRE),
        ServerSettings(ident_port=ident_port, ident_timeout=ident_timeout),
    )

    def ask() -> int:
        with socket.create_connection((LOOPBACK, proxy.port), timeout=30) as sock:
            sock.sendall(build_request(Command.CONNECT, 9, LOOPBACK, "someone"))
            return parse_reply(recv_exactly(sock, 8))[0]

    assert await bounded(threads.deferToThread(ask), 30) == 92
    [event] = await log_capture.wait_for_access(1)
    assert event["ident_outcome"] == "no-answer"
    expected = {
        "silent": "no answer within 2 s",
        "reset": "connection lost before an answer",
        "flood": "malformed answer: more than 1000 bytes without a line ending",
        # 0.05 s a byte: the time limit comes before the line limit
        "trickle": "no answer within 2 s",
    }[behaviour]
    assert event["ident_error"].startswith(expected), event["ident_error"]


# -- unhandled failures cannot pass unseen ----------------------------------------------------


def test_an_unhandled_deferred_failure_is_reported(log_capture):
    """The autouse check collects garbage first, so a Deferred dropped with
    its failure unhandled shows in the test that dropped it."""
    dropped: Deferred[None] = fail(RuntimeError("nobody handled me"))
    del dropped
    failures = logged_failures(log_capture)
    assert any("nobody handled me" in failure for failure in failures), failures
    log_capture.events.clear()  # seen: this test's own check must now pass
