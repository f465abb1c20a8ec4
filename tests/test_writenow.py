"""`writenow`: writes and closes that go out at once on an idle plain TCP
transport, and exactly Twisted's queued behaviour otherwise.

Real loopback sockets under a real `tcp.Connection`, with a MemoryReactor to
see whether the transport asked the reactor to watch for writability.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident.writenow import close_now, close_write_now, write_now


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []

    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.events.append("connectionLost")


class Pair:
    """A connected loopback pair: `transport` (ours, Twisted's) and `peer` (a plain socket)."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        ours = socket.create_connection(listener.getsockname())
        self.peer, _ = listener.accept()
        listener.close()
        self.peer.settimeout(5)
        self.reactor = MemoryReactor()
        self.protocol = Recorder()
        self.transport: Any = tcp.Connection(ours, self.protocol, self.reactor)
        self.transport.connected = 1
        self.protocol.makeConnection(self.transport)
        self._got = b""
        self.queued: list[bytes] = []  # what went through Twisted's own write
        twisted_write = self.transport.write

        def write(data: bytes) -> None:
            self.queued.append(data)
            twisted_write(data)

        self.transport.write = write

    def received(self, count: int) -> bytes:
        """`count` bytes from the peer (fewer at EOF), after those `flush` read."""
        data, self._got = self._got[:count], self._got[count:]
        while len(data) < count:
            chunk = self.peer.recv(count - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def nothing_waiting(self) -> bool:
        return not self._available()

    def _available(self) -> bytes:
        self.peer.setblocking(False)
        chunks = []
        try:
            while chunk := self.peer.recv(1 << 20):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        finally:
            self.peer.settimeout(5)
        return b"".join(chunks)

    def watched_for_writing(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def flush(self) -> Any:
        """What the reactor does while the socket is writable, until nothing
        is queued; the peer reads meanwhile.  Returns doWrite's last result."""
        for _ in range(100_000):
            result = self.transport.doWrite()
            self._got += self._available()
            if result is not None or not self.watched_for_writing():
                return result
            select.select([], [self.transport.socket], [], 5)
        raise AssertionError("the transport never drained")

    def close(self) -> None:
        self.peer.close()
        if self.transport.connected:
            self.transport.socket.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    made.close()


def test_write_now_sends_at_once_without_asking_the_reactor(pair: Pair) -> None:
    write_now(pair.transport, b"\x00\x5a reply")
    assert pair.received(8) == b"\x00\x5a reply"
    assert pair.queued == []
    assert not pair.watched_for_writing()
    assert pair.transport.dataBuffer == b"" and pair.transport._tempDataLen == 0


def test_write_now_queues_behind_bytes_already_queued(pair: Pair) -> None:
    pair.transport.write(b"first ")
    write_now(pair.transport, b"second")
    assert pair.nothing_waiting()  # neither went out ahead of the reactor
    pair.flush()
    assert pair.received(12) == b"first second"


def test_write_now_queues_what_the_kernel_does_not_take() -> None:
    pair = Pair()
    try:
        data = bytes(range(256)) * (1 << 15)  # 8 MiB: more than the socket buffers hold
        write_now(pair.transport, data)
        queued = len(pair.transport.dataBuffer) + pair.transport._tempDataLen
        assert 0 < queued < len(data)
        assert pair.queued == [data[len(data) - queued:]]
        assert pair.watched_for_writing()
        pair.flush()
        assert pair.received(len(data)) == data
    finally:
        pair.close()


def test_write_now_queues_all_when_the_kernel_takes_nothing(pair: Pair) -> None:
    sock = pair.transport.socket
    filled = 0
    try:
        while True:  # fill the kernel's buffers behind Twisted's back
            filled += sock.send(b"f" * 65536)
    except BlockingIOError:
        pass
    write_now(pair.transport, b"tail")
    assert pair.queued == [b"tail"]
    assert pair.watched_for_writing()
    pair.flush()
    assert pair.received(filled + 4) == b"f" * filled + b"tail"


def test_write_now_on_other_transports_is_their_write() -> None:
    transport = StringTransport()
    write_now(transport, b"queued")
    assert transport.value() == b"queued"


def test_write_now_leaves_tls_to_twisted(pair: Pair) -> None:
    pair.transport.TLS = True
    writes: list[bytes] = []
    pair.transport.write = writes.append
    write_now(pair.transport, b"clear text")
    assert writes == [b"clear text"]
    assert pair.nothing_waiting()


def test_write_now_after_a_reset_leaves_the_error_to_twisted(pair: Pair) -> None:
    pair.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    pair.peer.close()
    for _ in range(3):  # the first send may still be taken; the reset shows on a later one
        write_now(pair.transport, b"x" * 1024)
    assert pair.watched_for_writing()
    result = pair.transport.doWrite()
    assert result is not None  # Twisted reports the lost connection, as for its own writes


def test_close_write_now_sends_the_fin_at_once_and_keeps_reading(pair: Pair) -> None:
    write_now(pair.transport, b"last")
    close_write_now(pair.transport)
    assert pair.received(5) == b"last"  # then EOF
    assert pair.protocol.events == ["writeConnectionLost"]
    assert pair.transport._writeDisconnected and pair.transport.connected
    assert not pair.watched_for_writing()
    pair.peer.sendall(b"reply")
    assert pair.transport.socket.recv(5) == b"reply"


def test_close_write_now_waits_for_queued_bytes(pair: Pair) -> None:
    pair.transport.write(b"queued")
    close_write_now(pair.transport)
    assert pair.transport._writeDisconnecting and not pair.transport._writeDisconnected
    assert pair.protocol.events == []
    pair.flush()
    assert pair.protocol.events == ["writeConnectionLost"]
    assert pair.received(7) == b"queued"  # then EOF


def test_close_now_closes_at_once_when_nothing_is_queued(pair: Pair) -> None:
    write_now(pair.transport, b"bye")
    close_now(pair.transport)
    assert pair.protocol.events[-1] == "connectionLost"
    assert not pair.transport.connected
    assert pair.received(4) == b"bye"  # then EOF


class ShutdownRecordingSocket(socket.socket):
    """A socket that notes every shutdown(how) asked of it."""

    calls: list[int]

    def shutdown(self, how: int) -> None:
        self.calls.append(how)
        super().shutdown(how)


def recording_shutdowns(pair: Pair) -> list[int]:
    sock = ShutdownRecordingSocket(fileno=pair.transport.socket.detach())
    sock.calls = []
    pair.transport.socket, pair.transport.fileno = sock, sock.fileno
    return sock.calls


def test_close_now_sends_the_fin_and_closes_with_no_second_shutdown(pair: Pair) -> None:
    calls = recording_shutdowns(pair)
    sock = pair.transport.socket
    close_now(pair.transport)
    assert calls == [socket.SHUT_WR]  # Twisted's shutdown(SHUT_RDWR) would follow without it
    assert pair.received(1) == b""
    assert sock.fileno() == -1  # closed


def test_close_now_behind_queued_bytes_closes_as_twisted_does(pair: Pair) -> None:
    calls = recording_shutdowns(pair)
    pair.transport.write(b"queued")
    close_now(pair.transport)
    done = pair.flush()
    pair.transport.connectionLost(Failure(done))
    assert calls == [socket.SHUT_RDWR]
    assert pair.received(7) == b"queued"


def test_close_now_flushes_queued_bytes_first(pair: Pair) -> None:
    pair.transport.write(b"queued")
    close_now(pair.transport)
    assert pair.transport.connected and pair.transport.disconnecting
    assert "connectionLost" not in pair.protocol.events
    done = pair.flush()
    assert done is not None  # the reactor then closes it, as for any loseConnection
    pair.transport.connectionLost(Failure(done))
    assert pair.received(7) == b"queued"  # then EOF
