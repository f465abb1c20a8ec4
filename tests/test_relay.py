"""`socksident.relay` on its own: `Relay` and `RemoteProtocol` with recording fakes.

Both fake transports write into one shared call log, so a test can assert the
order of calls across the pair (for example: a producer is unregistered before
the write half is shut, because Twisted will not finish closing a transport
that still has a producer registered).
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import pytest
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from socksident import relay as relay_module
from socksident.relay import SPLICE_AFTER, Relay
from socksident.remote import PendingEvents, RemoteProtocol
from socksident.settings import ServerSettings
from socksident.splice import splice_available

from integration.conftest import skip_unless_strict
from test_splice import Reactor
from test_splice import run as run_descriptors

Call = tuple[Any, ...]


class FakeTransport:
    """Records every call that matters to the relay, into a log shared with its peer."""

    def __init__(self, name: str, log: list[Call]) -> None:
        self.name = name
        self.log = log
        self.written: list[bytes] = []
        self.producer: Any = None
        self.streaming: Optional[bool] = None
        self.paused = False
        self.write_closed = False
        self.disconnecting = False
        # Twisted's FileDescriptor write buffer, which linger.queued_bytes reads
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0

    def __repr__(self) -> str:
        return f"<{self.name}>"

    def calls(self) -> list[Call]:
        """This transport's calls, in order, without the transport's name."""
        return [entry[1:] for entry in self.log if entry[0] == self.name]

    def value(self) -> bytes:
        return b"".join(self.written)

    # IConsumer
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.log.append((self.name, "registerProducer", producer, streaming))
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.log.append((self.name, "unregisterProducer"))
        self.producer = self.streaming = None

    def write(self, data: bytes) -> None:
        self.log.append((self.name, "write", data))
        self.written.append(data)

    # IPushProducer
    def pauseProducing(self) -> None:
        self.log.append((self.name, "pauseProducing"))
        self.paused = True

    def resumeProducing(self) -> None:
        self.log.append((self.name, "resumeProducing"))
        self.paused = False

    def stopProducing(self) -> None:
        self.log.append((self.name, "stopProducing"))

    # ITCPTransport / IHalfCloseableDescriptor
    def loseWriteConnection(self) -> None:
        self.log.append((self.name, "loseWriteConnection"))
        self.write_closed = True

    def loseConnection(self) -> None:
        self.log.append((self.name, "loseConnection"))
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.log.append((self.name, "abortConnection"))
        self.disconnecting = True


class Pair:
    """A relay between two fake transports, with its clock and finish record."""

    def __init__(
        self,
        idle_timeout: Optional[float] = None,
        start: bool = True,
        early: bytes = b"",
        linger_timeout: float = 5.0,
    ) -> None:
        self.log: list[Call] = []
        self.client = FakeTransport("client", self.log)
        self.remote = FakeTransport("remote", self.log)
        self.clock = Clock()
        self.finished: list[Relay] = []
        self.reset: set[str] = set()  # names of the transports whose peer reset them
        self.relay = Relay(
            self.client,
            self.remote,
            self.clock,
            self.finished.append,
            idle_timeout,
            linger_timeout=linger_timeout,
            paused_check_interval=1.0,
            is_reset=lambda transport: transport.name in self.reset,
        )
        if start:
            self.relay.start(early)
            del self.log[:]  # each test looks at what happens after start

    def data_up(self, data: bytes) -> None:
        self.relay.data(self.relay.client, data)

    def data_down(self, data: bytes) -> None:
        self.relay.data(self.relay.remote, data)


def lost_reason() -> Failure:
    return Failure(Exception("connection lost"))


# -- start ---------------------------------------------------------------------------


def produces_for(consumer: FakeTransport, producer: FakeTransport) -> bool:
    """Whether `consumer`'s registered streaming producer drives `producer`'s transport."""
    registered = consumer.producer
    if registered is None or consumer.streaming is not True:
        return False
    registered.pauseProducing()
    paused = producer.paused
    registered.resumeProducing()
    return paused and not producer.paused


def test_start_makes_each_transport_the_others_streaming_producer():
    p = Pair(start=False)
    p.relay.start()
    assert produces_for(p.client, p.remote)
    assert produces_for(p.remote, p.client)
    assert p.relay.client.has_producer and p.relay.remote.has_producer


def test_start_writes_early_data_to_the_remote_before_anything_else():
    p = Pair(start=False)
    p.relay.start(b"early ")
    # before the pairing too, so a full buffer cannot pause the client early
    assert p.log[0] == ("remote", "write", b"early ")
    p.data_up(b"later")
    writes = [entry for entry in p.log if entry[1] == "write"]
    assert writes == [("remote", "write", b"early "), ("remote", "write", b"later")]
    assert p.client.written == []
    assert p.relay.bytes_up == len(b"early later") and p.relay.bytes_down == 0


def test_start_resumes_nobody():
    """Resuming is the callers' job, once each side's protocol is attached."""
    p = Pair(start=False)
    p.relay.start(b"x")
    assert not any(entry[1] == "resumeProducing" for entry in p.log)


# -- data ------------------------------------------------------------------------------


def test_data_goes_to_the_other_side_and_is_counted():
    p = Pair()
    p.data_up(b"ping")
    p.data_down(b"pong!")
    p.data_down(b"!!")
    assert p.remote.value() == b"ping"
    assert p.client.value() == b"pong!!!"
    assert (p.relay.bytes_up, p.relay.bytes_down) == (4, 7)


def test_data_for_a_peer_that_is_gone_is_counted_not_written():
    p = Pair()
    p.relay.lost(p.relay.client)
    p.data_down(b"too late")
    assert p.client.written == []
    assert p.relay.bytes_down == len(b"too late")


# -- half-close --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "closing, other", [("client", "remote"), ("remote", "client")]
)
def test_fin_unregisters_the_peers_producer_then_shuts_its_write_half(closing, other):
    p = Pair()
    p.relay.read_closed(getattr(p.relay, closing))
    peer = getattr(p, other)
    assert peer.calls() == [("unregisterProducer",), ("loseWriteConnection",)]
    assert peer.producer is None and peer.write_closed
    # the closing side's transport is untouched: the other direction still flows
    assert getattr(p, closing).calls() == []
    assert produces_for(getattr(p, closing), peer)
    assert not p.client.disconnecting and not p.remote.disconnecting


def test_after_a_client_fin_the_remote_still_talks_to_the_client():
    p = Pair()
    p.relay.read_closed(p.relay.client)
    p.data_down(b"answer")
    assert p.client.value() == b"answer"
    assert not p.client.write_closed


def test_a_second_fin_from_the_same_side_changes_nothing():
    p = Pair()
    p.relay.read_closed(p.relay.client)
    p.relay.read_closed(p.relay.client)
    assert p.remote.calls() == [("unregisterProducer",), ("loseWriteConnection",)]


@pytest.mark.parametrize("first, second", [("client", "remote"), ("remote", "client")])
def test_fin_from_both_sides_closes_both(first, second):
    p = Pair()
    p.relay.read_closed(getattr(p.relay, first))
    del p.log[:]
    p.relay.read_closed(getattr(p.relay, second))
    # the side that got the first FIN's write shutdown was already unregistered
    assert getattr(p, second).calls() == [("loseConnection",)]
    # the other still had its producer: unregistered before it is closed
    assert getattr(p, first).calls() == [("unregisterProducer",), ("loseConnection",)]
    assert p.client.producer is None and p.remote.producer is None
    assert p.finished == []  # finished only once both are actually lost


def test_fin_after_the_side_is_lost_is_ignored():
    p = Pair()
    p.relay.lost(p.relay.remote)
    del p.log[:]
    p.relay.read_closed(p.relay.remote)
    assert p.log == []


def test_fin_when_the_peer_is_lost_does_not_touch_the_peer():
    p = Pair()
    p.relay.lost(p.relay.remote)
    del p.log[:]
    p.relay.read_closed(p.relay.client)
    assert p.remote.calls() == []


# -- loss and the end -------------------------------------------------------------------


@pytest.mark.parametrize("first, other", [("client", "remote"), ("remote", "client")])
def test_loss_unregisters_the_peers_producer_then_closes_it(first, other):
    p = Pair()
    p.relay.lost(getattr(p.relay, first))
    peer = getattr(p, other)
    assert peer.calls() == [("unregisterProducer",), ("loseConnection",)]
    assert peer.producer is None
    assert getattr(p, first).calls() == []  # already gone: nothing to do there
    assert p.finished == [] and not p.relay.finished


@pytest.mark.parametrize("first, second", [("client", "remote"), ("remote", "client")])
def test_on_finished_runs_exactly_once_after_both_are_lost(first, second):
    p = Pair()
    p.data_up(b"abc")
    p.data_down(b"defgh")
    p.relay.lost(getattr(p.relay, first))
    assert p.finished == []
    del p.log[:]
    p.relay.lost(getattr(p.relay, second))
    assert p.log == []  # the first side is gone: its transport is not touched again
    assert p.finished == [p.relay] and p.relay.finished
    p.relay.lost(getattr(p.relay, first))
    p.relay.lost(getattr(p.relay, second))
    assert p.finished == [p.relay]
    assert (p.relay.bytes_up, p.relay.bytes_down) == (3, 5)


def test_a_loss_reported_twice_closes_the_peer_once():
    p = Pair()
    p.relay.lost(p.relay.client)
    p.relay.lost(p.relay.client)
    assert p.remote.calls() == [("unregisterProducer",), ("loseConnection",)]
    assert p.finished == []


def test_loss_after_a_half_close_finishes():
    p = Pair()
    p.relay.read_closed(p.relay.client)
    p.relay.lost(p.relay.remote)
    assert p.client.calls()[-2:] == [("unregisterProducer",), ("loseConnection",)]
    p.relay.lost(p.relay.client)
    assert p.finished == [p.relay]


# -- the idle timer ------------------------------------------------------------------------


def test_no_idle_timeout_means_no_timer():
    p = Pair()
    p.data_up(b"x")
    assert p.clock.getDelayedCalls() == []


def test_an_idle_relay_is_aborted_after_the_timeout():
    """Aborted, not closed: a peer that reads nothing would hold a flushing close open."""
    p = Pair(idle_timeout=10)
    p.clock.advance(9.9)
    assert not p.client.disconnecting
    p.clock.advance(0.1)
    assert p.client.calls() == [("unregisterProducer",), ("abortConnection",)]
    assert p.remote.calls() == [("unregisterProducer",), ("abortConnection",)]
    assert p.relay.idle_closed


def test_idle_timeout_spares_a_side_already_lost():
    p = Pair(idle_timeout=10)
    p.relay.lost(p.relay.remote)
    del p.log[:]
    p.clock.advance(10)
    assert p.remote.calls() == []
    assert p.relay.idle_closed


@pytest.mark.parametrize("direction", ["data_up", "data_down"])
def test_data_in_either_direction_resets_the_idle_timer(direction):
    p = Pair(idle_timeout=10)
    for _ in range(3):
        p.clock.advance(9)
        getattr(p, direction)(b"x")
    p.clock.advance(9.9)
    assert not p.client.disconnecting and not p.relay.idle_closed
    p.clock.advance(0.1)
    assert p.client.disconnecting and p.remote.disconnecting and p.relay.idle_closed
    assert len(p.clock.getDelayedCalls()) == 0


def test_finishing_cancels_the_idle_timer():
    p = Pair(idle_timeout=10)
    p.data_up(b"x")
    p.relay.lost(p.relay.client)
    p.relay.lost(p.relay.remote)
    assert p.clock.getDelayedCalls() == []
    p.clock.advance(60)
    assert not p.relay.idle_closed


def test_data_in_flight_after_an_idle_close_leaves_no_timer_behind():
    p = Pair(idle_timeout=10)
    p.clock.advance(10)
    assert p.relay.idle_closed
    p.data_down(b"flushed on the way out")
    p.relay.lost(p.relay.remote)
    p.relay.lost(p.relay.client)
    assert p.finished == [p.relay]
    assert p.clock.getDelayedCalls() == []


# -- the linger time ------------------------------------------------------------------------


@pytest.mark.parametrize("gone, other", [("client", "remote"), ("remote", "client")])
def test_the_peer_of_a_lost_side_is_aborted_after_the_linger_time(gone, other):
    """The issue's hole: a flushing close to a peer that never reads waited for ever."""
    p = Pair(linger_timeout=5)
    peer = getattr(p, other)
    peer.dataBuffer, peer.offset, peer._tempDataLen = b"x" * 1000, 100, 50
    p.relay.lost(getattr(p.relay, gone))
    assert peer.calls() == [("unregisterProducer",), ("loseConnection",)]
    p.clock.advance(4.9)
    assert ("abortConnection",) not in peer.calls()
    p.clock.advance(0.1)
    assert peer.calls()[-1] == ("abortConnection",)
    assert (p.relay.cut_off, p.relay.dropped) == (other, 950)
    p.relay.lost(getattr(p.relay, other))
    assert p.finished == [p.relay]
    assert p.clock.getDelayedCalls() == []


def test_a_peer_that_closes_within_the_linger_time_is_not_cut_off():
    p = Pair(linger_timeout=5)
    p.relay.lost(p.relay.client)
    p.clock.advance(2)
    p.relay.lost(p.relay.remote)
    assert p.clock.getDelayedCalls() == []
    p.clock.advance(10)
    assert ("abortConnection",) not in p.remote.calls()
    assert (p.relay.cut_off, p.relay.dropped) == (None, 0)
    assert p.finished == [p.relay]


def test_a_half_close_starts_no_linger_time():
    """A FIN is not the end: the other direction may run as long as it moves."""
    p = Pair(linger_timeout=5)
    p.relay.read_closed(p.relay.client)
    assert p.clock.getDelayedCalls() == []
    p.clock.advance(3600)
    assert ("abortConnection",) not in p.remote.calls() + p.client.calls()


def test_a_loss_after_a_half_close_lingers_the_half_open_side():
    p = Pair(linger_timeout=5)
    p.relay.read_closed(p.relay.remote)  # the client's write half is shut, still flushing
    p.relay.lost(p.relay.remote)
    p.clock.advance(5)
    assert p.client.calls()[-1] == ("abortConnection",)
    assert p.relay.cut_off == "client"


def test_fins_from_both_sides_linger_both():
    p = Pair(linger_timeout=5)
    p.relay.read_closed(p.relay.client)
    p.relay.read_closed(p.relay.remote)
    assert len(p.clock.getDelayedCalls()) == 1
    p.clock.advance(5)
    assert p.client.calls()[-1] == p.remote.calls()[-1] == ("abortConnection",)
    assert p.relay.cut_off == "both"


def test_a_side_lost_during_the_linger_time_is_not_aborted():
    p = Pair(linger_timeout=5)
    p.relay.read_closed(p.relay.client)
    p.relay.read_closed(p.relay.remote)
    p.relay.lost(p.relay.client)
    p.clock.advance(5)
    assert ("abortConnection",) not in p.client.calls()
    assert p.remote.calls()[-1] == ("abortConnection",)
    assert p.relay.cut_off == "remote"


# -- a paused side that is reset -------------------------------------------------------------


@pytest.mark.parametrize("paused, consumer", [("client", "remote"), ("remote", "client")])
def test_a_paused_side_that_was_reset_is_aborted(paused, consumer):
    """The reactor does not watch a paused socket: the relay asks the kernel."""
    p = Pair()
    getattr(p, consumer).producer.pauseProducing()
    assert getattr(p, paused).paused
    p.clock.advance(1)
    assert ("abortConnection",) not in getattr(p, paused).calls()
    assert len(p.clock.getDelayedCalls()) == 1  # still paused: asked again
    p.reset.add(paused)
    p.clock.advance(1)
    assert getattr(p, paused).calls()[-1] == ("abortConnection",)
    assert p.clock.getDelayedCalls() == []
    # the transport then reports its loss, and the peer gets its linger time
    p.relay.lost(getattr(p.relay, paused))
    assert getattr(p, consumer).calls()[-2:] == [("unregisterProducer",), ("loseConnection",)]


def test_a_resumed_side_is_no_longer_asked():
    p = Pair()
    p.remote.producer.pauseProducing()
    p.remote.producer.resumeProducing()
    p.reset.add("client")
    p.clock.advance(1)
    assert ("abortConnection",) not in p.client.calls()
    assert p.clock.getDelayedCalls() == []


def test_an_unpaused_relay_asks_nothing():
    p = Pair()
    p.data_up(b"x")
    p.data_down(b"y")
    assert p.clock.getDelayedCalls() == []


# -- RemoteProtocol ---------------------------------------------------------------------------


def connected_remote(log: list[Call]) -> tuple[RemoteProtocol, FakeTransport]:
    transport = FakeTransport("remote", log)
    proto = RemoteProtocol()
    proto.makeConnection(transport)
    return proto, transport


def started_relay(log: list[Call], remote: FakeTransport) -> tuple[Relay, FakeTransport, list[Relay]]:
    client = FakeTransport("client", log)
    finished: list[Relay] = []
    relay = Relay(client, remote, Clock(), finished.append)
    relay.start()
    return relay, client, finished


def test_remote_protocol_is_half_closeable():
    # Without IHalfCloseableProtocol, Twisted closes the whole connection on a FIN.
    assert IHalfCloseableProtocol.providedBy(RemoteProtocol())


def test_remote_is_paused_at_its_first_bytes_before_attach_and_resumed_on_attach():
    log: list[Call] = []
    proto, transport = connected_remote(log)
    assert transport.calls() == []  # connecting alone costs no pause
    proto.dataReceived(b"banner")
    assert transport.calls() == [("pauseProducing",)]
    relay, client, _ = started_relay(log, transport)
    assert transport.paused
    proto.attach(relay)
    assert not transport.paused
    assert client.value() == b"banner"
    assert [c for c in transport.calls() if c[0] == "resumeProducing"] == [("resumeProducing",)]


def test_remote_attached_before_it_sent_anything_was_never_paused():
    log: list[Call] = []
    proto, transport = connected_remote(log)
    relay, client, _ = started_relay(log, transport)
    proto.attach(relay)
    assert ("pauseProducing",) not in transport.calls()
    assert not transport.paused
    proto.dataReceived(b"first")
    assert client.value() == b"first"


def test_attached_remote_feeds_the_relay():
    log: list[Call] = []
    proto, transport = connected_remote(log)
    relay, client, finished = started_relay(log, transport)
    proto.attach(relay)
    assert proto.relay is relay
    proto.dataReceived(b"from the destination")
    assert client.value() == b"from the destination"
    assert relay.bytes_down == len(b"from the destination")
    proto.readConnectionLost()
    assert client.write_closed
    proto.connectionLost(lost_reason())
    assert client.disconnecting and relay.remote.lost


def test_remote_lost_before_attach_closes_the_client_on_attach():
    log: list[Call] = []
    proto, transport = connected_remote(log)
    proto.connectionLost(lost_reason())
    relay, client, finished = started_relay(log, transport)
    del log[:]
    proto.attach(relay)
    assert client.calls() == [("unregisterProducer",), ("loseConnection",)]
    assert transport.calls() == []  # a lost transport is not resumed
    assert relay.remote.lost and finished == []
    relay.lost(relay.client)
    assert finished == [relay]


def test_remote_fin_before_attach_shuts_the_clients_write_half_on_attach():
    log: list[Call] = []
    proto, transport = connected_remote(log)
    proto.readConnectionLost()
    relay, client, finished = started_relay(log, transport)
    del log[:]
    proto.attach(relay)
    assert client.calls() == [("unregisterProducer",), ("loseWriteConnection",)]
    assert not client.disconnecting and relay.remote.read_closed
    # the client's direction keeps flowing to the destination
    relay.data(relay.client, b"more")
    assert transport.value() == b"more"


def test_remote_fin_then_loss_before_attach_counts_as_loss():
    log: list[Call] = []
    proto, transport = connected_remote(log)
    proto.readConnectionLost()
    proto.connectionLost(lost_reason())
    relay, client, _ = started_relay(log, transport)
    del log[:]
    proto.attach(relay)
    assert client.calls() == [("unregisterProducer",), ("loseConnection",)]


def test_remote_data_before_attach_is_delivered_on_attach():
    log: list[Call] = []
    proto, transport = connected_remote(log)
    proto.dataReceived(b"banner")  # a transport may deliver what it had already read
    proto.readConnectionLost()
    relay, client, _ = started_relay(log, transport)
    del log[:]
    proto.attach(relay)
    assert client.value() == b"banner"
    assert relay.bytes_down == len(b"banner")
    # the data goes out before the write half is shut
    assert client.calls() == [
        ("write", b"banner"),
        ("unregisterProducer",),
        ("loseWriteConnection",),
    ]


def test_remote_write_half_shutdown_closes_nothing():
    log: list[Call] = []
    proto, transport = connected_remote(log)
    relay, client, _ = started_relay(log, transport)
    proto.attach(relay)
    del log[:]
    proto.writeConnectionLost()
    assert log == []


# -- PendingEvents: what a side did before the relay existed ---------------------------


def test_pending_bytes_are_kept_in_order_and_counted():
    pending = PendingEvents()
    pending.data(b"one ")
    pending.data(b"two")
    assert pending.size == 7
    assert pending.take_data() == b"one two"
    assert pending.take_data() == b""


def test_replay_of_an_open_side_delivers_then_resumes_it():
    p = Pair()
    pending = PendingEvents()
    pending.data(b"kept")
    pending.replay(p.relay, p.relay.remote)
    assert p.client.calls() == [("write", b"kept")]
    assert p.remote.calls() == [("resumeProducing",)]
    assert p.relay.bytes_down == 4


def test_replay_of_a_fin_shuts_the_peers_write_half_and_does_not_resume():
    p = Pair()
    pending = PendingEvents()
    pending.data(b"last words")
    pending.read_closed = True
    pending.replay(p.relay, p.relay.remote)
    assert p.client.calls() == [("write", b"last words"), ("unregisterProducer",), ("loseWriteConnection",)]
    assert ("resumeProducing",) not in p.remote.calls()


def test_replay_of_a_loss_counts_as_loss_even_after_a_fin():
    p = Pair()
    pending = PendingEvents()
    pending.read_closed = True
    pending.lost = True
    pending.replay(p.relay, p.relay.remote)
    assert p.relay.remote.lost
    assert p.client.calls() == [("unregisterProducer",), ("loseConnection",)]


# -- half-close over TLS ----------------------------------------------------------------


@pytest.mark.parametrize("tls, plain", [("client", "remote"), ("remote", "client")])
def test_fin_towards_a_tls_side_sends_close_notify_and_keeps_the_other_way(tls, plain):
    from zope.interface import directlyProvides
    from twisted.internet.interfaces import ISSLTransport

    p = Pair()
    directlyProvides(getattr(p, tls), ISSLTransport)
    p.relay.read_closed(getattr(p.relay, plain))
    tls_transport = getattr(p, tls)
    # TLS has no write half to shut: loseConnection sends close_notify and keeps reading
    assert tls_transport.calls() == [("unregisterProducer",), ("loseConnection",)]
    assert not tls_transport.write_closed
    assert getattr(p, plain).calls() == [] and not getattr(p, plain).disconnecting
    # the TLS side's data still reaches the plain side until its own close_notify
    p.relay.data(getattr(p.relay, tls), b"still flowing")
    assert getattr(p, plain).value() == b"still flowing"
    assert p.finished == []


# -- more on pausing, the linger count, the state a record reads ---------------------------


def test_a_new_relays_state_is_plain_booleans_and_names_the_twisted_path():
    """What the access record and the server read of a relay, before anything happened."""
    p = Pair(start=False)
    relay = p.relay
    assert relay.finished is False and relay.idle_closed is False
    assert (relay.cut_off, relay.dropped, relay.mode) == (None, 0, "twisted")
    for side, peer in ((relay.client, relay.remote), (relay.remote, relay.client)):
        assert side.peer is peer
        assert side.read_closed is side.lost is side.has_producer is False
        assert side.paused is side.closing is False
    relay.start()
    relay.client.unregister_producer()
    assert relay.client.has_producer is False and p.client.producer is None


def test_a_relay_lost_before_its_start_unregisters_nothing():
    p = Pair(start=False)
    p.relay.lost(p.relay.client)
    assert p.remote.calls() == [("loseConnection",)]
    assert p.relay.client.paused is False


def test_two_paused_sides_share_one_check():
    p = Pair()
    p.client.producer.pauseProducing()
    p.remote.producer.pauseProducing()
    assert len(p.clock.getDelayedCalls()) == 1


def test_a_resume_with_no_check_pending_schedules_none():
    p = Pair()
    p.remote.producer.resumeProducing()  # Twisted resumes a producer whose buffer drained
    assert p.clock.getDelayedCalls() == []
    assert p.relay.client.paused is False


def test_a_side_paused_again_after_a_check_that_found_none_is_checked_again():
    p = Pair()
    p.remote.producer.pauseProducing()
    p.remote.producer.resumeProducing()
    p.clock.advance(1)  # the check runs and finds nobody paused
    assert p.clock.getDelayedCalls() == []
    p.remote.producer.pauseProducing()
    p.reset.add("client")
    p.clock.advance(1)
    assert p.client.calls()[-1] == ("abortConnection",)


def test_a_reset_side_is_aborted_once_while_the_other_stays_paused():
    p = Pair()
    p.remote.producer.pauseProducing()  # the client is paused
    p.client.producer.pauseProducing()  # the remote is paused
    p.reset.add("client")
    p.clock.advance(1)
    assert p.relay.client.paused is False
    p.clock.advance(1)  # the remote is still paused: asked again, the client is not
    assert p.client.calls().count(("abortConnection",)) == 1
    assert len(p.clock.getDelayedCalls()) == 1


def test_the_bytes_dropped_by_both_sides_are_added():
    p = Pair(linger_timeout=5)
    p.client.dataBuffer = b"c" * 300
    p.remote.dataBuffer = b"r" * 200
    p.relay.read_closed(p.relay.client)
    p.relay.read_closed(p.relay.remote)
    p.clock.advance(5)
    assert (p.relay.cut_off, p.relay.dropped) == ("both", 500)


# -- the splice hand-over -------------------------------------------------------------------


class SocketTransport(FakeTransport):
    """A fake transport over a real TCP socket, as `splice.spliceable` wants one."""

    def __init__(self, name: str, log: list[Call], sock: socket.socket) -> None:
        super().__init__(name, log)
        self.socket = sock

    def fileno(self) -> int:
        return self.socket.fileno()

    def stopReading(self) -> None:
        self.log.append((self.name, "stopReading"))

    def stopWriting(self) -> None:
        self.log.append((self.name, "stopWriting"))


class SpliceReactor(Reactor, Clock):
    """A clock that also records the descriptors the splicer watches."""

    def __init__(self) -> None:
        Reactor.__init__(self)
        Clock.__init__(self)

    def run(self, rounds: int = 20) -> None:
        run_descriptors(self, rounds)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(far end, near end) of a loopback TCP connection; the near end non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        far = socket.create_connection(listener.getsockname())
        near, _ = listener.accept()
    near.setblocking(False)
    return far, near


class SplicePair:
    """A relay between two socket transports, spliceable, with the far ends at hand."""

    def __init__(
        self,
        idle_timeout: Optional[float] = None,
        splice: Optional[bool] = True,
        remote_class: type[SocketTransport] = SocketTransport,
    ) -> None:
        if not splice_available():
            skip_unless_strict("os.splice needs Linux")
        self.log: list[Call] = []
        self.client_far, client_near = tcp_pair()
        remote_near, self.remote_far = tcp_pair()[::-1]
        self.sockets = [self.client_far, client_near, remote_near, self.remote_far]
        self.client = SocketTransport("client", self.log, client_near)
        self.remote = remote_class("remote", self.log, remote_near)
        self.reactor = SpliceReactor()
        self.finished: list[Relay] = []
        extra = {} if splice is None else {"splice": splice}
        self.relay = Relay(
            self.client, self.remote, self.reactor, self.finished.append, idle_timeout,
            paused_check_interval=1.0, **extra,
        )
        self.relay.start()
        del self.log[:]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def reach_splice_after(self) -> None:
        self.relay.data(self.relay.client, b"u" * (SPLICE_AFTER - 1))
        self.relay.data(self.relay.remote, b"d")

    def drain_both(self) -> None:
        """Both transports report an empty write buffer to their pull producer."""
        for transport in (self.client, self.remote):
            transport.producer.resumeProducing()

    def flood(self, far: socket.socket, chunk: bytes) -> None:
        """Send from a far end until the kernel refuses more, the splicer running meanwhile."""
        far.setblocking(False)
        try:
            for _ in range(64):
                far.send(chunk)
                self.reactor.run(rounds=2)
        except BlockingIOError:
            pass
        self.reactor.run(rounds=2)


@pytest.fixture
def spliced() -> Any:
    pair = SplicePair()
    yield pair
    pair.relay.unsplice()
    pair.close()


def test_a_relay_waits_for_splice_after_bytes_in_both_directions(spliced):
    p = spliced
    p.relay.data(p.relay.client, b"u" * (SPLICE_AFTER - 2))
    p.relay.data(p.relay.remote, b"d")
    assert not any(entry[1] == "pauseProducing" for entry in p.log)
    p.relay.data(p.relay.remote, b"d")  # exactly SPLICE_AFTER, counted both ways
    for transport in (p.client, p.remote):
        calls = transport.calls()
        assert calls[-3:-1] == [("unregisterProducer",), ("pauseProducing",)]
        assert calls[-1][0] == "registerProducer" and calls[-1][2] is False  # a pull producer
    assert p.relay.mode == "twisted"  # not yet: Twisted's buffers first


def test_the_sockets_go_to_the_splicer_once_both_buffers_are_empty(spliced):
    p = spliced
    p.reach_splice_after()
    p.relay.resume(p.relay.client)  # a replayed side is not resumed while waiting
    assert p.client.paused
    p.client.dataBuffer = b"not yet written"
    p.client.producer.resumeProducing()
    assert p.client.producer is not None and not p.reactor.readers  # still waiting
    p.client.dataBuffer = b""
    p.client.producer.resumeProducing()
    assert p.client.producer is None  # it unregistered itself
    assert not p.reactor.readers
    del p.log[:]
    p.remote.producer.resumeProducing()
    assert p.relay.mode == "splice"
    assert p.client.calls() == [("stopReading",), ("stopWriting",)]
    assert p.remote.calls() == [("unregisterProducer",), ("stopReading",), ("stopWriting",)]
    assert {d.fileno() for d in p.reactor.readers} == {p.client.fileno(), p.remote.fileno()}


def test_spliced_bytes_are_counted_and_keep_the_relay_alive():
    p = SplicePair(idle_timeout=10)
    try:
        p.reach_splice_after()
        p.drain_both()
        p.reactor.advance(9)
        p.client_far.sendall(b"through the kernel")
        p.remote_far.sendall(b"and back")
        p.reactor.run()
        assert p.remote_far.recv(100) == b"through the kernel"
        assert p.client_far.recv(100) == b"and back"
        assert p.relay.bytes_up == SPLICE_AFTER - 1 + len(b"through the kernel")
        assert p.relay.bytes_down == 1 + len(b"and back")
        p.reactor.advance(9)
        assert not p.relay.idle_closed  # the spliced bytes reset the idle timer
        p.reactor.advance(1)
        assert p.relay.idle_closed and not p.reactor.readers  # unspliced before the abort
        assert p.client.calls()[-1] == ("abortConnection",)
    finally:
        p.close()


def test_a_fin_while_spliced_gives_the_relay_back_to_twisted(spliced):
    p = spliced
    p.reach_splice_after()
    p.drain_both()
    del p.log[:]
    p.client_far.shutdown(socket.SHUT_WR)
    p.reactor.run()
    assert not p.reactor.readers and not p.reactor.writers
    assert p.relay.mode == "splice"  # the record says the kernel moved bytes
    for transport, other in ((p.client, p.remote), (p.remote, p.client)):
        calls = transport.calls()
        assert calls[0][0] == "registerProducer" and calls[0][2] is True
        assert ("resumeProducing",) in calls
    assert produces_for(p.client, p.remote) and produces_for(p.remote, p.client)
    # the FIN itself then reaches the relay through the client's protocol
    p.relay.read_closed(p.relay.client)
    assert p.remote.calls()[-2:] == [("unregisterProducer",), ("loseWriteConnection",)]


def test_the_bytes_left_in_a_pipe_are_written_through_twisted(spliced):
    p = spliced
    p.remote_far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    p.reach_splice_after()
    p.drain_both()
    p.remote.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    p.client_far.setblocking(False)
    offered = 0
    try:
        while offered < 4 << 20:
            offered += p.client_far.send(b"x" * 65536)
            p.reactor.run(rounds=2)
    except BlockingIOError:
        pass
    p.reactor.run(rounds=2)
    assert p.relay.client.paused and not p.relay.remote.paused  # held back by the full pipe
    assert len(p.reactor.getDelayedCalls()) == 1  # and asks whether it was reset
    del p.log[:]
    p.relay.unsplice()
    written = b"".join(entry[2] for entry in p.log if entry[:2] == ("remote", "write"))
    assert written and set(written) == {ord("x")}
    assert ("resumeProducing",) in p.client.calls() and ("resumeProducing",) in p.remote.calls()
    assert p.relay.client.paused is False


def test_unsplicing_while_waiting_for_the_buffers_pairs_the_transports_again(spliced):
    p = spliced
    p.reach_splice_after()
    waiting = [p.client.producer, p.remote.producer]
    del p.log[:]
    p.relay.unsplice()
    for transport in (p.client, p.remote):
        calls = transport.calls()
        assert calls[0] == ("unregisterProducer",)  # the pull producer, cancelled
        assert calls[1][0] == "registerProducer" and calls[1][2] is True
        assert calls[-1] == ("resumeProducing",)
    # a late resumeProducing of a cancelled pull producer changes nothing
    for producer in waiting:
        producer.resumeProducing()
    assert produces_for(p.client, p.remote) and produces_for(p.remote, p.client)
    del p.log[:]
    p.relay.resume(p.relay.client)
    assert p.client.calls() == [("resumeProducing",)]
    p.relay.lost(p.relay.remote)  # unsplices again first: nothing left to undo
    assert p.client.calls()[-2:] == [("unregisterProducer",), ("loseConnection",)]
    assert p.relay.mode == "twisted" and not p.reactor.readers


def test_a_splicer_that_cannot_be_made_leaves_the_relay_to_twisted(spliced, monkeypatch):
    def no_descriptors(*args: Any) -> Any:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(relay_module, "Splicer", no_descriptors)
    p = spliced
    p.reach_splice_after()
    del p.log[:]
    with capturedLogs() as events:
        p.drain_both()
    [event] = [e for e in events if e.get("log_namespace") == "socksident.relay"]
    assert event["log_level"] is LogLevel.warn
    assert formatEvent(event) == "no splice relay ([Errno 24] Too many open files): relaying through Twisted"
    assert p.relay.mode == "twisted" and not p.reactor.readers
    assert produces_for(p.client, p.remote) and produces_for(p.remote, p.client)
    assert ("stopReading",) not in p.client.calls() + p.remote.calls()
    assert ("resumeProducing",) in p.client.calls() and ("resumeProducing",) in p.remote.calls()


def test_a_relay_not_asked_to_splice_never_pauses_for_it():
    for splice in (None, False):  # the default is Twisted's relay
        p = SplicePair(splice=splice)
        try:
            p.reach_splice_after()
            p.relay.data(p.relay.client, b"u" * SPLICE_AFTER)
            assert not any(entry[1] == "pauseProducing" for entry in p.log)
        finally:
            p.close()


def test_transports_that_cannot_be_spliced_are_checked_once(monkeypatch):
    checked: list[Any] = []

    def spliceable(transport: Any) -> bool:
        checked.append(transport)
        return False

    monkeypatch.setattr(relay_module, "spliceable", spliceable)
    p = Pair()
    p.relay._splice_possible = True
    p.data_up(b"u" * SPLICE_AFTER)
    p.data_up(b"u" * SPLICE_AFTER)
    assert checked == [p.client]  # the first one refused: all() stops there
    assert not any(entry[1] == "pauseProducing" for entry in p.log)


def test_a_half_closed_relay_is_not_spliced(spliced):
    p = spliced
    p.relay.read_closed(p.relay.remote)
    del p.log[:]
    p.reach_splice_after()
    assert not any(entry[1] == "pauseProducing" for entry in p.log)
    assert p.client.producer is None or p.client.streaming is True


@pytest.mark.parametrize("relay_setting, pauses", [("splice", True), ("twisted", False)])
def test_for_connection_takes_the_settings(relay_setting, pauses):
    if not splice_available():
        skip_unless_strict("os.splice needs Linux")
    log: list[Call] = []
    client_far, client_near = tcp_pair()
    remote_far, remote_near = tcp_pair()
    try:
        client = SocketTransport("client", log, client_near)
        remote = SocketTransport("remote", log, remote_near)
        clock = SpliceReactor()
        settings = ServerSettings(
            relay=relay_setting, idle_timeout=30.0, linger_timeout=7.0, paused_check_interval=3.0
        )
        relay = Relay.for_connection(client, remote, clock, lambda r: None, settings)
        relay.start()
        remote.producer.pauseProducing()  # the client side is paused: asked after 3 s
        assert sorted(c.getTime() for c in clock.getDelayedCalls()) == [3.0, 30.0]
        remote.producer.resumeProducing()
        del log[:]
        relay.data(relay.client, b"u" * SPLICE_AFTER)
        assert any(entry[1] == "pauseProducing" for entry in log) is pauses
        relay.unsplice()
        relay.lost(relay.client)
        assert any(c.getTime() == 7.0 for c in clock.getDelayedCalls())
    finally:
        for sock in (client_far, client_near, remote_far, remote_near):
            sock.close()


def test_a_connection_lost_while_waiting_for_its_buffer_does_not_splice(spliced):
    p = spliced
    p.reach_splice_after()
    waiting = p.client.producer
    # the connection is lost: Twisted stops its producer and forgets it
    waiting.stopProducing()
    p.client.producer = None
    del p.log[:]
    waiting.resumeProducing()
    p.remote.producer.resumeProducing()
    assert p.client.calls() == []  # not cancelled again, not counted as drained
    assert p.relay.mode == "twisted" and not p.reactor.readers


class PausingTransport(SocketTransport):
    """Like Twisted's transports: a write past its buffer pauses the producer."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(data) > 1 and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def test_a_side_paused_by_the_bytes_handed_back_is_not_resumed():
    p = SplicePair(remote_class=PausingTransport)
    try:
        p.remote_far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        p.remote.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        p.relay.data(p.relay.remote, b"d")
        p.relay.data(p.relay.client, b"u")  # small writes: nothing paused yet
        p.relay.data(p.relay.remote, b"d" * (SPLICE_AFTER - 2))
        assert not p.relay.client.paused
        p.drain_both()
        p.flood(p.client_far, b"x" * 65536)
        del p.log[:]
        p.relay.unsplice()  # the pipe's bytes fill the remote's buffer: the client is paused
        assert p.client.calls()[-1] == ("pauseProducing",) and p.client.paused
        assert p.relay.client.paused and ("resumeProducing",) in p.remote.calls()
    finally:
        p.close()


def test_a_held_destination_pauses_the_remote_side_not_the_client(spliced):
    p = spliced
    p.client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    p.client_far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    p.reach_splice_after()
    p.drain_both()
    p.flood(p.remote_far, b"y" * 65536)
    assert p.relay.remote.paused and not p.relay.client.paused


def test_slotted_protocols_start_as_twisteds_protocol_does():
    """No transport, not connected, no factory, until a connection is made
    (Twisted and its tests read these; the slots hide Protocol's defaults)."""
    from socksident.server import SOCKS4ServerFactory

    remote = RemoteProtocol()
    assert (remote.transport, remote.connected, remote.factory) == (None, 0, None)
    factory = SOCKS4ServerFactory(reactor=Clock())
    server = factory.buildProtocol(None)
    assert (server.transport, server.connected, server.factory) == (None, 0, factory)
