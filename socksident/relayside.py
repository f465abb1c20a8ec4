"""One connection of a relay's pair, and what has happened to it.

`relay.Relay` holds two, one per connection, for as long as the relay lasts;
the protocols on both connections hand their events to the relay with their
own side.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["RelaySide"]


class RelaySide:
    """One connection of the pair and what has happened to it."""

    __slots__ = ("name", "transport", "peer", "bytes_received", "read_closed", "lost",
                 "has_producer", "paused", "closing")  # two per relay, for as long as it lasts

    def __init__(self, name: str, transport: Any) -> None:
        self.name = name
        self.transport = transport
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
