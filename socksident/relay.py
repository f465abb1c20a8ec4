"""Moving bytes both ways once a request is granted.

Each transport is registered as the other's streaming producer, as Twisted's
portforward does, so a slow reader pauses the fast writer and the proxy's
memory stays flat.  On top of that: half-close (a FIN on one side becomes a
write shutdown on the other, and the other direction keeps flowing), close
propagation that flushes what is pending before closing, an optional idle
timeout, and byte counts for the access log.

The linger contract (`socksident.linger`): once one side is gone, the other
gets `linger_timeout` seconds to take what is queued for it, then it is
aborted and the bytes still queued are counted as dropped; a side held
paused is asked every `paused_check_interval` seconds whether it was reset,
since the reactor does not watch a paused socket.  A half-closed relay (one
side sent its FIN, the other is still open) is not over: only data, the
open side's own end, or the idle timeout end it.

Twisted will not close a transport that still has a producer registered, so
every shutdown below unregisters first.

With `splice`, once a relay has moved `SPLICE_AFTER` bytes and both
transports have written everything Twisted holds for them, it hands the two sockets to a
`splice.Splicer` and the bytes stop passing through Python; any event that
is not steady flow (a FIN, an error, a time limit, a reset, the server
cutting the connection off) gives the sockets, and the bytes still in the
pipes, back to the Twisted relay first, so that all of the above holds on
both paths.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IPullProducer, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from socksident import linger
from socksident._types import DelayedCall, ReactorTime
from socksident.settings import ServerSettings
from socksident.relayside import RelaySide
from socksident.splice import Splicer, spliceable, splice_available
from socksident.writenow import close_now, close_write_now, write_now

__all__ = ["Relay", "RelaySide"]

log = Logger()

#: Bytes a relay moves through Twisted before it is spliced: most short
#: exchanges end before this and never pay for the pipes.
SPLICE_AFTER = 128 * 1024


@implementer(IPullProducer)
class _UntilDrained:
    """Told by a transport each time its write buffer empties (a pull
    producer is asked for more then); tells the relay once it is empty."""

    def __init__(self, relay: "Relay", side: RelaySide) -> None:
        self._relay = relay
        self._side = side
        self.active = True
        side.transport.registerProducer(self, False)  # asks resumeProducing at once

    def resumeProducing(self) -> None:
        if self.active and linger.buffered_in_twisted(self._side.transport) == 0:
            self.cancel()
            self._relay._drained(self._side)

    def stopProducing(self) -> None:
        self.active = False  # the connection is lost: the relay hears of it

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self._side.transport.unregisterProducer()


class Relay:
    """Pairs the client's connection with the destination's.

    The protocols on both connections call `data`, `read_closed` and `lost`
    with their own `RelaySide`; `on_finished` runs once both are gone, with
    `cut_off` naming the side(s) aborted at the end of the linger time and
    `dropped` the bytes still queued for them.
    """

    __slots__ = ("client", "remote", "_reactor", "_on_finished", "_idle_timeout", "_idle_call",
                 "_linger_timeout", "_linger_call", "_check_interval", "_check_call", "_is_reset",
                 "finished", "idle_closed", "cut_off", "dropped", "_splice_possible",
                 "_splice_wanted", "_waiting", "_drained_sides", "_splicer", "mode")  # per relay

    def __init__(
        self,
        client_transport: Any,
        remote_transport: Any,
        reactor: ReactorTime,
        on_finished: Callable[["Relay"], None],
        idle_timeout: Optional[float] = None,
        linger_timeout: float = ServerSettings.linger_timeout,
        paused_check_interval: float = ServerSettings.paused_check_interval,
        is_reset: Callable[[Any], bool] = linger.is_reset,
        splice: bool = False,
    ) -> None:
        self.client = RelaySide("client", client_transport, self)
        self.remote = RelaySide("remote", remote_transport, self)
        self.client.peer, self.remote.peer = self.remote, self.client
        self._reactor = reactor
        self._on_finished = on_finished
        self._idle_timeout = idle_timeout
        self._idle_call: Optional[DelayedCall] = None
        self._linger_timeout = linger_timeout
        self._linger_call: Optional[DelayedCall] = None
        self._check_interval = paused_check_interval
        self._check_call: Optional[DelayedCall] = None
        self._is_reset = is_reset
        self.finished = False
        self.idle_closed = False
        self.cut_off: linger.CutOff = None
        self.dropped = 0
        self._splice_possible = splice  # until it is tried (or it is too late)
        self._splice_wanted = False  # waiting for Twisted's buffers to drain
        self._waiting: tuple[_UntilDrained, ...] = ()
        self._drained_sides: tuple[str, ...] = ()  # small: no set per relay
        self._splicer: Optional[Splicer] = None
        self.mode = "twisted"  # "splice" once the kernel moved the bytes

    @classmethod
    def for_connection(
        cls,
        client_transport: Any,
        remote_transport: Any,
        reactor: ReactorTime,
        on_finished: Callable[["Relay"], None],
        settings: ServerSettings,
    ) -> "Relay":
        """A relay under `settings`' time limits, spliced when `--relay splice`
        (once it is worth it, and if both transports can be: `_prepare_splice`)."""
        return cls(
            client_transport,
            remote_transport,
            reactor,
            on_finished,
            settings.idle_timeout,
            settings.linger_timeout,
            settings.paused_check_interval,
            splice=settings.relay == "splice",
        )

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
        self._pair(client, remote)
        self._arm_idle_timer()

    def _pair(self, client: Any, remote: Any) -> None:
        client.registerProducer(self.remote, True)
        remote.registerProducer(self.client, True)
        self.client.has_producer = self.remote.has_producer = True

    def resume(self, side: RelaySide) -> None:
        """`side`'s events from before the relay are replayed: read it from now
        (unless both sides wait to be spliced: then the splicer reads it)."""
        if not self._splice_wanted:
            side.transport.resumeProducing()

    def _prepare_splice(self) -> None:
        """A connection that has moved `SPLICE_AFTER` bytes is worth two pipes:
        stop reading both sides, and splice once Twisted's buffers are empty.
        Checked here, not per connection: most relays never get this far."""
        self._splice_possible = False
        sides = (self.client, self.remote)
        if not splice_available() or not all(spliceable(side.transport) for side in sides):
            return
        if any(side.read_closed or side.lost or side.closing for side in sides):
            return
        for side in sides:
            side.unregister_producer()
            side.transport.pauseProducing()
        self._splice_wanted = True
        self._waiting = (_UntilDrained(self, self.client), _UntilDrained(self, self.remote))

    def _drained(self, side: RelaySide) -> None:
        if side.name not in self._drained_sides:
            self._drained_sides += (side.name,)
        if len(self._drained_sides) == 2 and self._splice_wanted:
            self._splice_wanted = False
            self._waiting = ()
            client, remote = self.client.transport, self.remote.transport
            try:
                splicer = Splicer(self._reactor, client.fileno(), remote.fileno(), self)
            except OSError as error:
                log.warn("no splice relay ({error}): relaying through Twisted", error=error)
                self._back_to_twisted({})
                return
            for transport in (client, remote):
                transport.stopReading()
                transport.stopWriting()
            self._splicer = splicer
            self.mode = "splice"
            splicer.start()

    def unsplice(self) -> None:
        """From here on, the Twisted relay: before any event that is not
        steady flow, and before anyone aborts a transport of this relay."""
        splicer, self._splicer = self._splicer, None
        if splicer is not None:
            left = splicer.stop()
        elif self._splice_wanted:
            self._splice_wanted = False
            for waiting in self._waiting:
                waiting.cancel()
            left = {}
        else:
            return
        self._back_to_twisted(left)

    def _back_to_twisted(self, left: dict[str, bytes]) -> None:
        """Pair the transports again, write what the pipes held, read again."""
        self._pair(self.client.transport, self.remote.transport)
        sides = (self.client, self.remote)
        for side in sides:
            side.paused = False
        for side in sides:
            if left.get(side.name):
                assert side.peer is not None
                write_now(side.peer.transport, left[side.name])  # may pause `side` again
        for side in sides:
            # Neither side is lost or read-closed here: both are recorded
            # only after unsplice has run.
            if not side.paused:
                side.transport.resumeProducing()

    # -- what the splicer tells (`splice.SpliceEvents`) -----------------------------

    def spliced(self, source: str, count: int) -> None:
        (self.client if source == "client" else self.remote).bytes_received += count
        self._arm_idle_timer()

    def blocked(self, source: str, held: bool) -> None:
        self._paused(self.client if source == "client" else self.remote, held)

    def irregular(self) -> None:
        self.unsplice()

    def data(self, side: RelaySide, data: bytes) -> None:
        side.bytes_received += len(data)
        assert side.peer is not None
        if not side.peer.lost:
            write_now(side.peer.transport, data)
        self._arm_idle_timer()
        if self._splice_possible and self.bytes_up + self.bytes_down >= SPLICE_AFTER:
            self._prepare_splice()

    def read_closed(self, side: RelaySide) -> None:
        """A FIN from one side: shut the other side's write half, keep the rest."""
        if side.read_closed or side.lost:
            return
        self.unsplice()
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
                close_write_now(peer.transport)

    def lost(self, side: RelaySide) -> None:
        if side.lost:
            return
        self.unsplice()
        side.lost = True
        side.paused = False
        assert side.peer is not None
        self._close(side.peer)
        if side.peer.lost:
            self._finish()

    def _close(self, side: RelaySide) -> None:
        """Flush, then close; the linger time bounds the flush."""
        if side.lost or side.closing:
            return
        side.closing = True
        side.unregister_producer()
        close_now(side.transport)
        if not side.lost and (self._linger_call is None or not self._linger_call.active()):
            self._linger_call = self._reactor.callLater(self._linger_timeout, self._linger_over)

    def _linger_over(self) -> None:
        """The peer had its time to take what was queued: abort what is left."""
        self._linger_call = None
        cut = [side for side in (self.client, self.remote) if side.closing and not side.lost]
        if not cut:
            return
        self.cut_off = cut[0].name if len(cut) == 1 else "both"
        for side in cut:
            self.dropped += linger.queued_bytes(side.transport)
            side.transport.abortConnection()

    def _paused(self, side: RelaySide, paused: bool) -> None:
        if side.lost:
            return
        side.paused = paused
        if paused and (self._check_call is None or not self._check_call.active()):
            self._check_call = self._reactor.callLater(self._check_interval, self._check_paused)

    def _check_paused(self) -> None:
        """Abort a paused side whose peer reset it; its loss then runs as any other."""
        self._check_call = None
        still_paused = False
        for side in (self.client, self.remote):
            if not side.paused or side.lost:
                continue
            if self._is_reset(side.transport):
                self.unsplice()
                side.paused = False
                side.transport.abortConnection()
            else:
                still_paused = True
        if still_paused and not self.finished:
            self._check_call = self._reactor.callLater(self._check_interval, self._check_paused)

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
        self.unsplice()
        for side in (self.client, self.remote):
            if not side.lost:
                side.unregister_producer()
                side.transport.abortConnection()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for call in (self._idle_call, self._linger_call, self._check_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._linger_call = self._check_call = None
        self._on_finished(self)
