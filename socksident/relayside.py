"""One connection of a relay's pair, and what has happened to it.

`relay.Relay` holds two, one per connection, for as long as the relay lasts;
the protocols on both connections hand their events to the relay with their
own side.  A side is also its transport as the peer's push producer, telling
the relay when it is paused: a paused socket is one the reactor no longer
watches.  (One object per side, not two: a relay may idle for days.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from socksident.relay import Relay

__all__ = ["RelaySide"]


@implementer(IPushProducer)
class RelaySide:
    """One connection of the pair and what has happened to it."""

    __slots__ = ("name", "transport", "relay", "peer", "bytes_received", "read_closed", "lost",
                 "has_producer", "paused", "closing")  # two per relay, for as long as it lasts

    def __init__(self, name: str, transport: Any, relay: "Relay") -> None:
        self.name = name
        self.transport = transport
        self.relay = relay
        self.peer: Optional[RelaySide] = None
        self.bytes_received = 0
        self.read_closed = False
        self.lost = False
        self.has_producer = False  # the peer's transport is registered on ours
        self.paused = False  # by the peer's full write buffer
        self.closing = False  # a close (flush, then close) was asked of it

    def unregister_producer(self) -> None:
        if self.has_producer:
            self.has_producer = False
            self.transport.unregisterProducer()

    # -- as the peer transport's producer -------------------------------------

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()
        self.relay._paused(self, True)

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()
        self.relay._paused(self, False)

    def stopProducing(self) -> None:
        self.transport.stopProducing()
