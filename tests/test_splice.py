"""`splice.Splicer` on real socket pairs, driven by hand instead of a reactor:
bytes move both ways without Python seeing them, a full sink holds the source
back, and `stop()` gives back exactly what the pipes still held."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from socksident import splice

from integration.conftest import skip_unless_strict


@pytest.fixture(autouse=True)
def linux() -> None:
    if not splice.splice_available():
        skip_unless_strict("os.splice needs Linux")


class Reactor:
    """What the splicer asks of a reactor: which descriptors it watches."""

    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, d: Any) -> None:
        self.readers.add(d)

    def removeReader(self, d: Any) -> None:
        self.readers.remove(d)

    def addWriter(self, d: Any) -> None:
        self.writers.add(d)

    def removeWriter(self, d: Any) -> None:
        self.writers.remove(d)


class Events:
    def __init__(self) -> None:
        self.counts = {"client": 0, "remote": 0}
        self.held: list[tuple[str, bool]] = []
        self.irregular_calls = 0

    def spliced(self, source: str, count: int) -> None:
        self.counts[source] += count

    def blocked(self, source: str, held: bool) -> None:
        self.held.append((source, held))

    def irregular(self) -> None:
        self.irregular_calls += 1


def pairs():
    client_far, client_near = socket.socketpair()
    remote_near, remote_far = socket.socketpair()
    for sock in (client_near, remote_near):
        sock.setblocking(False)
    return client_far, client_near, remote_near, remote_far


def run(reactor: Reactor, rounds: int = 50) -> None:
    for _ in range(rounds):
        for d in list(reactor.readers):
            if d in reactor.readers:
                d.doRead()
        for d in list(reactor.writers):
            if d in reactor.writers:
                d.doWrite()


def recv_all(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    got = b""
    while len(got) < size:
        got += sock.recv(size - len(got))
    return got


def test_bytes_move_both_ways_and_are_counted_by_source() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    reactor, events = Reactor(), Events()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), events)
    splicer.start()
    assert {d.name for d in reactor.readers} == {"client", "remote"} and not reactor.writers
    client_far.sendall(b"up" * 1000)
    remote_far.sendall(b"down" * 500)
    run(reactor)
    assert recv_all(remote_far, 2000) == b"up" * 1000
    assert recv_all(client_far, 2000) == b"down" * 500
    assert events.counts == {"client": 2000, "remote": 2000}
    assert splicer.stop() == {"client": b"", "remote": b""}
    assert not reactor.readers and not reactor.writers


def test_a_full_sink_holds_the_source_back_and_stop_returns_the_pipe() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    remote_near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    remote_far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reactor, events = Reactor(), Events()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), events)
    splicer.start()
    client_far.setblocking(False)
    offered = 0
    try:
        while offered < 8 << 20:
            offered += client_far.send(b"x" * 65536)
    except BlockingIOError:
        pass
    run(reactor)
    # The remote far end reads nothing: the pipe holds what its buffers could not.
    assert {d.name for d in reactor.readers} == {"remote"}  # the client is held back
    assert {d.name for d in reactor.writers} == {"remote"}  # waiting for the sink
    assert ("client", True) in events.held
    left = splicer.stop()
    assert left["remote"] == b""
    assert left["client"] and set(left["client"]) == {ord("x")}
    taken = 0
    remote_far.setblocking(False)
    try:
        while chunk := remote_far.recv(1 << 20):
            taken += len(chunk)
    except BlockingIOError:
        pass
    assert taken + len(left["client"]) == events.counts["client"]


def test_a_fin_is_irregular_and_the_splicer_stops_watching_it() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    reactor, events = Reactor(), Events()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), events)
    splicer.start()
    client_far.sendall(b"last words")
    client_far.shutdown(socket.SHUT_WR)
    run(reactor, rounds=3)
    assert recv_all(remote_far, 10) == b"last words"
    assert events.irregular_calls >= 1
    splicer.stop()
    assert not reactor.readers and not reactor.writers


def test_only_plain_tcp_transports_are_spliceable() -> None:
    class Plain:
        def __init__(self, sock: socket.socket) -> None:
            self.socket = sock

        def stopReading(self) -> None: ...

        def stopWriting(self) -> None: ...

    tcp = socket.socket()
    unix_a, unix_b = socket.socketpair()
    try:
        assert splice.spliceable(Plain(tcp))
        assert not splice.spliceable(Plain(unix_a))
        assert not splice.spliceable(object())
    finally:
        for sock in (tcp, unix_a, unix_b):
            sock.close()
