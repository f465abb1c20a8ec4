"""BIND (CD 2), driven in memory: no sockets, no real time.

The reactor is a `MemoryReactorClock` whose `listenTCP` hands out `FakePort`s
that remember whether they were stopped, pick real port numbers, and refuse a
port that is already taken, as a real reactor would.  The test plays the
application server by asking a `FakePort` for a connection (which fails once
the port stopped listening) and plays the client by feeding bytes to the
server's protocol over a `StringTransport`.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident.policy import Decision, IPolicy
from socksident.server import ServerSettings, SOCKS4Server, SOCKS4ServerFactory
from socksident.socks4 import ReplyCode

PROXY_HOST = "192.0.2.1"  # the proxy's address the client connected to
PROXY_PORT = 1080
CLIENT_HOST = "192.0.2.10"
APP_HOST = "198.51.100.7"  # the application server (DSTIP)
APP_PORT = 2121  # DSTPORT: the port of the primary connection
OTHER_HOST = "203.0.113.66"  # some host that is not the application server


# -- test doubles -------------------------------------------------------------


class Transport(StringTransport):
    """A StringTransport that, like a real TCP transport, tolerates
    `unregisterProducer` with no producer registered."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class PortRefused(Exception):
    """Connecting to a port that is not listening."""


class FakePort:
    """An IListeningPort that records `stopListening` and can be connected to."""

    def __init__(self, reactor: "BindReactor", number: int, factory: Any, interface: str):
        self.reactor = reactor
        self.number = number
        self.factory = factory
        self.interface = interface
        self.listening = True
        self.transport_class = Transport
        self.connections: list[tuple[Protocol, Transport]] = []

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self.interface or "0.0.0.0", self.number)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Any:
        self.listening = False
        return succeed(None)

    def connect(self, host: str, port: int = 40001) -> Optional[tuple[Protocol, Transport]]:
        """The application server connects from host:port.

        Returns None when the factory refuses the connection (buildProtocol
        returned None); raises PortRefused when nothing listens here any more.
        """
        if not self.listening:
            raise PortRefused(f"{self.interface}:{self.number} is not listening")
        protocol = self.factory.buildProtocol(IPv4Address("TCP", host, port))
        if protocol is None:
            return None
        transport = self.transport_class(
            hostAddress=self.getHost(), peerAddress=IPv4Address("TCP", host, port)
        )
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return protocol, transport


class BindReactor(MemoryReactorClock):
    """MemoryReactorClock whose listening ports behave enough like real ones."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []
        self.busy: set[int] = set()  # taken by some other program
        self._next_ephemeral = 40000

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> FakePort:
        in_use = {p.number for p in self.ports if p.listening} | self.busy
        if port in in_use:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))
        if port == 0:
            while self._next_ephemeral in in_use:
                self._next_ephemeral += 1
            port = self._next_ephemeral
            self._next_ephemeral += 1
        self.tcpServers.append((port, factory, backlog, interface))
        fake = FakePort(self, port, factory, interface)
        self.ports.append(fake)
        return fake


@implementer(IPolicy)
class AllowAll:
    def check(self, request: Any, context: Any) -> Decision:
        return Decision(ReplyCode.GRANTED, "test policy: allow")


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class FakeResolver:
    """Resolves names from a table, synchronously."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self.table.get(hostName, []):
            resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


# -- helpers ----------------------------------------------------------------------


def request(command: int, address: str, port: int = APP_PORT, user: bytes = b"alice",
            hostname: Optional[bytes] = None) -> bytes:
    data = struct.pack("!BBH4s", 4, command, port, socket.inet_aton(address)) + user + b"\0"
    if hostname is not None:
        data += hostname + b"\0"
    return data


def bind_request(address: str = APP_HOST, **kwargs: Any) -> bytes:
    return request(2, address, **kwargs)


def connect_request(address: str = APP_HOST, **kwargs: Any) -> bytes:
    return request(1, address, **kwargs)


def parse_reply(data: bytes) -> tuple[int, int, int, str]:
    assert len(data) == 8, f"a reply is 8 bytes, got {data!r}"
    version, code, port, packed = struct.unpack("!BBH4s", data)
    return version, code, port, socket.inet_ntoa(packed)


def replies(transport: StringTransport) -> list[tuple[int, int, int, str]]:
    data = transport.value()
    assert len(data) % 8 == 0, f"not a whole number of replies: {data!r}"
    return [parse_reply(data[i : i + 8]) for i in range(0, len(data), 8)]


class Client:
    """One client connection to the proxy."""

    def __init__(self, factory: SOCKS4ServerFactory, host: str = CLIENT_HOST, port: int = 50000):
        self.factory = factory
        self.protocol: SOCKS4Server = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = Transport(
            hostAddress=IPv4Address("TCP", PROXY_HOST, PROXY_PORT),
            peerAddress=IPv4Address("TCP", host, port),
        )
        self.protocol.makeConnection(self.transport)
        self.lost = False

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def replies(self) -> list[tuple[int, int, int, str]]:
        return replies(self.transport)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def close(self) -> None:
        """The client's connection goes away (after our loseConnection, or its own)."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def reactor() -> BindReactor:
    return BindReactor()




def make_factory(reactor: BindReactor, resolver: Any = None, **settings: Any) -> SOCKS4ServerFactory:
    settings.setdefault("bind_without_connect", True)
    return SOCKS4ServerFactory(
        policy=AllowAll(),
        settings=ServerSettings(**settings),
        reactor=reactor,
        resolver=resolver,
    )


def bound(reactor: BindReactor, factory: SOCKS4ServerFactory, address: str = APP_HOST,
          hostname: Optional[bytes] = None, **kwargs: Any) -> tuple[Client, FakePort]:
    """A client whose BIND got its first reply; returns it and the listener."""
    before = len(reactor.ports)
    client = Client(factory, **kwargs)
    client.send(bind_request(address, hostname=hostname))
    assert len(reactor.ports) == before + 1, "BIND opened no listener"
    port = reactor.ports[-1]
    assert client.replies() == [(0, 90, port.number, PROXY_HOST)]
    client.take()
    return client, port


# -- the first reply ------------------------------------------------------------


def test_first_reply_carries_the_listening_address(reactor: BindReactor) -> None:
    client = Client(make_factory(reactor))
    client.send(bind_request())
    [(port_number, _, backlog, interface)] = reactor.tcpServers
    assert interface == PROXY_HOST, "listen on the address the client connected to"
    port = reactor.ports[0]
    assert port.listening
    # The real address, not 0.0.0.0: the listener is not on every address.
    assert client.replies() == [(0, 90, port_number, PROXY_HOST)]
    assert not client.transport.disconnecting


def test_request_split_into_single_bytes(reactor: BindReactor) -> None:
    client = Client(make_factory(reactor))
    for byte in bind_request():
        assert not reactor.ports
        client.send(bytes([byte]))
    assert len(reactor.ports) == 1
    assert client.replies() == [(0, 90, reactor.ports[0].number, PROXY_HOST)]


# -- the second reply and the relay ------------------------------------------


def test_matching_inbound_gets_second_reply_and_relays_both_ways(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    client, port = bound(reactor, make_factory(reactor))
    client.send(b"early bytes from the client ")  # before the inbound connection
    accepted = port.connect(APP_HOST, 40123)
    assert accepted is not None
    app, app_transport = accepted

    assert not port.listening, "exactly one connection: stop listening once accepted"
    assert client.replies()[0] == (0, 90, 40123, APP_HOST)
    client.transport.clear()
    assert app_transport.value() == b"early bytes from the client "
    app_transport.clear()

    client.send(b"to the app")
    assert app_transport.value() == b"to the app"
    app.dataReceived(b"to the client")
    assert client.transport.value() == b"to the client"
    assert app_transport.producerState == "producing"
    assert client.transport.producerState == "producing"

    # Closing one side closes the other, and the request is logged once.
    app.connectionLost(Failure(ConnectionDone()))
    assert client.transport.disconnecting
    client.close()
    [event] = access_events
    assert event["command"] == "BIND" and event["code"] == 90
    assert event["address"] == APP_HOST
    assert event["bytes_up"] == len(b"early bytes from the client to the app")
    assert event["bytes_down"] == len(b"to the client")


def test_app_is_not_read_before_the_second_reply(reactor: BindReactor) -> None:
    """The inbound connection stays paused until the client has its second reply,
    so no byte from the application can overtake the reply."""
    client, port = bound(reactor, make_factory(reactor))
    seen_at_resume: list[bytes] = []

    class Inbound(Transport):
        def resumeProducing(self) -> None:
            seen_at_resume.append(client.transport.value())
            super().resumeProducing()

    port.transport_class = Inbound
    accepted = port.connect(APP_HOST, 40124)
    assert accepted is not None
    assert seen_at_resume, "the inbound connection was never resumed"
    assert seen_at_resume[0] == reply_bytes(90, 40124, APP_HOST)


def test_mismatched_inbound_is_never_read(reactor: BindReactor) -> None:
    client, port = bound(reactor, make_factory(reactor))
    accepted = port.connect(OTHER_HOST)
    assert accepted is not None
    assert accepted[1].producerState == "paused"


def reply_bytes(code: int, port: int, host: str) -> bytes:
    return struct.pack("!BBH4s", 0, code, port, socket.inet_aton(host))


def test_second_connection_to_the_listener_is_refused(reactor: BindReactor) -> None:
    """Even if a second connection races the first, only one is accepted."""
    client, port = bound(reactor, make_factory(reactor))
    factory = port.factory
    assert port.connect(APP_HOST) is not None
    # Whatever the kernel had queued is refused by the factory.
    assert factory.buildProtocol(IPv4Address("TCP", APP_HOST, 40002)) is None
    with pytest.raises(PortRefused):
        port.connect(APP_HOST)


def test_mismatch_gets_91_and_closes_both(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    client, port = bound(reactor, make_factory(reactor))
    accepted = port.connect(OTHER_HOST)
    assert accepted is not None
    app, app_transport = accepted
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert client.transport.disconnecting
    assert app_transport.disconnecting
    assert app_transport.value() == b""
    assert not port.listening
    client.close()
    [event] = access_events
    assert event["code"] == 91
    assert OTHER_HOST in event["reason"] and APP_HOST in event["reason"]


# -- the time limit and the client leaving -------------------------------------


def test_time_limit_default_is_120_seconds(reactor: BindReactor, access_events: list[LogEvent]) -> None:
    client, port = bound(reactor, make_factory(reactor))
    reactor.advance(119.9)
    assert client.replies() == []
    assert port.listening and not client.transport.disconnecting
    reactor.advance(0.1)
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert client.transport.disconnecting
    assert not port.listening
    with pytest.raises(PortRefused):
        port.connect(APP_HOST)
    client.close()
    [event] = access_events
    assert event["code"] == 91
    assert "no inbound BIND connection within 120 s" in event["reason"]
    assert not reactor.getDelayedCalls(), "nothing left scheduled"


def test_time_limit_is_bind_timeout(reactor: BindReactor) -> None:
    client, port = bound(reactor, make_factory(reactor, bind_timeout=5))
    reactor.advance(4.99)
    assert port.listening
    reactor.advance(0.01)
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert not port.listening


def test_time_limit_not_applied_once_relaying(reactor: BindReactor) -> None:
    client, port = bound(reactor, make_factory(reactor))
    reactor.advance(60)
    assert port.connect(APP_HOST) is not None
    assert not reactor.getDelayedCalls(), "the BIND time limit is cancelled"
    client.take()
    reactor.advance(300)
    assert client.transport.value() == b""
    assert not client.transport.disconnecting


def test_client_leaving_closes_the_listener_at_once(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    client, port = bound(reactor, make_factory(reactor))
    client.close()
    assert not port.listening, "the listener must not outlive its client"
    with pytest.raises(PortRefused):
        port.connect(APP_HOST)
    assert not reactor.getDelayedCalls()
    reactor.advance(200)
    assert client.transport.value() == b""
    [event] = access_events
    assert event["command"] == "BIND"
    assert "client closed" in event["reason"]
    # what happened: the first reply went out, no second one did
    assert event["replies"] == [90] and event["code"] is None
    assert "before the second reply" in event["reason"]
    assert " BIND " in event["summary"] and " -> - (" in event["summary"]


def test_client_half_close_closes_the_listener(reactor: BindReactor) -> None:
    client, port = bound(reactor, make_factory(reactor))
    client.protocol.readConnectionLost()
    assert client.transport.disconnecting
    client.close()
    assert not port.listening


def test_too_much_data_before_the_inbound_connection_gets_91(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    """A paused transport would not notice its client leave, so the listener
    could outlive it; a BIND client over the early-data limit is refused instead."""
    client, port = bound(reactor, make_factory(reactor, early_data_limit=100))
    client.send(b"x" * 99)
    assert port.listening and client.replies() == []
    client.send(b"x")
    assert client.transport.producerState != "paused"
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert client.transport.disconnecting
    assert not port.listening
    client.send(b"more")  # whatever still arrives is ignored
    client.close()
    [event] = access_events
    assert event["code"] == 91 and "100 bytes" in event["reason"]


def test_too_much_data_with_the_bind_request_gets_91(reactor: BindReactor) -> None:
    client = Client(make_factory(reactor, early_data_limit=100))
    client.send(bind_request() + b"x" * 100)
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert not any(p.listening for p in reactor.ports)
    assert client.transport.producerState != "paused"


def test_too_much_data_while_the_policy_decides_gets_91(reactor: BindReactor) -> None:
    decisions: list[Deferred[Decision]] = []

    @implementer(IPolicy)
    class Slow:
        def check(self, request: Any, context: Any) -> Deferred[Decision]:
            decisions.append(Deferred())
            return decisions[-1]

    factory = SOCKS4ServerFactory(
        policy=Slow(),
        settings=ServerSettings(bind_without_connect=True, early_data_limit=100),
        reactor=reactor,
    )
    client = Client(factory)
    client.send(bind_request())
    client.send(b"x" * 100)
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert decisions and decisions[0].called, "the pending decision is cancelled"
    assert reactor.ports == []


def test_client_leaving_before_the_listener_exists(reactor: BindReactor) -> None:
    """The client goes while its 4A name is still resolving: no listener ever opens."""
    pending: list[Any] = []

    @implementer(IHostnameResolver)
    class Slow:
        def resolveHostName(self, receiver: Any, name: str, portNumber: int = 0,
                            addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
            pending.append(receiver)
            receiver.resolutionBegan(_Resolution(name))
            return _Resolution(name)

    client = Client(make_factory(reactor, resolver=Slow()))
    client.send(bind_request("0.0.0.1", hostname=b"app.example"))
    assert pending
    client.close()
    receiver = pending[0]
    receiver.addressResolved(IPv4Address("TCP", APP_HOST, 0))
    receiver.resolutionComplete()
    assert reactor.ports == []
    assert client.transport.value() == b""


# -- --bind-ports ------------------------------------------------------------------


def test_bind_ports_picks_a_free_port_in_the_range(reactor: BindReactor) -> None:
    reactor.busy = {50000, 50001}
    client, port = bound(reactor, make_factory(reactor, bind_ports=(50000, 50003)))
    assert port.number in (50002, 50003)


def test_bind_ports_start_at_a_random_port_and_cover_the_range() -> None:
    from random import Random

    from socksident.bind import candidate_ports

    assert candidate_ports(None) == [0]
    orders = {tuple(candidate_ports((100, 104), Random(seed))) for seed in range(50)}
    assert all(sorted(order) == [100, 101, 102, 103, 104] for order in orders)
    assert {order[0] for order in orders} == {100, 101, 102, 103, 104}
    assert all(list(order) == sorted(order, key=lambda p: (p < order[0], p)) for order in orders)


def test_bind_ports_exhausted_gets_91(reactor: BindReactor, access_events: list[LogEvent]) -> None:
    reactor.busy = {50000, 50001}
    client = Client(make_factory(reactor, bind_ports=(50000, 50001)))
    client.send(bind_request())
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert client.transport.disconnecting
    assert not any(p.listening for p in reactor.ports)
    [event] = access_events
    assert event["code"] == 91 and "no free port" in event["reason"]


def test_bind_ports_range_shared_by_concurrent_binds(reactor: BindReactor) -> None:
    factory = make_factory(reactor, bind_ports=(50000, 50000))
    first, port = bound(reactor, factory)
    assert port.number == 50000
    second = Client(factory, port=50001)
    second.send(bind_request())
    assert second.replies() == [(0, 91, 0, "0.0.0.0")]
    # Once the first BIND is over, its port can be used again.
    first.close()
    third, port = bound(reactor, factory, port=50002)
    assert port.number == 50000


# -- BIND only after CONNECT ---------------------------------------------------------


class PrimaryConnect:
    """A CONNECT relay from `host` to `destination` through `factory`."""

    def __init__(self, reactor: BindReactor, factory: SOCKS4ServerFactory,
                 host: str = CLIENT_HOST, destination: str = APP_HOST) -> None:
        self.client = Client(factory, host=host, port=45000)
        self.client.send(connect_request(destination))
        connect_host, connect_port, remote_factory, _, _ = reactor.tcpClients[-1]
        assert (connect_host, connect_port) == (destination, APP_PORT)
        self.remote = remote_factory.buildProtocol(IPv4Address("TCP", destination, APP_PORT))
        self.remote_transport = Transport(
            hostAddress=IPv4Address("TCP", PROXY_HOST, 46000),
            peerAddress=IPv4Address("TCP", destination, APP_PORT),
        )
        self.remote.makeConnection(self.remote_transport)
        assert self.client.replies() == [(0, 90, APP_PORT, destination)]

    def close(self) -> None:
        self.remote.connectionLost(Failure(ConnectionDone()))
        self.client.close()


def bind_refused(client: Client, access_events: list[LogEvent]) -> None:
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert client.transport.disconnecting
    [event] = [e for e in access_events if e["command"] == "BIND"]
    assert event["code"] == 91
    assert "BIND without an open CONNECT" in event["reason"]
    assert APP_HOST in event["reason"]


def test_bind_refused_without_an_open_connect(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    factory = make_factory(reactor, bind_without_connect=False)
    client = Client(factory)
    client.send(bind_request())
    bind_refused(client, access_events)
    assert reactor.tcpServers == [], "a refused BIND opens no listener"


def test_default_settings_require_connect(reactor: BindReactor, access_events: list[LogEvent]) -> None:
    factory = SOCKS4ServerFactory(policy=AllowAll(), reactor=reactor)
    client = Client(factory)
    client.send(bind_request())
    bind_refused(client, access_events)


def test_bind_without_connect_allows_it(reactor: BindReactor) -> None:
    client, port = bound(reactor, make_factory(reactor, bind_without_connect=True))
    assert port.listening


def test_bind_allowed_while_connect_open_and_refused_after(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    factory = make_factory(reactor, bind_without_connect=False)
    primary = PrimaryConnect(reactor, factory)

    client, port = bound(reactor, factory, port=45001)
    assert port.connect(APP_HOST) is not None
    assert client.replies()[0][1] == 90

    primary.close()
    assert not factory.open_connects
    access_events.clear()
    later = Client(factory, port=45002)
    later.send(bind_request())
    bind_refused(later, access_events)


def test_connect_from_another_host_does_not_count(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    factory = make_factory(reactor, bind_without_connect=False)
    PrimaryConnect(reactor, factory, host="192.0.2.99")
    client = Client(factory)
    client.send(bind_request())
    bind_refused(client, access_events)


def test_connect_to_another_destination_does_not_count(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    factory = make_factory(reactor, bind_without_connect=False)
    PrimaryConnect(reactor, factory, destination=OTHER_HOST)
    client = Client(factory)
    client.send(bind_request())
    bind_refused(client, access_events)


def test_two_connects_one_closed_still_allows(reactor: BindReactor) -> None:
    factory = make_factory(reactor, bind_without_connect=False)
    first = PrimaryConnect(reactor, factory)
    PrimaryConnect(reactor, factory)
    first.close()
    client, port = bound(reactor, factory, port=45003)
    assert port.listening


# -- SOCKS4A BIND -----------------------------------------------------------------------


def test_4a_bind_matches_any_resolved_address(reactor: BindReactor) -> None:
    resolver = FakeResolver({"app.example": [APP_HOST, "198.51.100.8"]})
    factory = make_factory(reactor, resolver=resolver)
    client, port = bound(reactor, factory, address="0.0.0.1", hostname=b"app.example")
    assert resolver.asked == ["app.example"]
    assert port.connect("198.51.100.8", 40200) is not None
    assert client.replies()[0] == (0, 90, 40200, "198.51.100.8")


def test_4a_bind_from_an_address_the_name_lacks_gets_91(reactor: BindReactor) -> None:
    resolver = FakeResolver({"app.example": [APP_HOST, "198.51.100.8"]})
    client = Client(make_factory(reactor, resolver=resolver))
    client.send(bind_request("0.0.0.1", hostname=b"app.example"))
    port = reactor.ports[0]
    client.take()
    accepted = port.connect(OTHER_HOST)
    assert accepted is not None
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert accepted[1].disconnecting and client.transport.disconnecting


def test_4a_bind_ignores_the_marker_address(reactor: BindReactor) -> None:
    """0.0.0.x is only the 4A marker: a connection from it is not the app server."""
    resolver = FakeResolver({"app.example": [APP_HOST]})
    client = Client(make_factory(reactor, resolver=resolver))
    client.send(bind_request("0.0.0.1", hostname=b"app.example"))
    client.take()
    reactor.ports[0].connect("0.0.0.1")
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]


def test_4a_bind_name_that_does_not_resolve_gets_91(reactor: BindReactor) -> None:
    client = Client(make_factory(reactor, resolver=FakeResolver({})))
    client.send(bind_request("0.0.0.1", hostname=b"nowhere.example"))
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert reactor.ports == []


def test_4a_bind_requires_connect_to_a_resolved_address(
    reactor: BindReactor, access_events: list[LogEvent]
) -> None:
    resolver = FakeResolver({"app.example": ["198.51.100.8", APP_HOST]})
    factory = make_factory(reactor, resolver=resolver, bind_without_connect=False)
    PrimaryConnect(reactor, factory)  # to APP_HOST, the name's second address
    client, port = bound(reactor, factory, address="0.0.0.1", hostname=b"app.example", port=45004)
    assert port.listening


def test_bind_may_follow_a_socks4a_connect(reactor: BindReactor) -> None:
    """The CONNECT is recorded under the address it reached, not its 0.0.0.x marker."""
    factory = make_factory(
        reactor, resolver=FakeResolver({"app.example": [APP_HOST]}), bind_without_connect=False
    )
    primary = Client(factory, port=45000)
    primary.send(connect_request("0.0.0.1", hostname=b"app.example"))
    remote_factory = reactor.tcpClients[-1][2]
    remote = remote_factory.buildProtocol(IPv4Address("TCP", APP_HOST, APP_PORT))
    remote.makeConnection(
        Transport(
            hostAddress=IPv4Address("TCP", PROXY_HOST, 46000),
            peerAddress=IPv4Address("TCP", APP_HOST, APP_PORT),
        )
    )
    assert primary.replies() == [(0, 90, APP_PORT, APP_HOST)]
    client, port = bound(reactor, factory, port=45001)
    assert port.listening


def test_bind_address_setting_chooses_the_listening_address(reactor: BindReactor) -> None:
    factory = make_factory(reactor, bind_address="198.51.100.7")
    client = Client(factory)
    client.send(bind_request())
    port = reactor.ports[-1]
    assert port.interface == "198.51.100.7"
    assert client.replies() == [(0, 90, port.number, "198.51.100.7")]
