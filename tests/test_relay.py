"""`socksident.relay` on its own: `Relay` and `RemoteProtocol` with recording fakes.

Both fake transports write into one shared call log, so a test can assert the
order of calls across the pair (for example: a producer is unregistered before
the write half is shut, because Twisted will not finish closing a transport
that still has a producer registered).
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from socksident.relay import Relay
from socksident.remote import PendingEvents, RemoteProtocol

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
