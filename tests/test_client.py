"""The SOCKS4 client endpoints: against our own server in memory (iosim),
and against a scripted proxy (StringTransport) for every bad answer."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer
from twisted.internet.interfaces import IHalfCloseableProtocol

from socksident.client import (
    HandshakeTimeout,
    InvalidReply,
    ProxyClosed,
    SOCKS4BindEndpoint,
    SOCKS4ClientEndpoint,
    ShortReply,
    socks4_request,
)
from socksident.policy import deny
from socksident.server import SOCKS4ServerFactory
from socksident.socks4 import (
    Command,
    IdentdMismatch,
    IdentdUnreachable,
    ReplyCode,
    RequestParser,
    RequestRejectedOrFailed,
    build_reply,
)

from tests.test_server import FakeResolver

PROXY = IPv4Address("TCP", "10.0.0.1", 1080)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made = False
        self.lost: Optional[Failure] = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfRecorder(Recorder):
    read_closed = False

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass


class ScriptedProxy:
    """An endpoint whose connection is a StringTransport the test plays."""

    def __init__(self) -> None:
        self.transport = StringTransport(peerAddress=PROXY)
        self.protocol: Any = None
        self.pending: Optional[Deferred[Any]] = None

    def connect(self, factory: Any) -> Deferred[Any]:
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class SlowProxy:
    """An endpoint whose connection never completes (until cancelled)."""

    def __init__(self) -> None:
        self.cancelled = False

    def connect(self, factory: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled = True

        return Deferred(cancel)


def results(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def scripted(host: str = "192.0.2.7", port: int = 80, user: bytes = b"alice", **kw: Any):
    clock = MemoryReactorClock()
    proxy = ScriptedProxy()
    endpoint = SOCKS4ClientEndpoint(host, port, proxy, user, reactor=clock, **kw)
    return clock, proxy, results(endpoint.connect(Factory.forProtocol(Recorder)))


def test_an_ipv4_literal_is_sent_as_socks4_and_a_name_as_socks4a():
    request = RequestParser().feed(socks4_request(Command.CONNECT, "192.0.2.7", 80, b"alice"))
    assert request is not None and request.address == "192.0.2.7" and not request.is_socks4a
    assert request.user_id == "alice"
    request = RequestParser().feed(socks4_request(Command.CONNECT, "example.com", 443, "bob"))
    assert request is not None and request.hostname == "example.com" and request.port == 443


@pytest.mark.parametrize("host", ["::1", "bad name", "a..b"])
def test_what_socks4_cannot_carry_is_a_value_error(host):
    with pytest.raises(ValueError):
        SOCKS4ClientEndpoint(host, 80, ScriptedProxy())


def test_granted_hands_the_connection_over_with_early_bytes():
    clock, proxy, result = scripted()
    assert proxy.transport.value() == socks4_request(Command.CONNECT, "192.0.2.7", 80, b"alice")
    assert result == []
    proxy.protocol.dataReceived(build_reply(ReplyCode.GRANTED)[:3])
    assert result == []
    proxy.protocol.dataReceived(build_reply(ReplyCode.GRANTED)[3:] + b"hello")
    [protocol] = result
    assert isinstance(protocol, Recorder) and protocol.made and protocol.data == b"hello"
    assert protocol.transport is proxy.transport
    proxy.protocol.dataReceived(b" world")
    assert protocol.data == b"hello world"
    assert not clock.getDelayedCalls()  # the time limit is gone


@pytest.mark.parametrize(
    "code,error",
    [(91, RequestRejectedOrFailed), (92, IdentdUnreachable), (93, IdentdMismatch)],
)
def test_each_refusal_is_its_own_class_with_its_code(code, error):
    _, proxy, result = scripted()
    proxy.protocol.dataReceived(build_reply(ReplyCode(code)))
    [failure] = result
    assert failure.check(error) and failure.value.code == code
    assert "10.0.0.1:1080" in failure.value.reason
    assert proxy.transport.disconnecting


@pytest.mark.parametrize("reply", [b"HTTP/1.0", b"\x00\x5f\x00\x00\x00\x00\x00\x00",
                                   b"\x04\x5a\x00\x00\x00\x00\x00\x00"])
def test_garbage_is_an_invalid_reply(reply):
    _, proxy, result = scripted()
    proxy.protocol.dataReceived(reply)
    [failure] = result
    assert failure.check(InvalidReply)
    assert proxy.transport.disconnecting


def test_a_close_in_the_middle_of_the_reply_is_a_short_reply():
    _, proxy, result = scripted()
    proxy.protocol.dataReceived(b"\x00\x5a\x00")
    proxy.protocol.connectionLost(Failure(Exception("closed")))
    [failure] = result
    assert failure.check(ShortReply) and "3 bytes" in failure.value.reason


def test_a_close_before_any_reply_is_proxy_closed():
    _, proxy, result = scripted()
    proxy.protocol.readConnectionLost()
    [failure] = result
    assert failure.check(ProxyClosed)


def test_no_reply_in_time_is_a_timeout_and_aborts():
    clock, proxy, result = scripted(timeout=5)
    clock.advance(4.9)
    assert result == []
    clock.advance(0.2)
    [failure] = result
    assert failure.check(HandshakeTimeout)
    assert proxy.transport.disconnecting


def test_the_timeout_covers_reaching_the_proxy():
    clock = MemoryReactorClock()
    proxy = SlowProxy()
    endpoint = SOCKS4ClientEndpoint("192.0.2.7", 80, proxy, reactor=clock, timeout=3)
    result = results(endpoint.connect(Factory.forProtocol(Recorder)))
    clock.advance(3)
    [failure] = result
    assert failure.check(HandshakeTimeout) and proxy.cancelled


def test_cancel_closes_the_proxy_connection():
    clock = MemoryReactorClock()
    proxy = ScriptedProxy()
    d = SOCKS4ClientEndpoint("192.0.2.7", 80, proxy, reactor=clock).connect(
        Factory.forProtocol(Recorder)
    )
    result = results(d)
    d.cancel()
    [failure] = result
    assert failure.check(CancelledError)
    assert proxy.transport.disconnecting
    assert not clock.getDelayedCalls()


def test_cancel_while_connecting_cancels_the_proxy_connect():
    proxy = SlowProxy()
    d = SOCKS4ClientEndpoint("192.0.2.7", 80, proxy, reactor=MemoryReactorClock()).connect(
        Factory.forProtocol(Recorder)
    )
    result = results(d)
    d.cancel()
    assert proxy.cancelled and result[0].check(CancelledError)


def test_half_close_passes_through_to_a_half_closeable_protocol():
    clock = MemoryReactorClock()
    proxy = ScriptedProxy()
    result = results(
        SOCKS4ClientEndpoint("192.0.2.7", 80, proxy, reactor=clock).connect(
            Factory.forProtocol(HalfRecorder)
        )
    )
    proxy.protocol.dataReceived(build_reply(ReplyCode.GRANTED))
    [protocol] = result
    assert IHalfCloseableProtocol.providedBy(proxy.protocol)
    proxy.protocol.readConnectionLost()
    assert protocol.read_closed and not proxy.transport.disconnecting


def test_a_fin_closes_a_protocol_that_is_not_half_closeable():
    _, proxy, result = scripted()
    proxy.protocol.dataReceived(build_reply(ReplyCode.GRANTED))
    proxy.protocol.readConnectionLost()
    assert proxy.transport.disconnecting
    proxy.protocol.connectionLost(Failure(Exception("gone")))
    assert result[0].lost is not None


def test_bind_fires_with_the_listen_address_then_the_protocol():
    clock = MemoryReactorClock()
    proxy = ScriptedProxy()
    endpoint = SOCKS4BindEndpoint("192.0.2.7", 21, proxy, b"alice", reactor=clock, timeout=10)
    pending = endpoint.bind(Factory.forProtocol(Recorder))
    listening, connected = results(pending.listening), results(pending.connected)
    request = RequestParser().feed(proxy.transport.value())
    assert request is not None and request.command is Command.BIND
    clock.advance(9)
    proxy.protocol.dataReceived(build_reply(ReplyCode.GRANTED, 40001, "0.0.0.0"))
    assert listening == [IPv4Address("TCP", "10.0.0.1", 40001)] and connected == []
    clock.advance(9)  # the time limit started over with the first reply
    assert connected == []
    proxy.protocol.dataReceived(build_reply(ReplyCode.GRANTED, 20, "192.0.2.7") + b"x")
    [protocol] = connected
    assert protocol.data == b"x"


def test_bind_listen_address_as_the_proxy_sent_it_and_a_refused_second_reply():
    proxy = ScriptedProxy()
    endpoint = SOCKS4BindEndpoint("192.0.2.7", 21, proxy, reactor=MemoryReactorClock())
    seen: list[Any] = []
    endpoint.on_listening = seen.append
    connected = results(endpoint.connect(Factory.forProtocol(Recorder)))
    proxy.protocol.dataReceived(build_reply(ReplyCode.GRANTED, 40001, "198.51.100.1"))
    assert seen == [IPv4Address("TCP", "198.51.100.1", 40001)]
    proxy.protocol.dataReceived(build_reply(ReplyCode.REJECTED))
    assert connected[0].check(RequestRejectedOrFailed)


def test_bind_refused_at_once_fails_both():
    proxy = ScriptedProxy()
    pending = SOCKS4BindEndpoint("192.0.2.7", 21, proxy, reactor=MemoryReactorClock()).bind(
        Factory.forProtocol(Recorder)
    )
    listening, connected = results(pending.listening), results(pending.connected)
    proxy.protocol.dataReceived(build_reply(ReplyCode.IDENT_MISMATCH))
    assert listening[0].check(IdentdMismatch) and connected[0].check(IdentdMismatch)


# -- against our own server, in memory ------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data.upper())


class MemoryNetwork:
    """Our SOCKS4ServerFactory behind an endpoint; its outbound connects
    completed by iosim to an upper-casing echo server."""

    def __init__(self, policy: Any = None) -> None:
        self.clock = MemoryReactorClock()
        self.resolver = FakeResolver()
        self.server = SOCKS4ServerFactory(policy, reactor=self.clock, resolver=self.resolver)
        self.pumps: list[iosim.IOPump] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        server = self.server.buildProtocol(None)
        a, b = IPv4Address("TCP", "127.0.0.1", 40000), IPv4Address("TCP", "127.0.0.1", 1080)
        self.pumps.append(
            iosim.connect(
                server, iosim.FakeTransport(server, True, b, a),
                client, iosim.FakeTransport(client, False, a, b),
                greet=False, clock=self.clock,
            )
        )
        return succeed(client)

    def complete_outbound(self) -> tuple[str, int]:
        host, port, factory, _, _ = self.clock.tcpClients.pop()
        remote = factory.buildProtocol(None)
        echo = Echo()
        a, b = IPv4Address("TCP", "127.0.0.1", 50000), IPv4Address("TCP", host, port)
        self.pumps.append(
            iosim.connect(
                echo, iosim.FakeTransport(echo, True, b, a),
                remote, iosim.FakeTransport(remote, False, a, b),
                greet=False, clock=self.clock,
            )
        )
        return host, port

    def flush(self) -> None:
        for _ in range(20):
            moved = [pump.flush() for pump in self.pumps]
            if not any(moved):
                return


def test_connect_through_our_server_by_address():
    net = MemoryNetwork()
    result = results(SOCKS4ClientEndpoint("192.0.2.7", 80, net, b"alice", reactor=net.clock)
                     .connect(Factory.forProtocol(Recorder)))
    net.flush()
    assert net.complete_outbound() == ("192.0.2.7", 80)
    net.flush()
    [protocol] = result
    protocol.transport.write(b"ping")
    net.flush()
    assert protocol.data == b"PING"


def test_connect_through_our_server_by_name():
    net = MemoryNetwork()
    result = results(SOCKS4ClientEndpoint("www.example.com", 443, net, reactor=net.clock)
                     .connect(Factory.forProtocol(Recorder)))
    net.flush()
    assert net.resolver.calls[-1][1] == "www.example.com"
    net.resolver.answer("192.0.2.9")
    assert net.complete_outbound() == ("192.0.2.9", 443)
    net.flush()
    [protocol] = result
    protocol.transport.write(b"x")
    net.flush()
    assert protocol.data == b"X"


def test_our_servers_refusal_arrives_as_its_class():
    class Deny:
        def check(self, request: Any, context: Any) -> Any:
            return deny("not you")

    net = MemoryNetwork(Deny())
    result = results(SOCKS4ClientEndpoint("192.0.2.7", 80, net, reactor=net.clock)
                     .connect(Factory.forProtocol(Recorder)))
    net.flush()
    [failure] = result
    assert failure.check(RequestRejectedOrFailed) and failure.value.code == 91


def test_chains_compose_through_two_of_our_servers_in_memory():
    """A SOCKS4 endpoint as the proxy endpoint of another: the outer request
    travels inside the inner proxy's granted connection."""
    net = MemoryNetwork()
    inner = SOCKS4ClientEndpoint("192.0.2.50", 1080, net, reactor=net.clock)
    outer = SOCKS4ClientEndpoint("192.0.2.7", 80, inner, reactor=net.clock)
    result = results(outer.connect(Factory.forProtocol(Recorder)))
    net.flush()
    # The inner proxy connects to the "second proxy", here our own factory again.
    host, port, factory, _, _ = net.clock.tcpClients.pop()
    assert (host, port) == ("192.0.2.50", 1080)
    remote = factory.buildProtocol(None)
    second = net.server.buildProtocol(None)
    a, b = IPv4Address("TCP", "127.0.0.1", 50001), IPv4Address("TCP", host, port)
    net.pumps.append(iosim.connect(second, iosim.FakeTransport(second, True, b, a),
                                   remote, iosim.FakeTransport(remote, False, a, b),
                                   greet=False, clock=net.clock))
    net.flush()
    assert result == []
    assert net.complete_outbound() == ("192.0.2.7", 80)
    net.flush()
    [protocol] = result
    protocol.transport.write(b"deep")
    net.flush()
    assert protocol.data == b"DEEP"


# -- the endpoint string ------------------------------------------------------------


def test_the_endpoint_string_nests_the_proxy_endpoint():
    from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString

    clock = MemoryReactorClock()
    endpoint = clientFromString(
        clock, r"socks4:host=example.com:port=80:proxy=tcp\:127.0.0.1\:1080:user=alice"
    )
    assert isinstance(endpoint, SOCKS4ClientEndpoint)
    assert (endpoint.host, endpoint.port, endpoint.user) == ("example.com", 80, b"alice")
    assert isinstance(endpoint.proxyEndpoint, TCP4ClientEndpoint)
    positional = clientFromString(clock, r"socks4:192.0.2.1:25:proxy=tcp\:h\:1080:timeout=7")
    assert (positional.host, positional.port, positional.timeout) == ("192.0.2.1", 25, 7.0)


def test_the_endpoint_string_composes_with_tls_both_ways():
    from twisted.internet.endpoints import clientFromString, wrapClientTLS

    clock = MemoryReactorClock()
    # TLS to the destination, through the proxy.
    outer = clientFromString(
        clock, r"tls:example.com:443:endpoint=socks4\:example.com\:443\:proxy=tcp\\\:h\\\:1080"
    )
    inner = outer._wrappedEndpoint
    assert isinstance(inner, SOCKS4ClientEndpoint) and inner.host == "example.com"
    # TLS to the proxy.
    viatls = clientFromString(clock, r"socks4:example.com:80:proxy=tls\:proxy.example\:1443")
    assert type(viatls.proxyEndpoint) is type(wrapClientTLS(None, None))  # type: ignore


@pytest.mark.parametrize(
    "description",
    [r"socks4:host=h:port=80", r"socks4:host=h:port=x:proxy=tcp\:h\:1", "socks4:h:1:2:proxy=tcp\\:h\\:1",
     r"socks4:h:80:proxy=nonsense\:1", r"socks4:h:80:proxy=tcp\:h\:1:timeout=0"],
)
def test_a_bad_endpoint_string_is_a_value_error(description):
    from twisted.internet.endpoints import clientFromString

    with pytest.raises(ValueError):
        clientFromString(MemoryReactorClock(), description)


# -- the next hop, in memory ----------------------------------------------------------


def test_a_name_that_does_not_resolve_goes_to_the_next_hop_and_a_refusal_becomes_91():
    from twisted.logger import capturedLogs

    from socksident.nexthop import NextHop

    hop = MemoryNetwork()  # the next hop, which can resolve the name
    first = MemoryNetwork()
    first.server.next_hop = NextHop(hop, "tcp:hop:1080")
    result = results(SOCKS4ClientEndpoint("only.there.example", 80, first, b"alice",
                                          reactor=first.clock)
                     .connect(Factory.forProtocol(Recorder)))
    first.flush()
    first.resolver.answer()  # nothing here
    first.pumps.extend(hop.pumps)
    first.flush()
    assert hop.resolver.calls[-1][1] == "only.there.example"
    hop.resolver.answer("192.0.2.9")
    with capturedLogs() as events:
        assert hop.complete_outbound() == ("192.0.2.9", 80)
        first.pumps.extend(hop.pumps[len(first.pumps) - 1:])
        first.flush()
        [protocol] = result
        protocol.transport.write(b"far")
        first.flush()
        assert protocol.data == b"FAR"
        protocol.transport.loseConnection()
        first.flush()
    records = [e["access_record"] for e in events if "access_record" in e]
    outer = [r for r in records if r.next_hop]
    assert outer and outer[0].next_hop == "tcp:hop:1080" and outer[0].next_hop_reply == "90"
    assert outer[0].fields()["next_hop"] == "tcp:hop:1080"

    # The hop refuses with 93 (its view of us): our client gets 91.
    class Deny93:
        def check(self, request: Any, context: Any) -> Any:
            from socksident.policy import Decision

            return Decision(ReplyCode.IDENT_MISMATCH, "not you")

    hop = MemoryNetwork(Deny93())
    first = MemoryNetwork()
    first.server.next_hop = NextHop(hop, "tcp:hop:1080")
    result = results(SOCKS4ClientEndpoint("only.there.example", 80, first, reactor=first.clock)
                     .connect(Factory.forProtocol(Recorder)))
    first.flush()
    first.resolver.answer()
    first.pumps.extend(hop.pumps)
    first.flush()
    hop.resolver.answer("192.0.2.9")
    first.flush()
    [failure] = result
    assert failure.check(RequestRejectedOrFailed) and failure.value.code == 91
