"""Moving bytes both ways once a request is granted.

Each transport is registered as the other's streaming producer, as Twisted's
portforward does, so a slow reader pauses the fast writer and the proxy's
memory stays flat.  On top of that: half-close (a FIN on one side becomes a
write shutdown on the other, and the other direction keeps flowing), close
propagation that flushes what is pending before closing, an optional idle
timeout, and byte counts for the access log.

Twisted will not close a transport that still has a producer registered, so
every shutdown below unregisters first.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident._types import DelayedCall, ReactorTime

__all__ = ["PendingEvents", "Relay", "RelaySide", "RemoteProtocol"]


class RelaySide:
    """One connection of the pair and what has happened to it."""

    def __init__(self, name: str, transport: Any) -> None:
        self.name = name
        self.transport = transport
        self.peer: Optional[RelaySide] = None
        self.bytes_received = 0
        self.read_closed = False
        self.lost = False
        self.has_producer = False  # the peer's transport is registered on ours

    def unregister_producer(self) -> None:
        if self.has_producer:
            self.has_producer = False
            self.transport.unregisterProducer()


class Relay:
    """Pairs the client's connection with the destination's.

    The protocols on both connections call `data`, `read_closed` and `lost`
    with their own `RelaySide`; `on_finished` runs once both are gone.
    """

    def __init__(
        self,
        client_transport: Any,
        remote_transport: Any,
        reactor: ReactorTime,
        on_finished: Callable[["Relay"], None],
        idle_timeout: Optional[float] = None,
    ) -> None:
        self.client = RelaySide("client", client_transport)
        self.remote = RelaySide("remote", remote_transport)
        self.client.peer, self.remote.peer = self.remote, self.client
        self._reactor = reactor
        self._on_finished = on_finished
        self._idle_timeout = idle_timeout
        self._idle_call: Optional[DelayedCall] = None
        self.finished = False
        self.idle_closed = False

    @property
    def bytes_up(self) -> int:
        """Bytes from the client to the destination."""
        return self.client.bytes_received

    @property
    def bytes_down(self) -> int:
        """Bytes from the destination to the client."""
        return self.remote.bytes_received

    def start(self, early_data: bytes = b"") -> None:
        """Pair the transports and deliver what the client sent ahead of its reply.

        The callers resume reading on each side once its protocol is attached.
        """
        client, remote = self.client.transport, self.remote.transport
        if early_data:
            # Written before the pairing, so a full buffer cannot pause the
            # client before the caller resumes it; the next write will.
            self.data(self.client, early_data)
        client.registerProducer(remote, True)
        remote.registerProducer(client, True)
        self.client.has_producer = self.remote.has_producer = True
        self._arm_idle_timer()

    def data(self, side: RelaySide, data: bytes) -> None:
        side.bytes_received += len(data)
        assert side.peer is not None
        if not side.peer.lost:
            side.peer.transport.write(data)
        self._arm_idle_timer()

    def read_closed(self, side: RelaySide) -> None:
        """A FIN from one side: shut the other side's write half, keep the rest."""
        if side.read_closed or side.lost:
            return
        side.read_closed = True
        peer = side.peer
        assert peer is not None
        if peer.read_closed:
            self._close(side)
            self._close(peer)
        elif not peer.lost:
            peer.unregister_producer()
            if ISSLTransport.providedBy(peer.transport):
                # TLS's EOF is close_notify (a bare FIN under it reads as
                # truncation); Twisted sends it and keeps reading until the
                # peer's own close_notify, so the other direction still flows.
                peer.transport.loseConnection()
            else:
                peer.transport.loseWriteConnection()

    def lost(self, side: RelaySide) -> None:
        if side.lost:
            return
        side.lost = True
        assert side.peer is not None
        self._close(side.peer)
        if side.peer.lost:
            self._finish()

    def _close(self, side: RelaySide) -> None:
        if not side.lost:
            side.unregister_producer()
            side.transport.loseConnection()

    def _arm_idle_timer(self) -> None:
        if self._idle_timeout is None or self.finished:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._idle_timeout)
        else:
            self._idle_call = self._reactor.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        """Nothing moved for the whole timeout: abort, since a peer that does
        not read would hold a flushing close open for ever."""
        self._idle_call = None
        self.idle_closed = True
        for side in (self.client, self.remote):
            if not side.lost:
                side.unregister_producer()
                side.transport.abortConnection()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self._on_finished(self)


class PendingEvents:
    """What one connection did before its relay existed, to replay in order.

    Bytes (the caller bounds them: the client by pausing or refusing, the
    destination by staying paused), then at most one end: a FIN or a loss.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.size = 0
        self.read_closed = False
        self.lost = False

    def data(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)

    def take_data(self) -> bytes:
        """The bytes kept so far, in order; they are not replayed again."""
        data, self._chunks = b"".join(self._chunks), []
        return data

    def replay(self, relay: Relay, side: RelaySide) -> None:
        """Hand the kept events to `relay` as `side`'s; resume reading a side
        that is still open, since it was held paused until now."""
        data = self.take_data()
        if data:
            relay.data(side, data)
        if self.lost:
            relay.lost(side)
        elif self.read_closed:
            relay.read_closed(side)
        else:
            side.transport.resumeProducing()


@implementer(IHalfCloseableProtocol)
class RemoteProtocol(Protocol):
    """The proxy's connection to the destination (CONNECT) or from it (BIND).

    It holds its transport paused until a relay is attached, so nothing is
    read before the client has its reply; events that happen before that
    are kept and replayed.
    """

    transport: Any  # a TCP transport: also a push producer and a consumer

    def __init__(self) -> None:
        self.relay: Optional[Relay] = None
        self.side: Optional[RelaySide] = None
        self.pending = PendingEvents()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()

    def attach(self, relay: Relay) -> None:
        """Join a started relay, replaying what happened while we waited."""
        self.relay, self.side = relay, relay.remote
        self.pending.replay(relay, relay.remote)

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None and self.side is not None:
            self.relay.data(self.side, data)
        else:  # a transport that cannot pause at once; bounded by one read
            self.pending.data(data)

    def readConnectionLost(self) -> None:
        if self.relay is not None and self.side is not None:
            self.relay.read_closed(self.side)
        else:
            self.pending.read_closed = True

    def writeConnectionLost(self) -> None:
        """Our FIN went out; the other direction may still carry data."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relay is not None and self.side is not None:
            self.relay.lost(self.side)
        else:
            self.pending.lost = True
