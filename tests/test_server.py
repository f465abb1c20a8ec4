"""The server protocol in memory: MemoryReactorClock, StringTransport, no sockets."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident.ident import IdentAnswer, IdentOutcome
from socksident.policy import (
    Decision,
    DefaultPolicy,
    IdentMode,
    IEarlyRefusal,
    IPolicy,
    PolicyContext,
    Route,
)
from socksident.server import ServerSettings, SOCKS4ServerFactory
from socksident.state import TRANSITIONS, InvalidTransition, State
from socksident.socks4 import Command, IdentdMismatch, ReplyCode, build_reply, build_request


class Transport(StringTransport):
    """A StringTransport that also records a write-half shutdown."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class FakeResolver:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, int]] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, **kw: Any) -> Any:
        self.calls.append((receiver, hostName, portNumber))
        receiver.resolutionBegan(None)
        return None

    def answer(self, *hosts: str) -> None:
        receiver, _, port = self.calls[-1]
        for host in hosts:
            kind = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(kind("TCP", host, port))
        receiver.resolutionComplete()


class FakeIdent:
    def __init__(self) -> None:
        self.queries: list[tuple[Any, ...]] = []
        self.pending: list[Deferred[IdentAnswer]] = []
        self.cancelled: list[Deferred[IdentAnswer]] = []

    def __call__(self, client_host: str, client_port: int, server_host: str, server_port: int, **kw: Any) -> Deferred[IdentAnswer]:
        self.queries.append((client_host, client_port, server_host, server_port, kw))
        d: Deferred[IdentAnswer] = Deferred(self.cancelled.append)
        self.pending.append(d)
        return d




class Harness:
    def __init__(
        self,
        settings: Optional[ServerSettings] = None,
        policy: Any = None,
        client: tuple[str, int] = ("127.0.0.1", 40000),
        server: tuple[str, int] = ("127.0.0.1", 1080),
        start_at: float = 0.0,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(start_at)
        self.resolver = FakeResolver()
        self.ident = FakeIdent()
        self.factory = SOCKS4ServerFactory(
            policy, settings, reactor=self.reactor, resolver=self.resolver, ident_query=self.ident
        )
        self.proto = self.factory.buildProtocol(IPv4Address("TCP", *client))
        self.client = Transport(
            hostAddress=IPv4Address("TCP", *server), peerAddress=IPv4Address("TCP", *client)
        )
        self.proto.makeConnection(self.client)
        self.remote: Optional[Transport] = None
        self.remote_proto: Any = None

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def connect_outbound(self, index: int = -1) -> Transport:
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        kind = IPv6Address if ":" in host else IPv4Address
        self.remote_proto = factory.buildProtocol(kind("TCP", host, port))
        self.remote = Transport(peerAddress=kind("TCP", host, port))
        self.remote_proto.makeConnection(self.remote)
        return self.remote

    def refuse_outbound(self, index: int = -1) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(ConnectionRefusedError()))

    def relayed(self, data: bytes = b"CONNECT") -> Transport:
        """A granted CONNECT whose relay has carried `data` upstream; both sides cleared."""
        self.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
        remote = self.connect_outbound()
        assert self.client.value() == build_reply(ReplyCode.GRANTED, 80, "192.0.2.7")
        self.send(data)
        assert remote.value() == data
        self.client.clear()
        remote.clear()
        return remote


def test_connect_granted_only_after_the_outbound_connection(access_events):
    h = Harness()
    h.send(build_request(Command.CONNECT, 8080, "192.0.2.7", "alice") + b"early ")
    h.send(b"bytes")
    host, port, _, timeout, _ = h.reactor.tcpClients[0]
    # No timer of Twisted's: the request's one deadline covers the connect.
    assert (host, port, timeout) == ("192.0.2.7", 8080, None)
    assert h.client.value() == b""
    remote = h.connect_outbound()
    assert h.client.value() == build_reply(ReplyCode.GRANTED, 8080, "192.0.2.7")
    assert remote.value() == b"early bytes"
    # each transport pauses the other: the slow reader's buffer pauses the writer
    remote.producer.pauseProducing()
    h.client.producer.pauseProducing()
    assert (h.client.producerState, remote.producerState) == ("paused", "paused")
    remote.producer.resumeProducing()
    h.client.producer.resumeProducing()
    assert h.proto.state == "relay"
    assert access_events == []


def test_relay_moves_bytes_both_ways_and_logs_once(access_events):
    h = Harness()
    remote = h.relayed()
    h.send(b"ping")
    h.remote_proto.dataReceived(b"pong!")
    assert remote.value() == b"ping"
    assert h.client.value() == b"pong!"
    h.remote_proto.connectionLost(Failure(Exception("done")))
    assert h.client.disconnecting and h.client.producer is None
    h.proto.connectionLost(Failure(Exception("done")))
    [event] = access_events
    assert (event["code"], event["bytes_up"], event["bytes_down"]) == (90, len(b"CONNECT") + 4, 5)
    assert event["user"] == "alice" and event["command"] == "CONNECT"
    assert event["destination"] == "192.0.2.7" and event["port"] == 80
    assert h.factory.open_connects == {}


def test_client_close_closes_the_remote_after_flushing():
    h = Harness()
    remote = h.relayed()
    h.proto.connectionLost(Failure(Exception("gone")))
    assert remote.disconnecting and remote.producer is None


def test_half_close_from_client_keeps_the_other_direction():
    h = Harness()
    remote = h.relayed()
    h.send(b"request")
    h.proto.readConnectionLost()
    assert remote.write_closed and remote.producer is None
    assert not remote.disconnecting and not h.client.disconnecting
    h.remote_proto.dataReceived(b"answer")
    assert h.client.value() == b"answer"
    h.remote_proto.readConnectionLost()
    assert h.client.disconnecting and remote.disconnecting


def test_half_close_from_remote():
    h = Harness()
    remote = h.relayed()
    h.remote_proto.readConnectionLost()
    assert h.client.write_closed and not h.client.disconnecting
    h.send(b"still flowing")
    assert remote.value() == b"still flowing"


def test_client_fin_before_the_reply_is_passed_on_after_early_data():
    h = Harness()
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice") + b"all of it")
    h.proto.readConnectionLost()
    assert not h.client.disconnecting
    remote = h.connect_outbound()
    assert remote.value() == b"all of it" and remote.write_closed


def test_connect_refused_gets_91(access_events):
    h = Harness()
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    h.refuse_outbound()
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.client.disconnecting
    [event] = access_events
    assert event["code"] == 91 and "refused" in event["reason"]


def test_connect_time_limit_gets_91_and_stops_connecting(access_events):
    h = Harness(ServerSettings(connect_timeout=120))
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    h.reactor.advance(119.9)
    assert h.client.value() == b""
    h.reactor.advance(0.1)
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.client.disconnecting
    assert h.reactor.connectors[0].stoppedConnecting
    assert access_events[0]["reason"] == "no connection established within 120 s"
    assert h.reactor.getDelayedCalls() == []


def test_half_a_request_is_closed_after_the_request_timeout():
    h = Harness(ServerSettings(request_timeout=30))
    h.send(b"\x04\x01\x00")
    h.reactor.advance(29)
    assert not h.client.disconnecting
    h.reactor.advance(1)
    assert h.client.disconnecting and h.client.value() == b""
    assert h.reactor.getDelayedCalls() == []


def test_client_gone_while_connecting_cancels_the_connect(access_events):
    h = Harness()
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    h.proto.connectionLost(Failure(Exception("gone")))
    assert h.reactor.connectors[0].stoppedConnecting
    assert h.client.value() == b""
    assert access_events[0]["reason"] == "client closed the connection first"
    assert h.reactor.getDelayedCalls() == []


@pytest.mark.parametrize(
    "data",
    [bytes([4, 9, 0, 80, 1, 2, 3, 4]), bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"x" * 300],
)
def test_bad_requests_get_91(data, access_events):
    h = Harness()
    h.send(data)
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.client.disconnecting
    assert access_events[0]["code"] == 91
    assert h.reactor.tcpClients == []


def test_socks5_greeting_gets_no_acceptable_methods():
    h = Harness()
    h.send(b"\x05\x01\x00")
    assert h.client.value() == b"\x05\xff" and h.client.disconnecting


def test_http_request_gets_a_plain_400():
    h = Harness()
    h.send(b"GET http://example.com/ HTTP/1.1\r\n")
    assert h.client.value().startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert b"SOCKS4" in h.client.value() and h.client.disconnecting


def test_other_versions_are_closed_silently():
    h = Harness()
    h.send(b"\x16\x03\x01")
    assert h.client.value() == b"" and h.client.disconnecting


def test_socks4a_resolves_then_tries_each_address(access_events):
    h = Harness()
    h.send(build_request(Command.CONNECT, 443, "", "bob", hostname="www.example.com"))
    assert h.resolver.calls[0][1:] == ("www.example.com", 443)
    h.resolver.answer("2001:db8::1", "192.0.2.9")
    assert h.reactor.tcpClients[0][:2] == ("2001:db8::1", 443)
    h.refuse_outbound(0)
    assert h.reactor.tcpClients[1][:2] == ("192.0.2.9", 443)
    h.connect_outbound(1)
    assert h.client.value() == build_reply(ReplyCode.GRANTED, 443, "192.0.2.9")
    h.proto.connectionLost(Failure(Exception()))
    h.remote_proto.connectionLost(Failure(Exception()))
    assert access_events[0]["address"] == "192.0.2.9"
    assert "www.example.com:443 [192.0.2.9]" in access_events[0]["log_format"].format(**access_events[0])


def test_socks4a_name_that_does_not_resolve_gets_91(access_events):
    h = Harness()
    h.send(build_request(Command.CONNECT, 80, "", "bob", hostname="nowhere.invalid"))
    h.resolver.answer()
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert "does not resolve" in access_events[0]["reason"]


def test_default_policy_refuses_public_clients_without_connecting(access_events):
    h = Harness(client=("203.0.113.5", 5000), server=("198.51.100.1", 1080))
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.reactor.tcpClients == []
    assert "not on loopback or a private network" in access_events[0]["reason"]


def test_default_policy_keeps_private_clients_off_our_loopback():
    h = Harness(client=("192.168.1.20", 5000), server=("192.168.1.1", 1080))
    h.send(build_request(Command.CONNECT, 22, "127.0.0.1", "alice"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    h = Harness(client=("192.168.1.20", 5000), server=("192.168.1.1", 1080))
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert h.reactor.tcpClients[0][:2] == ("192.0.2.7", 80)


def test_idle_timeout_closes_a_silent_relay(access_events):
    h = Harness(ServerSettings(idle_timeout=10))
    remote = h.relayed()
    h.reactor.advance(9)
    h.send(b"x")
    h.reactor.advance(9)
    assert not h.client.disconnecting
    h.reactor.advance(1)
    assert h.client.disconnecting and remote.disconnecting
    h.proto.connectionLost(Failure(Exception()))
    h.remote_proto.connectionLost(Failure(Exception()))
    assert access_events[0]["reason"] == "idle for 10 s"


def test_early_data_past_the_limit_pauses_the_client():
    h = Harness(ServerSettings(early_data_limit=10))
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice") + b"123456789")
    assert h.client.producerState == "producing"
    h.send(b"0")
    assert h.client.producerState == "paused"
    remote = h.connect_outbound()
    assert remote.value() == b"1234567890"
    assert h.client.producerState == "producing"


# -- ident through the default policy ---------------------------------------


def ident_harness(mode: IdentMode) -> Harness:
    h = Harness(ServerSettings(ident_port=1113, ident_timeout=15), DefaultPolicy(mode))
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    return h


def test_ident_query_names_both_ports_before_any_connect():
    h = ident_harness(IdentMode.REQUIRE)
    [(client_host, client_port, server_host, server_port, kw)] = h.ident.queries
    assert (client_host, client_port, server_host, server_port) == ("127.0.0.1", 40000, "127.0.0.1", 1080)
    assert kw["ident_port"] == 1113 and kw["timeout"] == 15
    assert h.reactor.tcpClients == []


def test_ident_confirms_and_the_connect_goes_ahead(access_events):
    h = ident_harness(IdentMode.REQUIRE)
    h.ident.pending[0].callback(IdentAnswer(IdentOutcome.USER, "alice", "UNIX", duration=0.25))
    h.connect_outbound()
    assert h.client.value() == build_reply(ReplyCode.GRANTED, 80, "192.0.2.7")
    h.proto.connectionLost(Failure(Exception()))
    h.remote_proto.connectionLost(Failure(Exception()))
    event = access_events[0]
    assert (event["ident_outcome"], event["ident_user"], event["ident_opsys"]) == ("user", "alice", "UNIX")
    assert event["ident_duration"] == 0.25


@pytest.mark.parametrize("mode", [IdentMode.REQUIRE, IdentMode.CHECK])
def test_ident_mismatch_is_93_in_both_modes(mode):
    h = ident_harness(mode)
    h.ident.pending[0].callback(IdentAnswer(IdentOutcome.USER, "root", "UNIX"))
    assert h.client.value() == build_reply(ReplyCode.IDENT_MISMATCH)
    assert h.reactor.tcpClients == []


def test_no_ident_answer_is_92_when_required(access_events):
    h = ident_harness(IdentMode.REQUIRE)
    h.ident.pending[0].callback(IdentAnswer(IdentOutcome.NO_ANSWER, error="connection refused"))
    assert h.client.value() == build_reply(ReplyCode.IDENTD_UNREACHABLE)
    assert "connection refused" in access_events[0]["reason"]


def test_no_ident_answer_goes_through_when_checking(access_events):
    h = ident_harness(IdentMode.CHECK)
    h.ident.pending[0].callback(IdentAnswer(IdentOutcome.ERROR, error="HIDDEN-USER"))
    h.connect_outbound()
    assert h.client.value()[:2] == b"\x00\x5a"
    h.proto.connectionLost(Failure(Exception()))
    h.remote_proto.connectionLost(Failure(Exception()))
    assert "unverified" in access_events[0]["reason"]


def test_refused_requests_ask_no_identd():
    h = Harness(
        client=("203.0.113.5", 5000), policy=DefaultPolicy(IdentMode.REQUIRE)
    )
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.ident.queries == []


def test_client_gone_during_ident_cancels_the_query():
    h = ident_harness(IdentMode.REQUIRE)
    h.proto.connectionLost(Failure(Exception()))
    assert h.ident.cancelled == h.ident.pending
    assert h.reactor.tcpClients == []


# -- policies written by embedders -------------------------------------------


@implementer(IPolicy)
class RecordingPolicy:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.seen: list[tuple[Any, PolicyContext]] = []

    def check(self, request: Any, context: PolicyContext) -> Any:
        self.seen.append((request, context))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_a_policy_may_answer_later_with_a_deferred(access_events):
    later: Deferred[Decision] = Deferred()
    policy = RecordingPolicy(later)
    h = Harness(policy=policy)
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    [(request, context)] = policy.seen
    assert (context.client_host, context.server_port, context.addresses) == ("127.0.0.1", 1080, ("192.0.2.7",))
    assert h.reactor.tcpClients == []
    later.callback(Decision(ReplyCode.REJECTED, "not on Sundays", rule="embedder"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert (access_events[0]["reason"], access_events[0]["rule"]) == ("not on Sundays", "embedder")


def test_a_policy_that_raises_gets_91_and_the_server_goes_on(access_events):
    h = Harness(policy=RecordingPolicy(RuntimeError("bug in policy")))
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert "internal error" in access_events[0]["reason"]
    h2 = Harness(policy=RecordingPolicy(succeed(Decision(ReplyCode.GRANTED, "ok"))))
    h2.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert h2.reactor.tcpClients


def test_ipv4_mapped_clients_are_seen_as_ipv4():
    reactor = MemoryReactorClock()
    policy = RecordingPolicy(Decision(ReplyCode.REJECTED, "no"))
    factory = SOCKS4ServerFactory(policy, reactor=reactor)
    proto = factory.buildProtocol(None)
    proto.makeConnection(
        StringTransport(
            hostAddress=IPv6Address("TCP", "::ffff:127.0.0.1", 1080),
            peerAddress=IPv6Address("TCP", "::ffff:10.1.2.3", 5555),
        )
    )
    proto.dataReceived(build_request(Command.CONNECT, 80, "192.0.2.7", "u"))
    assert policy.seen[0][1].client_host == "10.1.2.3"


# -- refusals that come before the policy --------------------------------------


def test_a_name_that_does_not_resolve_asks_no_policy_and_no_identd(access_events):
    policy = RecordingPolicy(Decision(ReplyCode.GRANTED, "anything goes"))
    h = Harness(policy=policy)
    h.send(build_request(Command.CONNECT, 80, "", "bob", hostname="nowhere.invalid"))
    h.resolver.answer()
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert policy.seen == [] and h.ident.queries == []


@pytest.mark.parametrize("resolved", [("0.0.0.0",), ("192.0.2.1", "::")])
def test_the_unspecified_address_is_never_a_destination(resolved, access_events):
    policy = RecordingPolicy(Decision(ReplyCode.GRANTED, "anything goes"))
    h = Harness(policy=policy)
    h.send(build_request(Command.CONNECT, 80, "", "bob", hostname="zero.example"))
    h.resolver.answer(*resolved)
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert "unspecified" in access_events[0]["reason"]
    h = Harness(policy=policy)
    h.send(build_request(Command.CONNECT, 22, "0.0.0.0", "bob"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert policy.seen == [] and h.reactor.tcpClients == []


@implementer(IPolicy)
class TwoAskers:
    """Asks identd twice, then gives up on the first question."""

    def check(self, request: Any, context: PolicyContext) -> Any:
        first, second = context.ident(), context.ident()
        first.addErrback(lambda failure: None)
        first.cancel()
        return second.addCallback(
            lambda answer: Decision(ReplyCode.GRANTED, f"second asker got {answer.user_id}")
        )


def test_one_ident_asker_giving_up_leaves_the_query_to_the_other():
    h = Harness(policy=TwoAskers())
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    [query] = h.ident.pending
    assert not query.called
    query.callback(IdentAnswer(IdentOutcome.USER, "alice", "UNIX"))
    assert h.reactor.tcpClients[0][:2] == ("192.0.2.7", 80)
    assert h.proto.ident_answer.user_id == "alice"


def test_the_ident_answer_is_logged_even_when_the_policy_does_not_return_it(access_events):
    @implementer(IPolicy)
    class AsksButForgets:
        def check(self, request: Any, context: PolicyContext) -> Any:
            return context.ident().addCallback(lambda _: Decision(ReplyCode.REJECTED, "no"))

    h = Harness(policy=AsksButForgets())
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    h.ident.pending[0].callback(IdentAnswer(IdentOutcome.USER, "alice", "UNIX"))
    assert access_events[0]["ident_user"] == "alice"


@pytest.mark.parametrize("gone", ["client", "remote"])
def test_the_record_waits_for_the_pair_and_names_the_side_cut_off(access_events, gone):
    """A side whose peer is gone gets the linger time, then is aborted; the
    record is written when both are gone and says which one was cut off."""
    h = Harness(ServerSettings(linger_timeout=3))
    remote = h.relayed(b"")
    h.send(b"up")
    protos = {"client": h.proto, "remote": h.remote_proto}
    transports = {"client": h.client, "remote": remote}
    other = "remote" if gone == "client" else "client"
    protos[gone].connectionLost(Failure(Exception("reset")))
    assert transports[other].disconnecting and not transports[other].disconnected
    h.reactor.advance(2.9)
    assert not transports[other].disconnected and access_events == []
    h.reactor.advance(0.1)
    assert transports[other].disconnected  # aborted
    protos[other].connectionLost(Failure(Exception("aborted")))
    [event] = access_events
    assert (event["cut_off"], event["dropped"], event["bytes_up"]) == (other, 0, 2)
    assert event["code"] == 90
    assert f"cut-off={other} dropped=0" in event["log_format"].format(**event)


def test_idle_timeout_aborts_even_when_a_peer_does_not_read(access_events):
    h = Harness(ServerSettings(idle_timeout=5))
    remote = h.relayed()
    aborted = []
    remote.abortConnection = lambda: aborted.append("remote")  # type: ignore[method-assign]
    h.client.abortConnection = lambda: aborted.append("client")  # type: ignore[method-assign]
    h.reactor.advance(5)
    assert sorted(aborted) == ["client", "remote"]


def test_a_refused_client_makes_the_proxy_resolve_nothing(access_events):
    h = Harness(client=("203.0.113.5", 5000), server=("198.51.100.1", 1080))
    h.send(build_request(Command.CONNECT, 80, "", "bob", hostname="slow.example"))
    assert h.resolver.calls == []
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert "not on loopback or a private network" in access_events[0]["reason"]


def test_a_permitted_client_still_resolves():
    h = Harness(client=("10.0.0.5", 5000), server=("10.0.0.1", 1080))
    h.send(build_request(Command.CONNECT, 80, "", "bob", hostname="www.example"))
    assert h.resolver.calls[0][1] == "www.example"


def test_a_name_cannot_bring_our_loopback_in_beside_a_public_address():
    h = Harness(client=("192.168.1.20", 5000), server=("192.168.1.1", 1080))
    h.send(build_request(Command.CONNECT, 22, "", "bob", hostname="sneaky.example"))
    h.resolver.answer("192.0.2.9", "127.0.0.1")
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.reactor.tcpClients == []


def test_a_request_that_does_not_parse_is_logged_without_empty_fields(access_events):
    h = Harness()
    h.send(bytes([4, 3, 0, 80, 1, 2, 3, 4]))
    [event] = access_events
    text = event["log_format"].format(**event)
    assert text.startswith("127.0.0.1:40000 (no valid request) -> 91 (unknown command code 3)")
    assert "None" not in text


def test_a_failing_ident_query_is_an_internal_error_at_once(access_events):
    h = ident_harness(IdentMode.REQUIRE)
    h.ident.pending[0].errback(RuntimeError("ident client bug"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert "internal error" in access_events[0]["reason"]
    assert h.reactor.getDelayedCalls() == []


# -- the state machine -----------------------------------------------------------


def test_the_transition_table():
    assert TRANSITIONS == {
        State.HEADER: {State.REQUEST, State.CLOSED},
        State.REQUEST: {State.PENDING, State.CLOSED},
        State.PENDING: {State.BIND_WAIT, State.RELAY, State.CLOSED},
        State.BIND_WAIT: {State.RELAY, State.CLOSED},
        State.RELAY: {State.CLOSED},
        State.CLOSED: set(),
    }


def test_a_move_outside_the_table_is_refused():
    h = Harness()
    with pytest.raises(InvalidTransition, match="REQUEST -> RELAY"):
        h.proto._enter(State.RELAY)
    assert h.proto.state is State.REQUEST
    h.relayed()
    with pytest.raises(InvalidTransition):
        h.proto._enter(State.PENDING)


def test_states_along_a_granted_connect():
    h = Harness()
    assert h.proto.state is State.REQUEST
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert h.proto.state is State.PENDING
    h.connect_outbound()
    assert h.proto.state is State.RELAY
    h.remote_proto.connectionLost(Failure(Exception("done")))
    h.proto.connectionLost(Failure(Exception("done")))
    assert h.proto.state is State.CLOSED


# -- every ending writes exactly one record ---------------------------------------


def test_a_request_timeout_writes_one_record(access_events):
    h = Harness()
    h.send(b"\x04\x01\x00")
    h.reactor.advance(30)
    assert h.client.disconnecting and h.client.value() == b""
    h.proto.connectionLost(Failure(Exception("closed")))
    [event] = access_events
    assert event["reason"] == "no complete request within 30 s"
    assert event["code"] is None and event["replies"] == [] and event["command"] is None


@pytest.mark.parametrize(
    "first, reason",
    [
        (b"\x05\x01\x00", "sent a SOCKS5 greeting"),
        (b"GET / HTTP/1.0\r\n", "sent what looks like HTTP"),
        (b"\x16\x03\x01", "sent not SOCKS4"),
    ],
)
def test_a_peer_that_is_not_socks4_writes_one_record(first, reason, access_events):
    h = Harness()
    h.send(first)
    h.proto.connectionLost(Failure(Exception("closed")))
    [event] = access_events
    assert event["reason"].startswith(reason)
    assert event["code"] is None and event["replies"] == []


def test_a_client_leaving_before_its_request_writes_one_record(access_events):
    h = Harness()
    h.send(b"\x04\x01")
    h.proto.connectionLost(Failure(Exception("gone")))
    h.reactor.advance(60)
    [event] = access_events
    assert event["reason"] == "client closed the connection before a complete request"
    assert h.reactor.getDelayedCalls() == []


def test_a_malformed_request_writes_one_record(access_events):
    h = Harness()
    h.send(bytes([4, 9]))
    h.proto.connectionLost(Failure(Exception("closed")))
    h.reactor.advance(60)
    [event] = access_events
    assert event["code"] == 91 and event["refusal"] == "UnknownCommand"


# -- the policy's on_granted: after the 90, never before ---------------------------


@implementer(IPolicy)
class GrantWithCallback:
    def __init__(self, client: Optional[Transport] = None) -> None:
        self.calls: list[bytes] = []
        self.client = client

    def check(self, request: Any, context: PolicyContext) -> Decision:
        def granted() -> None:
            self.calls.append(self.client.value() if self.client is not None else b"")

        return Decision(ReplyCode.GRANTED, "ok", on_granted=granted)


def test_on_granted_runs_once_the_client_has_its_90():
    policy = GrantWithCallback()
    h = Harness(policy=policy)
    policy.client = h.client
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert policy.calls == []
    h.connect_outbound()
    assert policy.calls == [build_reply(ReplyCode.GRANTED, 80, "192.0.2.7")]


def test_on_granted_does_not_run_when_the_connect_fails(access_events):
    policy = GrantWithCallback()
    h = Harness(policy=policy)
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    h.refuse_outbound()
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert policy.calls == []


# -- a bug is not a connect failure ---------------------------------------------------


class BrokenConnectReactor(MemoryReactorClock):
    def connectTCP(self, *args: Any, **kw: Any) -> Any:
        raise TypeError("a programming error")


def test_a_programming_error_while_connecting_is_an_internal_error(access_events):
    h = Harness()
    h.reactor = BrokenConnectReactor()
    factory = SOCKS4ServerFactory(reactor=h.reactor, resolver=h.resolver, ident_query=h.ident)
    proto = factory.buildProtocol(None)
    client = Transport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 1080),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    proto.makeConnection(client)
    with capturedLogs() as events:
        proto.dataReceived(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert client.value() == build_reply(ReplyCode.REJECTED)
    [failure] = [e["log_failure"] for e in events if "log_failure" in e]
    assert failure.check(TypeError)
    assert access_events[0]["reason"].startswith("internal error: TypeError")


# -- the reply address, the ident query's reactor, resolved duplicates -------------------


def test_a_destination_reached_over_ipv6_is_announced_as_0_0_0_0(access_events):
    h = Harness()
    h.send(build_request(Command.CONNECT, 443, "", "bob", hostname="v6.example"))
    h.resolver.answer("2001:db8::7")
    h.connect_outbound()
    assert h.client.value() == build_reply(ReplyCode.GRANTED, 443, "0.0.0.0")


def test_the_ident_query_runs_on_the_servers_reactor():
    h = ident_harness(IdentMode.REQUIRE)
    [(*_, kw)] = h.ident.queries
    assert kw["reactor"] is h.reactor


def test_an_address_resolved_twice_is_tried_once(access_events):
    h = Harness()
    h.send(build_request(Command.CONNECT, 443, "", "bob", hostname="www.example.com"))
    h.resolver.answer("192.0.2.9", "2001:db8::1", "192.0.2.9", "2001:db8::1")
    h.refuse_outbound(0)
    h.refuse_outbound(1)
    assert [c[:2] for c in h.reactor.tcpClients] == [("192.0.2.9", 443), ("2001:db8::1", 443)]
    assert h.client.value() == build_reply(ReplyCode.REJECTED)


# -- what the record and the gauges read of a connection -----------------------------------


def test_the_record_times_the_connection_and_its_grant(access_events):
    h = Harness(start_at=100.0)
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    h.reactor.advance(2)
    h.connect_outbound()
    h.reactor.advance(3)
    h.remote_proto.connectionLost(Failure(Exception("done")))
    h.proto.connectionLost(Failure(Exception("done")))
    [event] = access_events
    assert (event["time"], event["time_to_grant"], event["duration"]) == (100.0, 2.0, 5.0)
    assert event["refusal"] is None and event["code"] == 90


def test_a_refused_request_has_no_time_to_grant(access_events):
    h = Harness(policy=RecordingPolicy(Decision(ReplyCode.REJECTED, "not you")), start_at=10.0)
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    h.proto.connectionLost(Failure(Exception("done")))
    [event] = access_events
    assert event["time_to_grant"] is None and event["refusal"] == "RequestRejectedOrFailed"


def test_the_relay_gauge_counts_a_relay_while_it_runs():
    h = Harness()
    changes: list[tuple[str, int]] = []
    h.factory.live.watchers.append(lambda what, delta: changes.append((what, delta)))
    h.relayed()
    assert h.factory.live.relays == 1 and changes == [("relays", 1)]
    h.remote_proto.connectionLost(Failure(Exception("done")))
    h.proto.connectionLost(Failure(Exception("done")))
    assert h.factory.live.relays == 0
    assert changes == [("relays", 1), ("relays", -1), ("connections", -1)]


@pytest.mark.parametrize(
    "why_granted, reason",
    [
        ("loopback", "loopback; cut off: the server is stopping"),
        ("", "the server is stopping"),  # a policy that gives no reason
    ],
)
def test_a_relay_cut_off_by_the_server_says_why(why_granted, reason, access_events):
    h = Harness(policy=RecordingPolicy(Decision(ReplyCode.GRANTED, why_granted)))
    h.relayed()
    h.proto.cut_off("the server is stopping")
    assert h.client.disconnected
    h.proto.connectionLost(Failure(Exception("aborted")))
    h.remote_proto.connectionLost(Failure(Exception("closed")))
    [event] = access_events
    assert event["reason"] == reason


class OrderedTransport(Transport):
    """Records the order of the writes and the producer registrations."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.order: list[str] = []

    def write(self, data: bytes) -> None:
        self.order.append("write")
        super().write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.order.append("registerProducer")
        super().registerProducer(producer, streaming)


def test_early_data_reaches_the_destination_before_the_transports_are_paired():
    """So a full buffer cannot pause the client before the server resumes it."""
    h = Harness()
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice") + b"early")
    host, port, factory, _, _ = h.reactor.tcpClients[-1]
    remote_proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    remote = OrderedTransport(peerAddress=IPv4Address("TCP", host, port))
    remote_proto.makeConnection(remote)
    assert remote.value() == b"early"
    assert remote.order == ["write", "registerProducer"]


@pytest.mark.parametrize(
    "settings, user, host",
    [
        (ServerSettings(max_user_id_length=5), "abcdef", None),
        (ServerSettings(max_hostname_length=8), "alice", "example.com"),
    ],
)
def test_the_request_limits_come_from_the_settings(settings, user, host, access_events):
    h = Harness(settings)
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", user, hostname=host))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.reactor.tcpClients == [] and h.resolver.calls == []
    within = Harness(settings)
    within.send(build_request(Command.CONNECT, 80, "192.0.2.7", user[:5], hostname=host and "a.b"))
    assert within.client.value() == b""  # parsed, and on its way


@implementer(IPolicy)
class AnswersItsCancellation:
    """A policy still deciding when the time runs out; it answers the cancel itself."""

    def check(self, request: Any, context: PolicyContext) -> Deferred[Decision]:
        return Deferred(lambda d: d.errback(IdentdMismatch("the answer came as we gave up")))


def test_a_step_that_answers_its_cancellation_is_replied_as_it_answered(access_events):
    h = Harness(ServerSettings(connect_timeout=10), AnswersItsCancellation())
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    h.reactor.advance(10)
    assert h.client.value() == build_reply(ReplyCode.IDENT_MISMATCH)
    assert access_events[0]["reason"] == "the answer came as we gave up"


class FailingWrites(Transport):
    def write(self, data: bytes) -> None:
        raise RuntimeError("a programming error in the relay")


def test_a_programming_error_in_the_relay_aborts_and_is_logged_with_the_client(access_events):
    h = Harness()
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice") + b"early")
    host, port, factory, _, _ = h.reactor.tcpClients[-1]
    remote_proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    with capturedLogs() as events:
        remote_proto.makeConnection(FailingWrites(peerAddress=IPv4Address("TCP", host, port)))
    [event] = [e for e in events if "log_failure" in e]
    assert event["log_failure"].check(RuntimeError)
    assert event["log_format"] == "unexpected error serving {client}"
    assert event["client"] == "127.0.0.1:40000"
    assert h.proto.state is State.RELAY and h.client.disconnected  # aborted
    assert h.client.value() == build_reply(ReplyCode.GRANTED, 80, "192.0.2.7")  # no 91 after


def test_a_bind_client_that_half_closes_while_pending_is_closed():
    h = Harness(ServerSettings(bind_without_connect=True))
    h.send(build_request(Command.BIND, 80, "0.0.0.1", "alice", hostname="app.example"))
    assert h.proto.state is State.PENDING
    h.proto.readConnectionLost()
    assert h.client.disconnecting


# -- the establishment's less travelled paths ----------------------------------------------


def test_a_connect_to_an_address_leaves_from_the_source_address(access_events):
    h = Harness(ServerSettings(source_addresses=("127.0.0.9",), connect_timeout=30))
    h.send(build_request(Command.CONNECT, 8080, "192.0.2.7", "alice") + b"early")
    [(host, port, _, timeout, bind)] = h.reactor.tcpClients
    # No timer on the attempt itself: the race's deadline (and the server's) stop it.
    assert (host, port, timeout, bind) == ("192.0.2.7", 8080, None, ("127.0.0.9", 0))
    remote = h.connect_outbound()
    assert h.client.value() == build_reply(ReplyCode.GRANTED, 8080, "192.0.2.7")
    assert remote.value() == b"early"
    h.send(b" and more")
    assert remote.value() == b"early and more"
    h.remote_proto.connectionLost(Failure(Exception("done")))
    h.proto.connectionLost(Failure(Exception("done")))
    [event] = access_events
    assert event["address"] == "192.0.2.7" and event["code"] == 90
    assert event["next_hop"] is None and event["next_hop_reply"] is None


def test_a_source_address_race_keeps_its_own_time_limit():
    h = Harness(ServerSettings(source_addresses=("127.0.0.9",), connect_timeout=30))
    h.send(build_request(Command.CONNECT, 8080, "192.0.2.7", "alice"))
    assert [call.getTime() for call in h.reactor.getDelayedCalls()].count(30.0) == 2
    h.reactor.advance(30)
    assert h.client.value() == build_reply(ReplyCode.REJECTED)


def test_the_next_address_is_tried_after_the_configured_delay():
    h = Harness(ServerSettings(connect_attempt_delay=2.0))
    h.send(build_request(Command.CONNECT, 80, "0.0.0.1", "alice", hostname="two.example"))
    h.resolver.answer("192.0.2.7", "192.0.2.8")
    assert [c[0] for c in h.reactor.tcpClients] == ["192.0.2.7"]
    h.reactor.advance(1.9)
    assert len(h.reactor.tcpClients) == 1
    h.reactor.advance(0.1)
    assert [c[0] for c in h.reactor.tcpClients] == ["192.0.2.7", "192.0.2.8"]


def test_the_policy_sees_the_request_and_every_part_of_the_connection():
    policy = RecordingPolicy(Decision(ReplyCode.REJECTED, "no"))
    h = Harness(policy=policy, client=("10.1.2.3", 40001), server=("10.0.0.1", 1081))
    request = build_request(Command.CONNECT, 80, "0.0.0.1", "alice", hostname="one.example")
    h.send(request)
    h.resolver.answer("192.0.2.7")
    [(seen, context)] = policy.seen
    assert seen is h.proto.request and seen.hostname == "one.example"
    assert (context.client_host, context.client_port) == ("10.1.2.3", 40001)
    assert (context.server_host, context.server_port) == ("10.0.0.1", 1081)
    assert context.addresses == ("192.0.2.7",)


@implementer(IPolicy, IEarlyRefusal)
class EarlyRecording(RecordingPolicy):
    def __init__(self, early: Optional[Decision]) -> None:
        super().__init__(Decision(ReplyCode.GRANTED, "late"))
        self.early = early
        self.early_seen: list[tuple[Any, PolicyContext]] = []

    def refuse_early(self, request: Any, context: PolicyContext) -> Optional[Decision]:
        self.early_seen.append((request, context))
        return self.early


def test_an_early_refusal_sees_the_request_and_no_addresses_yet():
    policy = EarlyRecording(Decision(ReplyCode.REJECTED, "not that name"))
    h = Harness(policy=policy)
    h.send(build_request(Command.CONNECT, 80, "0.0.0.1", "alice", hostname="bad.example"))
    [(seen, context)] = policy.early_seen
    assert seen is h.proto.request and context.addresses == ()
    assert h.resolver.calls == [] and h.client.value() == build_reply(ReplyCode.REJECTED)


def test_a_bind_without_an_open_connect_names_the_addresses(access_events):
    h = Harness()
    h.send(build_request(Command.BIND, 21, "0.0.0.1", "alice", hostname="app.example"))
    h.resolver.answer("192.0.2.7", "192.0.2.8")
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    h.proto.connectionLost(Failure(Exception("done")))
    assert access_events[0]["reason"] == (
        "BIND without an open CONNECT from this client to 192.0.2.7, 192.0.2.8"
        " (see --bind-without-connect)"
    )


def test_a_failing_on_granted_is_logged_with_the_client():
    class Failing:
        def check(self, request: Any, context: PolicyContext) -> Decision:
            return Decision(ReplyCode.GRANTED, "ok", on_granted=self.fail)

        def fail(self) -> None:
            raise OSError("no such command")

    h = Harness(policy=Failing())
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    with capturedLogs() as events:
        h.connect_outbound()
    [event] = [e for e in events if "log_failure" in e]
    assert event["log_failure"].check(OSError)
    assert formatEvent(event) == "the policy's on_granted for 127.0.0.1:40000 failed"
    assert h.proto.state is State.RELAY  # the relay goes on


def test_a_next_hop_route_without_a_next_hop_is_91_naming_the_destination(access_events):
    h = Harness(policy=RecordingPolicy(Decision(ReplyCode.GRANTED, "ok", route=Route.NEXT_HOP)))
    h.send(build_request(Command.CONNECT, 80, "192.0.2.7", "alice"))
    assert h.client.value() == build_reply(ReplyCode.REJECTED)
    assert h.reactor.tcpClients == []
    h.proto.connectionLost(Failure(Exception("done")))
    assert access_events[0]["reason"] == (
        "the policy sends 192.0.2.7 via the next hop, but no --next-hop is set"
    )


def test_a_client_over_the_limit_that_leaves_early_is_recorded_as_refused(access_events):
    h = Harness(ServerSettings(max_per_host=1))
    second = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    second.makeConnection(
        Transport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 1080),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40001),
        )
    )
    second.connectionLost(Failure(Exception("gone")))
    [event] = access_events
    assert event["refusal"] == "LimitReached" and event["code"] is None
    assert event["reason"].endswith("; client closed the connection before a complete request")
