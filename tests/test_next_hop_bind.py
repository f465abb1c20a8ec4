"""BIND through the next hop, in memory: the test plays the hop on a StringTransport.

The proxy under test cannot resolve the name, so it forwards the BIND; the
test reads the forwarded request off the hop connection and answers it
with the hop's two replies, as a real SOCKS4 server would.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident.nexthop import NextHop
from socksident.policy import Decision, IPolicy, Route
from socksident.server import ServerSettings, SOCKS4ServerFactory
from socksident.socks4 import Command, ReplyCode, RequestParser, build_reply

from tests.test_bind import (
    APP_HOST,
    APP_PORT,
    CLIENT_HOST,
    PROXY_HOST,
    PROXY_PORT,
    AllowAll,
    Client as BindClient,
    FakeResolver,
    bind_request,
    connect_request,
    parse_reply,
    replies,
)

NAME = b"ftp.only-at-the-hop.example"
HOP = IPv4Address("TCP", "10.0.0.2", 1080)
HOP_NAME = "tcp:10.0.0.2:1080"
HOP_LISTENS = ("10.0.0.2", 40555)  # where the hop waits for the application server
APP_AS_THE_HOP_SAW_IT = ("203.0.113.9", 20)


class Transport(StringTransport):
    """A StringTransport that records a write-half shutdown and, like TCP,
    tolerates `unregisterProducer` with no producer registered."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class Client(BindClient):
    """A client connection whose transport records a write-half shutdown."""

    def __init__(self, factory: SOCKS4ServerFactory, host: str = CLIENT_HOST, port: int = 50000):
        self.factory = factory
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = Transport(
            hostAddress=IPv4Address("TCP", PROXY_HOST, PROXY_PORT),
            peerAddress=IPv4Address("TCP", host, port),
        )
        self.protocol.makeConnection(self.transport)
        self.lost = False


class ScriptedHop:
    """The next hop's endpoint: each connection is a Transport the test plays."""

    def __init__(self, peer: Any = HOP, down: bool = False) -> None:
        self.peer = peer
        self.down = down
        self.connections: list[tuple[Any, Transport]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.down:
            return fail(ConnectionRefusedError("10.0.0.2:1080"))
        protocol = factory.buildProtocol(None)
        transport = Transport(peerAddress=self.peer)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    @property
    def protocol(self) -> Any:
        return self.connections[-1][0]

    @property
    def transport(self) -> Transport:
        return self.connections[-1][1]

    def answer(self, code: ReplyCode, address: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        host, port = address
        self.protocol.dataReceived(build_reply(code, port, host))


@implementer(IPolicy)
class ViaNextHop:
    """Permits everything and sends it through the next hop (a via=next-hop rule)."""

    def check(self, request: Any, context: Any) -> Decision:
        return Decision(ReplyCode.GRANTED, "test: via the hop", "t.conf:1", route=Route.NEXT_HOP)


def proxy(
    hop: ScriptedHop, policy: Any = None, names: Optional[dict[str, list[str]]] = None, **settings: Any
) -> tuple[SOCKS4ServerFactory, MemoryReactorClock]:
    settings.setdefault("bind_without_connect", True)
    clock = MemoryReactorClock()
    factory = SOCKS4ServerFactory(
        policy=policy if policy is not None else AllowAll(),
        settings=ServerSettings(**settings),
        reactor=clock,
        resolver=FakeResolver(names or {}),
        next_hop=NextHop(hop, HOP_NAME),
    )
    return factory, clock


def forwarded_bind(factory: SOCKS4ServerFactory, hop: ScriptedHop, **client: Any) -> Client:
    """A client's BIND for NAME, forwarded to the hop (nothing answered yet)."""
    c = Client(factory, **client)
    c.send(bind_request("0.0.0.1", user=b"alice", hostname=NAME))
    return c


def hop_log_lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "socksident.establish"]


def records(events: list[LogEvent]) -> list[Any]:
    return [e["access_record"] for e in events if "access_record" in e]


# -- both replies passed on, then the ordinary relay ------------------------------------


def test_the_bind_goes_on_unresolved_with_the_userid_and_both_replies_are_passed_on(
    access_events: list[LogEvent],
) -> None:
    hop = ScriptedHop()
    factory, clock = proxy(hop)
    client = forwarded_bind(factory, hop)
    forwarded = RequestParser().feed(hop.transport.value())
    assert forwarded is not None and forwarded.command is Command.BIND
    assert (forwarded.hostname, forwarded.port, forwarded.user_id) == (NAME.decode(), APP_PORT, "alice")
    assert client.replies() == []  # nothing until the hop answered
    hop.transport.clear()

    hop.answer(ReplyCode.GRANTED, HOP_LISTENS)
    # the hop's own address: that is where the application server must connect
    assert client.replies() == [(0, 90, HOP_LISTENS[1], HOP_LISTENS[0])]
    client.take()
    client.send(b"early ")  # before the application server came: kept
    assert hop.transport.value() == b""

    hop.protocol.dataReceived(build_reply(ReplyCode.GRANTED, 20, "203.0.113.9") + b"hello")
    second, data = client.take()[:8], client.transport.value()
    assert parse_reply(second) == (0, 90, 20, "203.0.113.9")  # as the hop reported it
    assert hop.transport.value() == b"early "
    assert client.transport.value() == b"" and data == b""
    hop.transport.clear()
    # the hop connection was held paused until the client had its reply; now it flows
    assert hop.transport.producerState == "producing"

    client.send(b"to the app")
    assert hop.transport.value() == b"to the app"

    # half-close: the application server's FIN reaches the client, the other way still flows
    hop.protocol.readConnectionLost()
    assert client.transport.write_closed and not client.transport.disconnecting
    client.send(b" more")
    assert hop.transport.value() == b"to the app more"
    client.protocol.readConnectionLost()
    assert client.transport.disconnecting and hop.transport.disconnecting
    hop.protocol.connectionLost(Failure(ConnectionDone()))
    client.close()

    [record] = records(access_events)
    assert record.replies == (ReplyCode.GRANTED, ReplyCode.GRANTED)
    assert record.next_hop == HOP_NAME and record.next_hop_reply == "90, 90"
    assert record.bytes_up == len(b"early to the app more") and record.bytes_down == len(b"hello")
    assert record.address is None  # the application server came in at the hop, not here
    assert not clock.getDelayedCalls()


def test_a_hop_that_says_0000_means_its_own_address() -> None:
    hop = ScriptedHop()
    factory, _ = proxy(hop)
    client = forwarded_bind(factory, hop)
    hop.answer(ReplyCode.GRANTED, ("0.0.0.0", 40555))
    # not 0.0.0.0: our client would take that for *our* address
    assert client.replies() == [(0, 90, 40555, HOP.host)]


def test_a_hop_address_that_a_reply_cannot_carry_is_91_and_closes_the_hop() -> None:
    hop = ScriptedHop(peer=IPv6Address("TCP", "2001:db8::2", 1080))
    factory, _ = proxy(hop)
    client = forwarded_bind(factory, hop)
    with capturedLogs() as events:
        hop.answer(ReplyCode.GRANTED, ("0.0.0.0", 40555))
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert hop.transport.disconnecting
    [line] = hop_log_lines(events)
    assert "2001:db8::2:40555" in line and "cannot carry" in line
    client.close()
    [record] = records(events)
    assert record.next_hop_reply == "90 at 2001:db8::2:40555, not an IPv4 address"


def test_a_name_that_resolves_here_goes_to_the_hop_under_a_via_next_hop_route(
    access_events: list[LogEvent],
) -> None:
    hop = ScriptedHop()
    factory, _ = proxy(hop, ViaNextHop(), {NAME.decode(): [APP_HOST]})
    client = forwarded_bind(factory, hop)
    forwarded = RequestParser().feed(hop.transport.value())
    assert forwarded is not None and forwarded.hostname == NAME.decode()
    hop.answer(ReplyCode.GRANTED, HOP_LISTENS)
    hop.answer(ReplyCode.GRANTED, APP_AS_THE_HOP_SAW_IT)
    assert [r[1] for r in client.replies()] == [90, 90]


# -- what goes wrong ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [ReplyCode.REJECTED, ReplyCode.IDENTD_UNREACHABLE, ReplyCode.IDENT_MISMATCH])
def test_a_refusal_of_the_first_reply_is_91_with_one_log_line(code: ReplyCode) -> None:
    hop = ScriptedHop()
    factory, _ = proxy(hop)
    client = forwarded_bind(factory, hop)
    with capturedLogs() as events:
        hop.answer(code)
        client.close()
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert client.transport.disconnecting and hop.transport.disconnecting
    assert hop_log_lines(events) == [f"{CLIENT_HOST}:50000: next hop {HOP_NAME} answered {int(code)}"]
    [record] = records(events)
    assert record.replies == (ReplyCode.REJECTED,) and record.next_hop_reply == str(int(code))


def test_a_refused_second_reply_is_91_after_the_first_90() -> None:
    hop = ScriptedHop()
    factory, _ = proxy(hop)
    client = forwarded_bind(factory, hop)
    hop.answer(ReplyCode.GRANTED, HOP_LISTENS)
    with capturedLogs() as events:
        hop.answer(ReplyCode.REJECTED)  # the hop's DSTIP check refused a stranger
        client.close()
    assert [r[1] for r in client.replies()] == [90, 91]
    assert client.transport.disconnecting and hop.transport.disconnecting
    assert hop_log_lines(events) == [f"{CLIENT_HOST}:50000: next hop {HOP_NAME} answered 90, then 91"]
    [record] = records(events)
    assert record.replies == (ReplyCode.GRANTED, ReplyCode.REJECTED)
    assert record.next_hop_reply == "90, 91"


@pytest.mark.parametrize("after_first", [False, True])
def test_garbage_from_the_hop_is_91(after_first: bool) -> None:
    hop = ScriptedHop()
    factory, _ = proxy(hop)
    client = forwarded_bind(factory, hop)
    if after_first:
        hop.answer(ReplyCode.GRANTED, HOP_LISTENS)
    with capturedLogs() as events:
        hop.protocol.dataReceived(b"HTTP/1.0")
        client.close()
    assert [r[1] for r in client.replies()] == ([90, 91] if after_first else [91])
    assert hop.transport.disconnecting
    [record] = records(events)
    said = "90, bad reply: " if after_first else "bad reply: "
    assert record.next_hop_reply.startswith(said) and "not a SOCKS4 reply" in record.next_hop_reply
    [line] = hop_log_lines(events)
    assert "not a SOCKS4 reply" in line


def test_a_hop_that_is_down_is_91() -> None:
    factory, _ = proxy(ScriptedHop(down=True))
    with capturedLogs() as events:
        client = forwarded_bind(factory, ScriptedHop())
        client.close()
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    [record] = records(events)
    assert record.next_hop_reply.startswith("unreachable: ")


def test_the_bind_time_limit_covers_waiting_for_the_second_reply() -> None:
    hop = ScriptedHop()
    factory, clock = proxy(hop, connect_timeout=10, bind_timeout=30)
    client = forwarded_bind(factory, hop)
    clock.advance(9)
    hop.answer(ReplyCode.GRANTED, HOP_LISTENS)
    with capturedLogs() as events:
        clock.advance(29.9)  # well past the connect timeout: the BIND limit runs now
        assert [r[1] for r in client.replies()] == [90]
        clock.advance(0.2)
        client.close()
    assert [r[1] for r in client.replies()] == [90, 91]
    assert hop.transport.aborted
    [record] = records(events)
    assert record.reason == "no inbound BIND connection within 30 s"
    assert record.next_hop_reply == "90"
    assert not clock.getDelayedCalls()


def test_the_connect_time_limit_covers_the_first_reply() -> None:
    hop = ScriptedHop()
    factory, clock = proxy(hop, connect_timeout=10, bind_timeout=30)
    client = forwarded_bind(factory, hop)
    clock.advance(10)
    assert client.replies() == [(0, 91, 0, "0.0.0.0")]
    assert hop.transport.aborted


def test_a_client_leaving_while_the_hop_waits_closes_the_hop_connection() -> None:
    hop = ScriptedHop()
    factory, clock = proxy(hop)
    client = forwarded_bind(factory, hop)
    hop.answer(ReplyCode.GRANTED, HOP_LISTENS)
    with capturedLogs() as events:
        client.close()
    assert hop.transport.aborted
    [record] = records(events)
    assert record.reason == "client closed the connection before the second reply"
    assert not clock.getDelayedCalls()


# -- BIND after CONNECT, through the hop --------------------------------------------


def test_a_forwarded_bind_needs_an_open_connect_through_the_hop_to_the_same_name(
    access_events: list[LogEvent],
) -> None:
    hop = ScriptedHop()
    factory, _ = proxy(hop, bind_without_connect=False)
    refused = forwarded_bind(factory, hop, port=50001)
    assert refused.replies() == [(0, 91, 0, "0.0.0.0")] and len(hop.connections) == 0
    assert "BIND without an open CONNECT from this client to " + NAME.decode() in records(
        access_events
    )[-1].reason

    primary = Client(factory, port=50002)
    primary.send(connect_request("0.0.0.1", hostname=NAME))
    hop.answer(ReplyCode.GRANTED, ("203.0.113.9", APP_PORT))
    assert primary.replies()[0][1] == 90
    assert factory.open_hop_connects == {(CLIENT_HOST, NAME.decode()): 1}
    assert not factory.open_connects  # nothing was reached from here

    other_host = Client(factory, host="192.0.2.99", port=50003)
    other_host.send(bind_request("0.0.0.1", hostname=NAME))
    assert other_host.replies() == [(0, 91, 0, "0.0.0.0")]
    other_name = Client(factory, port=50004)
    other_name.send(bind_request("0.0.0.1", hostname=b"elsewhere.example"))
    assert other_name.replies() == [(0, 91, 0, "0.0.0.0")]
    assert len(hop.connections) == 1

    allowed = forwarded_bind(factory, hop, port=50005)
    assert len(hop.connections) == 2
    hop.answer(ReplyCode.GRANTED, HOP_LISTENS)
    assert allowed.replies()[0][1] == 90

    primary_protocol, primary_transport = hop.connections[0]
    primary_protocol.connectionLost(Failure(ConnectionDone()))
    primary.close()
    assert not factory.open_hop_connects


# -- CONNECT to an address under a via=next-hop route, and the hop's own timers ------------


def test_a_connect_to_an_address_goes_to_the_hop_under_a_via_next_hop_route() -> None:
    hop = ScriptedHop()
    factory, clock = proxy(hop, ViaNextHop())
    client = Client(factory)
    with capturedLogs() as events:
        client.send(connect_request(APP_HOST, user=b"alice"))
        forwarded = RequestParser().feed(hop.transport.value())
        assert forwarded is not None and forwarded.command is Command.CONNECT
        assert (forwarded.address, forwarded.port, forwarded.user_id) == (APP_HOST, APP_PORT, "alice")
        assert factory.reactor.tcpClients == []  # not connected directly
        hop.answer(ReplyCode.GRANTED)
        assert [r[1] for r in client.replies()] == [90]
        client.close()
        hop.protocol.connectionLost(Failure(ConnectionDone()))
    [record] = records(events)
    assert (record.next_hop, record.next_hop_reply) == (HOP_NAME, "90")


@pytest.mark.parametrize("command", ["connect", "bind"])
def test_the_hops_time_limit_runs_on_the_servers_reactor(command: str) -> None:
    hop = ScriptedHop()
    factory, clock = proxy(hop, connect_timeout=10, bind_timeout=30)
    client = Client(factory)
    request = connect_request if command == "connect" else bind_request
    client.send(request("0.0.0.1", user=b"alice", hostname=NAME))
    times = sorted(call.getTime() for call in clock.getDelayedCalls())
    # the server's connect deadline, and the hop endpoint's own limit beside it
    assert times == ([10.0, 10.0] if command == "connect" else [10.0, 40.0])
    client.close()


def test_a_name_that_does_not_resolve_here_is_offered_to_the_policy_with_no_addresses() -> None:
    seen: list[Any] = []

    @implementer(IPolicy)
    class Recording:
        def check(self, request: Any, context: Any) -> Decision:
            seen.append(context.addresses)
            return Decision(ReplyCode.REJECTED, "looked")

    hop = ScriptedHop()
    factory, _ = proxy(hop, Recording())
    client = Client(factory)
    client.send(connect_request("0.0.0.1", user=b"alice", hostname=NAME))
    assert seen == [()]
    assert [r[1] for r in client.replies()] == [91] and hop.connections == []


def test_a_name_that_resolves_here_goes_direct_although_there_is_a_next_hop() -> None:
    hop = ScriptedHop()
    factory, clock = proxy(hop, AllowAll(), {NAME.decode(): [APP_HOST]})
    client = Client(factory)
    client.send(connect_request("0.0.0.1", user=b"alice", hostname=NAME))
    assert [c[0] for c in clock.tcpClients] == [APP_HOST]
    assert hop.connections == []
    client.close()
