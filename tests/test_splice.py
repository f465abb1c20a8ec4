"""`splice.Splicer` on real socket pairs, driven by hand instead of a reactor:
bytes move both ways without Python seeing them, a full sink holds the source
back, and `stop()` gives back exactly what the pipes still held."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from typing import Any

import pytest
from zope.interface import directlyProvides
from twisted.internet.interfaces import ISSLTransport

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
    # steady flow: nothing held back, nothing irregular (each wake-up ends on EAGAIN)
    assert events.held == [] and events.irregular_calls == 0
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
    assert not reactor.readers and not reactor.writers  # stop unwatches the held sink too


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


def fill(sock: socket.socket) -> int:
    """Write into `sock` until its buffers are full; the bytes sent."""
    sent = 0
    try:
        while True:
            sent += sock.send(b"f" * 65536)
    except BlockingIOError:
        return sent


def drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    got = b""
    try:
        while chunk := sock.recv(1 << 20):
            got += chunk
    except BlockingIOError:
        pass
    return got


def test_the_reactor_watches_the_relays_own_descriptors() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    reactor = Reactor()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), Events())
    splicer.start()
    assert {(d.name, d.fileno()) for d in reactor.readers} == {
        ("client", client_near.fileno()),
        ("remote", remote_near.fileno()),
    }
    assert {d.logPrefix() for d in reactor.readers} == {"splice-client", "splice-remote"}
    splicer.stop()


def test_a_held_source_is_read_again_once_the_sink_takes_the_pipe() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    reactor, events = Reactor(), Events()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), events)
    splicer.start()
    already = fill(remote_near)  # the destination's buffers are full before any relay byte
    client_far.sendall(b"held back")
    run(reactor, rounds=3)
    assert {d.name for d in reactor.readers} == {"remote"}
    assert {d.name for d in reactor.writers} == {"remote"}
    assert events.held == [("client", True)]
    # the destination reads: the pipe empties, the client is read again, the writer unwatched
    got = drain(remote_far)
    run(reactor, rounds=3)
    got += drain(remote_far)
    assert got == b"f" * already + b"held back"
    assert {d.name for d in reactor.readers} == {"client", "remote"} and not reactor.writers
    assert events.held == [("client", True), ("client", False)]
    assert events.irregular_calls == 0
    splicer.stop()


def test_stop_gives_back_a_single_byte_the_sink_could_not_take() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    reactor, events = Reactor(), Events()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), events)
    splicer.start()
    fill(remote_near)
    client_far.sendall(b"!")
    run(reactor, rounds=3)
    assert {d.name for d in reactor.writers} == {"remote"}  # one byte is enough to hold
    assert events.held == [("client", True)] and events.counts["client"] == 1
    assert splicer.stop() == {"client": b"!", "remote": b""}


def test_a_stopped_splicer_ignores_a_late_wake_up() -> None:
    """The reactor may still call a descriptor it was told to drop in this round."""
    client_far, client_near, remote_near, remote_far = pairs()
    reactor, events = Reactor(), Events()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), events)
    splicer.start()
    sockets = list(reactor.readers)
    splicer.stop()
    client_far.sendall(b"for the Twisted relay")
    for d in sockets:
        d.doRead()
    assert events.irregular_calls == 0 and events.counts == {"client": 0, "remote": 0}
    assert client_near.recv(100) == b"for the Twisted relay"  # left in the socket


def test_a_failing_sink_is_irregular() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    reactor, events = Reactor(), Events()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), events)
    splicer.start()
    remote_far.close()  # writing to the destination fails (EPIPE)
    client_far.sendall(b"nobody to take this")
    splicer._client.doRead()  # only this way: the destination's own EOF is irregular too
    assert events.irregular_calls >= 1
    assert splicer.stop()["client"] == b"nobody to take this"


def test_a_reset_source_is_irregular() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    reactor, events = Reactor(), Events()
    splicer = splice.Splicer(reactor, client_near.fileno(), remote_near.fileno(), events)
    splicer.start()
    # A UNIX socket closed with unread bytes resets its peer (ECONNRESET on read).
    client_near.send(b"unread")
    client_far.close()
    splicer._client.doRead()  # the reset is reported once; a second read would see EOF
    assert events.irregular_calls >= 1
    assert events.counts == {"client": 0, "remote": 0}
    splicer.stop()


def test_the_pipes_are_large_non_blocking_and_not_inherited() -> None:
    """Not inherited: a rule's command must not get a relay's pipe."""
    client_far, client_near, remote_near, remote_far = pairs()
    splicer = splice.Splicer(Reactor(), client_near.fileno(), remote_near.fileno(), Events())
    with open("/proc/sys/fs/pipe-max-size") as limit:
        allowed = os.geteuid() == 0 or int(limit.read()) >= splice.PIPE_SIZE
    f_getpipe_sz = 1032
    for direction in (splicer._up, splicer._down):
        for fd in (direction.pipe_r, direction.pipe_w):
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        size = fcntl.fcntl(direction.pipe_w, f_getpipe_sz)
        assert size == (splice.PIPE_SIZE if allowed else 65536)
    splicer.stop()


def test_take_back_closes_the_pipe_even_when_it_holds_less_than_counted() -> None:
    client_far, client_near, remote_near, remote_far = pairs()
    direction = splice._Direction("client", client_near.fileno(), remote_near.fileno())
    pipe = (direction.pipe_r, direction.pipe_w)
    direction.queued = 10  # nothing is in the pipe: the read fails with EAGAIN
    assert direction.take_back() == b""
    for fd in pipe:
        with pytest.raises(OSError) as raised:
            os.fstat(fd)
        assert raised.value.errno == errno.EBADF


def test_splice_needs_linux_and_os_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert splice.splice_available()  # here: the autouse fixture skipped otherwise
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not splice.splice_available()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delattr(os, "splice")
    assert not splice.splice_available()


def test_a_tls_transport_is_not_spliceable() -> None:
    """The kernel would move the ciphertext, not what the peer should read."""

    class TLS:
        def __init__(self, sock: socket.socket) -> None:
            self.socket = sock

        def stopReading(self) -> None: ...

        def stopWriting(self) -> None: ...

    tcp = socket.socket()
    try:
        transport = TLS(tcp)
        assert splice.spliceable(transport)
        directlyProvides(transport, ISSLTransport)
        assert not splice.spliceable(transport)
    finally:
        tcp.close()
