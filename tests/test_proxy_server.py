"""A listener behind a PROXY-protocol balancer, in memory: the header's client is the client."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from socksident.ident import IdentAnswer, IdentOutcome
from socksident.policy import IdentMode
from socksident.proxy import build_v1, build_v2
from socksident.server import ServerSettings
from socksident.socks4 import Command, ReplyCode, build_reply, build_request
from socksident.state import State
from test_server import FakeIdent, FakeResolver, Transport  # noqa: F401

from socksident.policy import DefaultPolicy
from socksident.server import SOCKS4ServerFactory
from twisted.internet.testing import MemoryReactorClock

BALANCER = ("10.0.0.2", 51000)  # a private address: the default policy would grant it
CLIENT = ("203.0.113.5", 40000)  # a public client: the default policy refuses it
FRONTEND = ("198.51.100.1", 1080)  # where the client connected (not this host's address)
REQUEST = build_request(Command.CONNECT, 80, "192.0.2.7", "alice")

HEADERS = {
    "v1": build_v1(CLIENT, FRONTEND),
    "v2": build_v2(CLIENT, FRONTEND),
}


class ProxyHarness:
    def __init__(
        self,
        settings: Optional[ServerSettings] = None,
        policy: Any = None,
        server: tuple[str, int] = ("10.0.0.1", 1080),
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver()
        self.ident = FakeIdent()
        self.factory = SOCKS4ServerFactory(
            policy, settings, reactor=self.reactor, resolver=self.resolver, ident_query=self.ident
        )
        listener = self.factory.proxy_listener()
        self.proto = listener.buildProtocol(IPv4Address("TCP", *BALANCER))
        self.client = Transport(
            hostAddress=IPv4Address("TCP", *server), peerAddress=IPv4Address("TCP", *BALANCER)
        )
        self.proto.makeConnection(self.client)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def lost(self) -> None:
        self.proto.connectionLost(Failure(Exception("closed")))


@pytest.mark.parametrize("version", list(HEADERS))
def test_the_policy_and_the_log_see_the_headers_client_not_the_balancer(version, access_events):
    h = ProxyHarness()
    assert h.proto.state is State.HEADER
    h.send(HEADERS[version] + REQUEST)
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.reactor.tcpClients == []
    h.lost()
    [event] = access_events
    assert event["client"] == "203.0.113.5:40000"
    assert event["listener"] == "198.51.100.1:1080"
    assert event["via"] == "10.0.0.2:51000"
    assert "not on loopback or a private network" in event["reason"]


@pytest.mark.parametrize("version", list(HEADERS))
def test_every_split_of_header_and_request(version, access_events):
    data = HEADERS[version] + REQUEST
    for cut in range(len(data) + 1):
        h = ProxyHarness()
        h.send(data[:cut])
        h.send(data[cut:])
        assert h.client.value() == build_reply(ReplyCode.REJECTED), cut
        assert h.proto.connection.client_host == CLIENT[0]
    assert len(access_events) == len(data) + 1


def test_a_private_client_behind_the_balancer_is_served_as_itself():
    h = ProxyHarness()
    h.send(build_v2(("10.9.9.9", 5000), FRONTEND) + REQUEST)
    assert h.proto.state is State.PENDING
    [(host, port, _, _, _)] = h.reactor.tcpClients
    assert (host, port) == ("192.0.2.7", 80)
    assert h.proto.connection.local_host == "10.0.0.1"  # the socket's own end stays


def test_an_ipv6_client_in_a_v1_header():
    h = ProxyHarness()
    h.send(build_v1(("2001:db8::5", 4), ("2001:db8::1", 1080)) + REQUEST)
    assert h.proto.connection.client == "2001:db8::5:4"
    assert h.client.value() == build_reply(ReplyCode.REJECTED)


@pytest.mark.parametrize(
    "first, reason",
    [
        (REQUEST, "no PROXY header"),
        (b"PROXY TCP4 203.0.113.5 nonsense 1 2\r\n" + REQUEST, "address"),
        (b"PROXY TCP4 " + b"9" * 120, "longer than 107"),
    ],
)
def test_a_missing_or_malformed_header_is_closed_unserved(first, reason, access_events):
    h = ProxyHarness()
    h.send(first)
    assert h.client.value() == b"" and h.client.disconnecting
    assert h.reactor.tcpClients == [] and h.ident.queries == []
    h.lost()
    [event] = access_events
    assert event["client"] == "10.0.0.2:51000" and event["via"] is None
    assert reason in event["reason"] and event["code"] is None


def test_a_slow_header_is_closed_at_the_request_timeout(access_events):
    h = ProxyHarness(ServerSettings(request_timeout=5))
    h.send(HEADERS["v1"][:10])
    h.reactor.advance(5)
    assert h.client.disconnecting and h.client.value() == b""
    h.lost()
    [event] = access_events
    assert event["reason"] == "no complete PROXY header within 5 s"


def test_a_client_leaving_inside_the_header_writes_one_record(access_events):
    h = ProxyHarness()
    h.send(HEADERS["v2"][:20])
    h.proto.readConnectionLost()
    h.lost()
    [event] = access_events
    assert event["reason"] == "closed before a complete PROXY header"


def test_a_v2_local_health_check_is_closed_quietly(access_events):
    h = ProxyHarness()
    with capturedLogs() as events:
        h.send(build_v2(local=True))
    assert h.client.disconnecting and h.client.value() == b""
    h.lost()
    assert access_events == []
    # only a debug line, naming the balancer
    [event] = [e for e in events if e.get("log_namespace") == "socksident.serverprotocol"]
    assert event["log_level"] is LogLevel.debug
    assert formatEvent(event) == "PROXY LOCAL connection from 10.0.0.2:51000: closed"


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", build_v2()],
    ids=["v1-unknown", "v2-unspec"],
)
def test_a_header_without_a_tcp_client_is_refused(header, access_events):
    h = ProxyHarness(policy=DefaultPolicy())
    h.send(header + build_request(Command.CONNECT, 80, "10.0.0.9", "alice"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.reactor.tcpClients == []
    h.lost()
    [event] = access_events
    assert "names no TCP client" in event["reason"]


def test_half_close_through_the_balancer():
    h = ProxyHarness()
    h.send(build_v1(("10.9.9.9", 5000), FRONTEND) + REQUEST + b"early")
    h.proto.readConnectionLost()  # the client's FIN before the reply
    host, port, factory, _, _ = h.reactor.tcpClients[0]
    remote_proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    remote = Transport(peerAddress=IPv4Address("TCP", host, port))
    remote_proto.makeConnection(remote)
    assert remote.value() == b"early" and remote.write_closed
    assert not h.client.disconnecting
    remote_proto.dataReceived(b"answer")
    assert h.client.value().endswith(b"answer")


# -- ident behind a balancer ---------------------------------------------------------


def test_ident_is_asked_from_the_frontend_address_when_this_host_has_it():
    h = ProxyHarness(policy=DefaultPolicy(IdentMode.REQUIRE))
    h.send(build_v2(("127.0.0.5", 33000), ("127.0.0.1", 1080)) + REQUEST)
    [(client_host, client_port, server_host, server_port, _)] = h.ident.queries
    assert (client_host, client_port) == ("127.0.0.5", 33000)
    assert (server_host, server_port) == ("127.0.0.1", 1080)
    h.ident.pending[0].callback(IdentAnswer(IdentOutcome.USER, user_id="alice"))
    assert len(h.reactor.tcpClients) == 1


def test_ident_cannot_be_asked_from_an_address_this_host_lacks(access_events):
    h = ProxyHarness(policy=DefaultPolicy(IdentMode.REQUIRE))
    with capturedLogs() as events:
        h.send(build_v2(("10.9.9.9", 33000), FRONTEND) + REQUEST)
    [line] = [formatEvent(e) for e in events if e.get("log_namespace") == "socksident.establish"]
    assert line.startswith(
        "ident for 10.9.9.9:33000: cannot ask from 198.51.100.1, the address the client"
        " connected to through the balancer: "
    )
    assert h.ident.queries == []
    assert h.client.value() == build_reply(ReplyCode.IDENTD_UNREACHABLE)
    h.lost()
    [event] = access_events
    assert "cannot ask from 198.51.100.1" in event["reason"]
    assert event["ident_outcome"] == "no-answer"


# -- BIND behind a balancer --------------------------------------------------------


def test_bind_behind_a_balancer_without_a_bind_address_is_refused(access_events):
    h = ProxyHarness(ServerSettings(bind_without_connect=True))
    h.send(build_v2(("10.9.9.9", 33000), FRONTEND) + build_request(Command.BIND, 21, "10.0.0.7"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.reactor.tcpServers == []
    h.lost()
    [event] = access_events
    assert event["reason"] == "BIND on a PROXY listener needs a bind address (--bind-address)"


def test_bind_behind_a_balancer_listens_on_the_bind_address():
    h = ProxyHarness(ServerSettings(bind_without_connect=True, bind_address="10.0.0.1"))
    h.send(build_v2(("10.9.9.9", 33000), FRONTEND) + build_request(Command.BIND, 21, "10.0.0.7"))
    [(port, _, _, interface)] = h.reactor.tcpServers
    assert interface == "10.0.0.1"
