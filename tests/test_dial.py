"""`dial`: one TCP connection without Twisted's connector, on real loopback sockets.

The real reactor (pytest-twisted's) runs these: what is tested is exactly
what it watches, when, and that every socket it made is closed again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Generator
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectBindError, ConnectError, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from socksident.dial import DialledConnection, dial

import test_writenow

reactor: Any = global_reactor


class Recorder(test_writenow.Recorder):
    """test_writenow's record of the half-close events, and what arrived, when made and lost."""

    def __init__(self) -> None:
        super().__init__()
        self.received = b""
        self.made: Optional[Any] = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made = self.transport

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class Recorders(Factory):
    def __init__(self) -> None:
        self.built: list[tuple[Any, Recorder]] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        protocol = Recorder()
        self.built.append((addr, protocol))
        return protocol


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest.fixture
def listener() -> Generator[socket.socket, None, None]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    yield server
    server.close()


@pytest_twisted.inlineCallbacks
def test_a_dialled_connection_is_twisteds_transport_reading_both_ways(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    factory = Recorders()
    host, port = listener.getsockname()
    protocol = yield dial(reactor, host, port, factory)
    peer, _ = listener.accept()
    peer.settimeout(5)
    [(addr, built)] = factory.built
    assert built is protocol
    assert (addr.type, addr.host, addr.port) == ("TCP", host, port)
    transport = protocol.made
    assert isinstance(transport, DialledConnection) and transport.connected
    assert (transport.getPeer().host, transport.getPeer().port) == (host, port)
    assert transport.getHost().port == peer.getpeername()[1]
    assert transport in reactor.getReaders() and transport not in reactor.getWriters()
    assert repr(transport) == f"<DialledConnection to {host}:{port}>"
    transport.write(b"up")  # queued: it goes out on the reactor's next turn
    yield sleep(0.05)
    assert peer.recv(10) == b"up"
    peer.sendall(b"down")
    peer.shutdown(socket.SHUT_WR)
    while "readConnectionLost" not in protocol.events:
        yield sleep(0.01)
    assert protocol.received == b"down"
    transport.loseConnection()
    yield protocol.lost
    assert protocol.events == ["readConnectionLost", "connectionLost"]
    assert peer.recv(10) == b""
    peer.close()


@pytest_twisted.inlineCallbacks
def test_a_refused_connect_fails_and_closes_its_socket(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    listener.close()  # nobody listens there now
    before = open_descriptors()
    factory = Recorders()
    with pytest.raises(ConnectionRefusedError) as refused:
        yield dial(reactor, host, port, factory)
    assert "refused" in str(refused.value).lower()
    assert factory.built == []
    assert open_descriptors() == before


@pytest_twisted.inlineCallbacks
def test_a_connection_leaves_from_its_source_address(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    protocol = yield dial(reactor, host, port, Recorders(), source="127.0.0.9")
    peer, (peer_host, _) = listener.accept()
    assert peer_host == "127.0.0.9"
    assert protocol.made.getHost().host == "127.0.0.9"
    protocol.made.loseConnection()
    yield protocol.lost
    peer.close()


@pytest_twisted.inlineCallbacks
def test_a_source_address_not_on_this_host_is_a_bind_error(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    before = open_descriptors()
    with pytest.raises(ConnectBindError):
        yield dial(reactor, host, port, Recorders(), source="192.0.2.1")
    assert open_descriptors() == before


@pytest_twisted.inlineCallbacks
def test_cancelling_stops_watching_and_closes_the_socket(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    before_writers = len(reactor.getWriters())
    before = open_descriptors()
    factory = Recorders()
    attempt = dial(reactor, host, port, factory)
    assert len(reactor.getWriters()) == before_writers + 1  # watched for writability only
    attempt.cancel()
    with pytest.raises(CancelledError):
        yield attempt
    assert len(reactor.getWriters()) == before_writers
    assert open_descriptors() == before
    yield sleep(0.05)  # a late writability event finds nothing to do
    assert factory.built == []


@pytest_twisted.inlineCallbacks
def test_a_factory_that_builds_nothing_fails_the_attempt(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    before = open_descriptors()

    class Nothing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    with pytest.raises(ConnectError, match="built no protocol"):
        yield dial(reactor, host, port, Nothing())
    assert open_descriptors() == before


@pytest_twisted.inlineCallbacks
def test_an_ipv6_destination(listener: socket.socket) -> Generator[Any, Any, None]:
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        listener.close()  # no IPv6 loopback here: the IPv4 tests cover the rest
        return
    port = server.getsockname()[1]
    protocol = yield dial(reactor, "::1", port, Recorders())
    peer, _ = server.accept()
    assert protocol.made.getPeer().host == "::1" and protocol.made.getHost().type == "TCP"
    assert type(protocol.made.getHost()).__name__ == "IPv6Address"
    protocol.made.loseConnection()
    yield protocol.lost
    peer.close()
    server.close()


def test_a_reactor_without_descriptors_dials_through_connect_tcp() -> None:
    memory = MemoryReactorClock()
    factory = Recorders()
    attempt = dial(memory, "192.0.2.7", 80, factory, source="192.0.2.1")
    [(host, port, wrapper, timeout, bind)] = memory.tcpClients
    assert (host, port, timeout, bind) == ("192.0.2.7", 80, None, ("192.0.2.1", 0))
    protocol = wrapper.buildProtocol(None)
    assert not attempt.called  # not until the protocol has its transport
    transport = object.__new__(DialledConnection)  # any transport will do
    protocol.makeConnection(transport)
    assert attempt.result is protocol and protocol.made is transport
    assert "makeConnection" not in vars(protocol)  # no closure left on it


def test_through_connect_tcp_a_failure_and_a_cancel() -> None:
    memory = MemoryReactorClock()
    failed = dial(memory, "192.0.2.7", 80, Recorders())
    [(_, _, wrapper, _, _)] = memory.tcpClients
    wrapper.clientConnectionFailed(memory.connectors[0], Failure(ConnectionRefusedError()))
    failures: list[Failure] = []
    failed.addErrback(failures.append)
    assert failures[0].check(ConnectionRefusedError)

    cancelled = dial(memory, "192.0.2.8", 80, Recorders())
    cancelled.addErrback(failures.append)
    cancelled.cancel()
    assert failures[1].check(CancelledError)
    assert memory.connectors[1].stoppedConnecting


@pytest_twisted.inlineCallbacks
def test_out_of_descriptors_is_a_connect_error(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> Generator[Any, Any, None]:
    import errno

    host, port = listener.getsockname()

    def no_socket(*args: Any) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_socket)
    with pytest.raises(ConnectError, match="Too many open files"):
        yield dial(reactor, host, port, Recorders())
