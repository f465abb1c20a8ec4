"""`dial`: one TCP connection without Twisted's connector, on real loopback sockets.

The real reactor (pytest-twisted's) runs these: what is tested is exactly
what it watches, when, and that every socket it made is closed again.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Generator
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import (
    ConnectBindError,
    ConnectError,
    ConnectionRefusedError,
    NoRouteError,
    UnknownHostError,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
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


@inlineCallbacks
def dial_failure(
    kind: type[Exception], *args: Any, **kwargs: Any
) -> Generator[Any, Any, Exception]:
    """What `dial(reactor, *args, **kwargs)` fails with (of `kind`), once it
    has failed and closed every descriptor it opened."""
    before = open_descriptors()
    with pytest.raises(kind) as failed:
        yield dial(reactor, *args, **kwargs)
    assert open_descriptors() == before
    return failed.value


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
    with capturedLogs() as logged:
        protocol = yield dial(reactor, host, port, factory)
    assert list(logged) == []  # not an error, nor anything else
    peer, _ = listener.accept()
    peer.settimeout(5)
    [(addr, built)] = factory.built
    assert built is protocol
    assert isinstance(addr, IPv4Address) and (addr.type, addr.host, addr.port) == ("TCP", host, port)
    transport = protocol.made
    assert isinstance(transport, DialledConnection) and transport.connected
    assert transport.getPeer() == IPv4Address("TCP", host, port)
    assert transport.getHost() == IPv4Address("TCP", *peer.getpeername())
    assert transport in reactor.getReaders() and transport not in reactor.getWriters()
    assert not transport.socket.getsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT)
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


def test_a_dialled_connection_sets_up_what_twisteds_connection_does() -> None:
    """Its __init__ is tcp.Connection's but for setblocking (socket() made
    the socket non-blocking): a Twisted that sets up more fails here."""
    memory = MemoryReactorClock()
    made = [socket.socket(type=socket.SOCK_STREAM | socket.SOCK_NONBLOCK) for _ in range(2)]
    try:
        twisteds = tcp.Connection(made[0], Recorder(), memory)
        protocol = Recorder()
        ours = DialledConnection(made[1], protocol, "127.0.0.1", 9, memory)
        assert set(vars(twisteds)) <= set(vars(ours))
        assert (ours.socket, ours.fileno, ours.reactor) == (made[1], made[1].fileno, memory)
        assert ours.protocol is protocol
        assert ours.socket.getblocking() is False
        assert fcntl.fcntl(ours.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert ours in memory.getReaders()
    finally:
        for sock in made:
            sock.close()


@pytest_twisted.inlineCallbacks
def test_a_refused_connect_fails_and_closes_its_socket(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    listener.close()  # nobody listens there now
    factory = Recorders()
    refused = yield dial_failure(ConnectionRefusedError, host, port, factory)
    assert str(refused) == "Connection was refused by other side: 111: Connection refused."
    assert factory.built == []


@pytest_twisted.inlineCallbacks
def test_a_connection_leaves_from_its_source_address(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    protocol = yield dial(reactor, host, port, Recorders(), source="127.0.0.9")
    peer, (peer_host, peer_port) = listener.accept()
    assert peer_host == "127.0.0.9" and peer_port > 1023  # an ephemeral port
    assert protocol.made.getHost().host == "127.0.0.9"
    # The port was left to connect() (tests/integration/test_dial_ports.py shows why).
    assert protocol.made.socket.getsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT)
    protocol.made.loseConnection()
    yield protocol.lost
    peer.close()


@pytest_twisted.inlineCallbacks
def test_a_source_address_not_on_this_host_is_a_bind_error(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    failed = yield dial_failure(ConnectBindError, host, port, Recorders(), source="192.0.2.1")
    assert str(failed) == "Couldn't bind: 99: Cannot assign requested address."


@pytest_twisted.inlineCallbacks
def test_an_address_the_kernel_will_not_connect_to_fails_at_once() -> Generator[Any, Any, None]:
    # TCP to the broadcast address is refused by the kernel itself, before
    # any packet: connect() answers ENETUNREACH.
    failed = yield dial_failure(NoRouteError, "255.255.255.255", 80, Recorders())
    assert str(failed) == "No route to host: 101: Network is unreachable."


@pytest_twisted.inlineCallbacks
def test_an_address_the_socket_cannot_take_fails_at_once() -> Generator[Any, Any, None]:
    failed = yield dial_failure(UnknownHostError, "fe80::1%nosuchinterface", 80, Recorders())
    assert "Name or service not known" in str(failed)


@pytest_twisted.inlineCallbacks
def test_cancelling_stops_watching_and_closes_the_socket(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()
    before_writers = set(reactor.getWriters())
    before = open_descriptors()
    factory = Recorders()
    attempt = dial(reactor, host, port, factory)
    [dialling] = set(reactor.getWriters()) - before_writers  # watched for writability only
    assert dialling.logPrefix() == "dialling"  # what a log line in this phase is under
    attempt.cancel()
    with pytest.raises(CancelledError):
        yield attempt
    assert set(reactor.getWriters()) == before_writers
    assert open_descriptors() == before
    yield sleep(0.05)  # a late writability event finds nothing to do
    assert factory.built == []


@pytest_twisted.inlineCallbacks
def test_dialling_does_not_wait_for_the_handshake() -> Generator[Any, Any, None]:
    """A destination whose listen queue is full drops our SYN: the attempt
    stays under way, without holding the reactor, until it is cancelled."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
    before = open_descriptors()
    attempt = dial(reactor, *full.getsockname(), Recorders())
    yield sleep(0.05)
    assert not attempt.called
    attempt.cancel()
    with pytest.raises(CancelledError):
        yield attempt
    assert open_descriptors() == before
    for sock in (full, *fillers):
        sock.close()


@pytest_twisted.inlineCallbacks
def test_a_factory_that_builds_nothing_fails_the_attempt(
    listener: socket.socket,
) -> Generator[Any, Any, None]:
    host, port = listener.getsockname()

    class Nothing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    failed = yield dial_failure(ConnectError, host, port, Nothing())
    assert str(failed) == "An error occurred while connecting: the factory built no protocol."


@pytest_twisted.inlineCallbacks
def test_an_ipv6_destination(listener: socket.socket) -> Generator[Any, Any, None]:
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        listener.close()  # no IPv6 loopback here: the IPv4 tests cover the rest
        return
    port = server.getsockname()[1]
    factory = Recorders()
    protocol = yield dial(reactor, "::1", port, factory)
    peer, _ = server.accept()
    [(addr, _)] = factory.built
    assert addr == IPv6Address("TCP", "::1", port)
    assert protocol.made.getPeer() == IPv6Address("TCP", "::1", port)
    assert protocol.made.getHost() == IPv6Address("TCP", "::1", peer.getpeername()[1])
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
    protocol = wrapper.buildProtocol(IPv4Address("TCP", "192.0.2.7", 80))
    assert factory.built[0][0] == IPv4Address("TCP", "192.0.2.7", 80)
    assert not attempt.called  # not until the protocol has its transport
    transport = object.__new__(DialledConnection)  # any transport will do
    protocol.makeConnection(transport)
    assert attempt.result is protocol and protocol.made is transport
    assert "makeConnection" not in vars(protocol)  # no closure left on it


class _NoSocketsReactor(MemoryReactorClock):
    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(24, "Too many open files")


def test_a_reactor_that_cannot_start_the_connect_fails_the_attempt() -> None:
    results: list[Any] = []
    dial(_NoSocketsReactor(), "127.0.0.1", 9, Recorders()).addBoth(results.append)
    [failure] = results
    assert failure.check(ConnectError)
    assert failure.getErrorMessage() == (
        "An error occurred while connecting: 24: Too many open files."
    )


def test_through_connect_tcp_a_failure_and_a_cancel() -> None:
    memory = MemoryReactorClock()
    failed = dial(memory, "192.0.2.7", 80, Recorders())
    [(_, _, wrapper, _, _)] = memory.tcpClients
    wrapper.clientConnectionFailed(memory.connectors[0], Failure(ConnectionRefusedError()))
    failures: list[Failure] = []
    failed.addErrback(failures.append)
    assert failures[0].check(ConnectionRefusedError)

    cancelled = dial(memory, "192.0.2.8", 80, Recorders())
    assert memory.tcpClients[1][4] is None  # no source address: the system's choice
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


def test_the_connection_runs_on_the_reactor_it_was_dialled_with(
    listener: socket.socket,
) -> None:
    """Not the global one: the reactor is injected all the way to the transport."""
    own = EPollReactor()
    try:
        results: list[Any] = []
        dial(own, *listener.getsockname(), Recorders()).addBoth(results.append)
        for _ in range(200):
            if results:
                break
            own.iterate(0.01)
        [protocol] = results
        assert protocol.made.reactor is own and protocol.made in own.getReaders()
        protocol.made.abortConnection()
        own.iterate(0)
        assert protocol.events == ["connectionLost"]
    finally:
        own.removeAll()
        own.waker.connectionLost(None)
        own._poller.close()

