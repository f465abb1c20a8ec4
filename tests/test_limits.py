"""`--max-connections` and `--max-per-host`, in memory: past a limit a new
client gets 91 naming the limit, everyone else is served, and the counts
fall back to zero when the connections end."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from socksident.livecounts import Admission, Admissions, LimitReached
from socksident.proxy import build_v1, build_v2
from socksident.server import ServerSettings, SOCKS4ServerFactory
from socksident.socks4 import Command, ReplyCode, build_reply, build_request
from socksident.state import State
from test_server import FakeIdent, FakeResolver, Transport

SERVER = ("127.0.0.1", 1080)
REQUEST = build_request(Command.CONNECT, 80, "192.0.2.7", "alice")


class Server:
    """One factory, many client connections."""

    def __init__(self, **limits: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = SOCKS4ServerFactory(
            settings=ServerSettings(**limits),
            reactor=self.reactor,
            resolver=FakeResolver(),
            ident_query=FakeIdent(),
        )

    def connect(self, host: str = "127.0.0.1", port: int = 40000, proxied: bool = False) -> Any:
        listener = self.factory.proxy_listener() if proxied else self.factory
        peer = ("10.0.0.2", 51000) if proxied else (host, port)
        proto = listener.buildProtocol(IPv4Address("TCP", *peer))
        transport = Transport(
            hostAddress=IPv4Address("TCP", *SERVER), peerAddress=IPv4Address("TCP", *peer)
        )
        proto.makeConnection(transport)
        return proto, transport

    @property
    def admitted(self) -> Admissions:
        return self.factory.live.admitted


def lost(proto: Any) -> None:
    proto.connectionLost(Failure(Exception("closed")))


def test_past_max_connections_a_new_client_gets_91_naming_the_limit(access_events):
    server = Server(max_connections=2)
    served = [server.connect(port=40000 + n) for n in range(2)]
    refused, transport = server.connect(port=40009)
    refused.dataReceived(REQUEST)
    assert transport.value() == build_reply(ReplyCode.REJECTED)
    assert transport.disconnecting
    assert len(server.reactor.tcpClients) == 0  # nothing was connected for it
    lost(refused)
    [event] = access_events
    assert event["reason"] == "connection limit 2 reached"
    assert event["code"] == ReplyCode.REJECTED
    assert event["refusal"] == "LimitReached"
    # The admitted ones are still served.
    for proto, _ in served:
        proto.dataReceived(REQUEST)
        assert proto.state is State.PENDING
    assert len(server.reactor.tcpClients) == 2


def test_past_max_per_host_only_that_host_is_refused(access_events):
    server = Server(max_per_host=1)
    server.connect("127.0.0.1", 40000)
    refused, transport = server.connect("127.0.0.1", 40001)
    other, _ = server.connect("127.0.0.2", 40002)
    refused.dataReceived(REQUEST)
    other.dataReceived(REQUEST)
    assert transport.value() == build_reply(ReplyCode.REJECTED)
    assert other.state is State.PENDING
    lost(refused)
    [event] = access_events
    assert event["reason"] == "per-host limit 1 reached for 127.0.0.1"
    assert event["client"] == "127.0.0.1:40001"


def test_a_refused_client_without_a_request_is_closed_at_the_request_timeout(access_events):
    server = Server(max_connections=1, request_timeout=5.0)
    server.connect(port=40000)
    refused, transport = server.connect(port=40001)
    server.reactor.advance(5.0)
    assert transport.disconnecting and transport.value() == b""
    lost(refused)
    [event] = [event for event in access_events if event["client"] == "127.0.0.1:40001"]
    assert event["reason"] == "connection limit 1 reached; no complete request within 5 s"
    assert event["code"] is None


def test_a_slot_frees_when_a_connection_ends():
    server = Server(max_connections=1)
    first, _ = server.connect(port=40000)
    lost(first)
    second, transport = server.connect(port=40001)
    second.dataReceived(REQUEST)
    assert second.state is State.PENDING and transport.value() == b""


def test_a_burst_and_its_end_leave_no_count_behind():
    server = Server(max_connections=10, max_per_host=4)
    connections = [
        server.connect(f"127.0.0.{1 + n % 5}", 40000 + n) for n in range(40)
    ]
    assert server.admitted.total == 10
    assert max(server.admitted.per_host.values()) <= 4
    # Every ending: a relay, a refusal, a client gone early, a timeout.
    relay_proto, _ = connections[0]
    relay_proto.dataReceived(REQUEST)
    host, port, factory, _, _ = server.reactor.tcpClients[0]
    remote_proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    remote = Transport(peerAddress=IPv4Address("TCP", host, port))
    remote_proto.makeConnection(remote)
    assert relay_proto.state is State.RELAY
    for proto, _ in connections[1:20]:
        proto.dataReceived(REQUEST)
    for proto, _ in connections[1:30]:
        lost(proto)
    server.reactor.advance(server.factory.settings.request_timeout)
    for proto, _ in connections[30:]:
        lost(proto)
    remote_proto.connectionLost(Failure(Exception("closed")))
    lost(relay_proto)
    assert relay_proto.state is State.CLOSED
    assert (server.admitted.total, server.admitted.per_host) == (0, {})
    assert server.factory.live.connections == 0


def test_behind_a_balancer_the_headers_client_is_counted(access_events):
    server = Server(max_per_host=1)
    first, _ = server.connect(proxied=True)
    first.dataReceived(build_v2(("10.9.9.9", 5000), ("198.51.100.1", 1080)))
    second, transport = server.connect(proxied=True)
    # Before its header the balancer's connection counts for nobody.
    assert server.admitted.per_host == {"10.9.9.9": 1}
    second.dataReceived(build_v1(("10.9.9.9", 5001), ("198.51.100.1", 1080)) + REQUEST)
    assert transport.value() == build_reply(ReplyCode.REJECTED)
    third, _ = server.connect(proxied=True)
    third.dataReceived(build_v1(("10.9.9.8", 5002), ("198.51.100.1", 1080)) + REQUEST)
    assert third.state is State.PENDING
    lost(second)
    [event] = access_events
    assert event["reason"] == "per-host limit 1 reached for 10.9.9.9"
    assert event["client"] == "10.9.9.9:5001"


def test_a_health_check_takes_no_slot_and_leaves_no_count():
    server = Server(max_connections=1)
    check, _ = server.connect(proxied=True)
    check.dataReceived(build_v2(local=True))
    lost(check)
    assert server.factory.live.connections == 0
    assert server.admitted.total == 0


def test_no_limits_by_default():
    server = Server()
    connections = [server.connect(port=40000 + n) for n in range(50)]
    for proto, _ in connections:
        proto.dataReceived(REQUEST)
        assert proto.state is State.PENDING


def test_admissions_refuse_at_the_limit_and_forget_empty_hosts():
    admissions = Admissions()
    assert admissions.admit("a", 0, 2) is None
    assert admissions.admit("a", 0, 2) is None
    refusal = admissions.admit("a", 0, 2)
    assert refusal is not None and refusal.code == ReplyCode.REJECTED
    assert admissions.admit("b", 3, 0) is None
    assert str(admissions.admit("c", 3, 0)) == "connection limit 3 reached"
    for host in ("a", "a", "b"):
        admissions.release(host)
    assert (admissions.total, admissions.per_host) == (0, {})


def test_an_admission_is_handed_back_once_however_often_it_is_released():
    admissions = Admissions()
    first = admissions.take("a", 0, 2)
    second = admissions.take("a", 0, 2)
    assert isinstance(first, Admission) and isinstance(second, Admission)
    assert isinstance(admissions.take("a", 0, 2), LimitReached)
    assert admissions.per_host == {"a": 2}  # a refusal holds no place
    first.release()
    first.release()
    assert (admissions.total, admissions.per_host) == (1, {"a": 1})
    second.release()
    assert (admissions.total, admissions.per_host) == (0, {})
