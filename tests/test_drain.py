"""Stopping on SIGTERM, in memory: open connections may finish, up to
--shutdown-timeout, then are cut off with their access records written."""

from __future__ import annotations

import signal

from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure

from socksident.drain import Drain
from socksident.state import State
from test_limits import REQUEST, Server, lost
from test_server import Transport


class AbortingTransport(Transport):
    """Aborting tells the protocol at once, as the reactor will a moment later."""

    protocol = None

    def abortConnection(self) -> None:
        super().abortConnection()
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(Failure(Exception("aborted")))


def relaying(server: Server, port: int):
    proto, client = server.connect(port=port)
    aborting = AbortingTransport(hostAddress=client.getHost(), peerAddress=client.getPeer())
    proto.makeConnection(aborting)  # replaces the transport: counts once more, so undo
    server.factory.live.change("connections", -1)
    aborting.protocol = proto
    proto.dataReceived(REQUEST)
    host, rport, factory, _, _ = server.reactor.tcpClients[-1]
    remote_proto = factory.buildProtocol(IPv4Address("TCP", host, rport))
    remote = AbortingTransport(peerAddress=IPv4Address("TCP", host, rport))
    remote.protocol = remote_proto
    remote_proto.makeConnection(remote)
    assert proto.state is State.RELAY
    return proto, aborting, remote_proto, remote


def drain_of(server: Server, timeout: float = 30.0) -> Drain:
    drain = Drain(server.factory, timeout, reactor=server.reactor, catch_second_signal=False)
    drain.startService()
    return drain


def test_with_nothing_open_the_stop_is_immediate():
    server = Server()
    stopped = drain_of(server).stopService()
    server.reactor.advance(0)
    assert stopped.called


def test_a_relay_that_ends_within_the_timeout_completes(access_events):
    server = Server()
    proto, client, remote_proto, remote = relaying(server, 40000)
    stopped = drain_of(server).stopService()
    assert not stopped.called
    server.reactor.advance(10)
    proto.dataReceived(b"still relayed")
    assert remote.value() == b"still relayed"
    assert not stopped.called
    remote_proto.connectionLost(Failure(Exception("closed")))
    lost(proto)
    server.reactor.advance(0)
    assert stopped.called
    [event] = access_events
    assert "cut off" not in event["reason"] and event["bytes_up"] == len(b"still relayed")


def test_at_the_timeout_the_rest_are_cut_off_with_their_records(access_events):
    server = Server()
    relays = [relaying(server, 40000 + n) for n in range(3)]
    waiting, _ = server.connect(port=41000)
    waiting.transport = AbortingTransport()
    waiting.transport.protocol = waiting
    stopped = drain_of(server, timeout=20).stopService()
    server.reactor.advance(19)
    assert not stopped.called and access_events == []
    server.reactor.advance(1)
    for proto, _, remote_proto, _ in relays:
        if proto.state is not State.CLOSED:
            remote_proto.connectionLost(Failure(Exception("aborted")))
    server.reactor.advance(0)
    assert stopped.called
    assert len(access_events) == 4
    assert all("cut off: server stopping (shutdown timeout)" in e["reason"] for e in access_events)
    assert server.factory.live.connections == 0 and server.factory.open_connections == set()


def test_a_second_sigterm_cuts_off_at_once(access_events):
    server = Server()
    proto, _, remote_proto, _ = relaying(server, 40000)
    drain = Drain(server.factory, 30, reactor=server.reactor)
    drain.startService()
    before = signal.getsignal(signal.SIGTERM)
    stopped = drain.stopService()
    assert signal.getsignal(signal.SIGTERM) is not before  # the second one is ours
    drain.cut_off("second SIGTERM")
    if proto.state is not State.CLOSED:
        remote_proto.connectionLost(Failure(Exception("aborted")))
    server.reactor.advance(0)
    assert stopped.called
    assert signal.getsignal(signal.SIGTERM) is before
    [event] = access_events
    assert "cut off: server stopping (second SIGTERM)" in event["reason"]
