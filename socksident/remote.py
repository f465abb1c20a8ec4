"""The destination's side of a relay, and what either side did before the relay existed.

`RemoteProtocol` reads nothing more from the destination once it has kept one
read, until the client has its reply and the relay is attached;
`PendingEvents` keeps, for it and for the client, the bytes and the end that
came before, to replay in order.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident.relay import Relay
from socksident.relayside import RelaySide

__all__ = ["PendingEvents", "RemoteProtocol"]


class PendingEvents:
    """What one connection did before its relay existed, to replay in order.

    Bytes (the caller bounds them: the client by pausing or refusing, the
    destination by staying paused), then at most one end: a FIN or a loss.
    """

    __slots__ = ("_chunks", "size", "read_closed", "lost")  # two per connection

    def __init__(self) -> None:
        self._chunks: Optional[list[bytes]] = None  # most connections send none
        self.size = 0
        self.read_closed = False
        self.lost = False

    def data(self, data: bytes) -> None:
        if self._chunks is None:
            self._chunks = []
        self._chunks.append(data)
        self.size += len(data)

    def take_data(self) -> bytes:
        """The bytes kept so far, in order; they are not replayed again."""
        chunks, self._chunks = self._chunks, None
        return b"".join(chunks) if chunks else b""

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
            relay.resume(side)


@implementer(IHalfCloseableProtocol)
class RemoteProtocol(Protocol):
    """The proxy's connection to the destination (CONNECT) or from it (BIND).

    Until a relay is attached, it keeps what happens and replays it then.
    It pauses its transport at the first bytes that come before the relay,
    so at most one read is held; it does not pause on connecting, because
    the reply and the relay usually follow in the same reactor turn, and a
    pause and resume would be two ``epoll_ctl`` calls for nothing.
    """

    # One per relay: slots, for Protocol's own attributes too.
    __slots__ = ("transport", "connected", "factory", "relay", "pending")

    transport: Any  # a TCP transport: also a push producer and a consumer

    def __init__(self) -> None:
        self.transport = None
        self.connected = 0
        self.factory = None
        self.relay: Optional[Relay] = None  # attached: this is its remote side
        self.pending: Optional[PendingEvents] = PendingEvents()  # None once attached

    def attach(self, relay: Relay) -> None:
        """Join a started relay, replaying what happened while we waited."""
        self.relay = relay
        pending, self.pending = self.pending, None
        assert pending is not None
        pending.replay(relay, relay.remote)

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.data(self.relay.remote, data)
        else:
            assert self.pending is not None
            self.pending.data(data)
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        if self.relay is not None:
            self.relay.read_closed(self.relay.remote)
        else:
            assert self.pending is not None
            self.pending.read_closed = True

    def writeConnectionLost(self) -> None:
        """Our FIN went out; the other direction may still carry data."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relay is not None:
            self.relay.lost(self.relay.remote)
        else:
            assert self.pending is not None
            self.pending.lost = True
