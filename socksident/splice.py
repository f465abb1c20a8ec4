"""Zero-copy relaying on Linux: socket -> pipe -> socket with `os.splice`.

While both sides of a relay are plain TCP and open, the bytes need not
climb into Python at all: the kernel moves them from one socket into a pipe
and from the pipe into the other socket.  `Splicer` does that for both
directions of one relay, driven by the reactor on the raw descriptors
(level-triggered: a direction that stops early is simply called again).

Flow control is the pipe: while a direction's pipe holds bytes the
destination has not taken, its source is not read, so a slow reader holds
back the kernel's receive buffer on the fast side, as the Twisted relay's
producers do.  Everything that is not steady flow (a FIN, an error, a
time limit) is the Twisted relay's business: `stop()` gives back the bytes
still in the pipes, and `relay.Relay` writes them through the transports
and carries on.  The splicer never closes a socket it did not create.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from typing import Any, Optional, Protocol

from twisted.internet.interfaces import IReadWriteDescriptor, ISSLTransport
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["SpliceEvents", "Splicer", "splice_available", "spliceable"]

_SPLICE_F_MOVE = 1
_SPLICE_F_NONBLOCK = 2
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20  # as large as an unprivileged process may ask by default
_ROUNDS = 16  # splice calls per direction per wake-up, so neither starves the other
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


def splice_available() -> bool:
    """Whether this platform has `os.splice` (Linux, Python 3.10+)."""
    return sys.platform.startswith("linux") and hasattr(os, "splice")


def spliceable(transport: Any) -> bool:
    """A plain TCP transport of the reactor (not TLS, not a wrapper)."""
    if ISSLTransport.providedBy(transport):
        return False
    sock = getattr(transport, "socket", None)
    return (
        isinstance(sock, socket.socket)
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
        and hasattr(transport, "stopReading")
        and hasattr(transport, "stopWriting")
    )


class SpliceEvents(Protocol):
    """What the splicer tells its relay (`relay.Relay`), by side name."""

    def spliced(self, source: str, count: int) -> None:
        """`count` more bytes were read from `source`."""

    def blocked(self, source: str, held: bool) -> None:
        """`source` is not read (its bytes wait for the other side), or is again."""

    def irregular(self) -> None:
        """A FIN or an error on either socket: time for the Twisted relay."""


class _Direction:
    """One way through the pipe: from `source`'s socket to `sink`'s."""

    def __init__(self, source: str, source_fd: int, sink_fd: int) -> None:
        self.source = source
        self.source_fd = source_fd
        self.sink_fd = sink_fd
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the system's limit is lower: the default pipe still works
        self.queued = 0  # in the pipe, not yet taken by the sink
        self.ended = False  # the source sent its FIN, or a socket failed
        self.held = False  # the source is not read until the sink takes the pipe's bytes

    def pump(self, events: SpliceEvents) -> None:
        """Move what can be moved now; `ended` once the source is done."""
        flags = _SPLICE_F_MOVE | _SPLICE_F_NONBLOCK
        for _ in range(_ROUNDS):
            if self.queued:
                try:
                    self.queued -= os.splice(self.pipe_r, self.sink_fd, self.queued, flags=flags)
                except OSError as error:
                    if error.errno not in _AGAIN:
                        self.ended = True  # the sink failed: the Twisted relay reports it
                    return
                if self.queued:
                    continue
            try:
                count = os.splice(self.source_fd, self.pipe_w, PIPE_SIZE, flags=flags)
            except OSError as error:
                if error.errno not in _AGAIN:
                    self.ended = True
                return
            if count == 0:
                self.ended = True
                return
            self.queued += count
            events.spliced(self.source, count)

    def take_back(self) -> bytes:
        """The bytes still in the pipe, and the pipe closed."""
        chunks = []
        while self.queued > 0:
            try:
                chunk = os.read(self.pipe_r, self.queued)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            self.queued -= len(chunk)
        os.close(self.pipe_r)
        os.close(self.pipe_w)
        return b"".join(chunks)


@implementer(IReadWriteDescriptor)
class _Socket:
    """One relay socket as the reactor sees it while the splicer owns it:
    readable feeds the direction it is the source of, writable drains the
    one it is the sink of."""

    def __init__(self, splicer: "Splicer", fd: int, name: str) -> None:
        self._splicer = splicer
        self._fd = fd
        self.name = name
        self.outgoing: Optional[_Direction] = None
        self.incoming: Optional[_Direction] = None

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return f"splice-{self.name}"

    def doRead(self) -> None:
        assert self.outgoing is not None
        self._splicer._pump(self.outgoing)

    def doWrite(self) -> None:
        assert self.incoming is not None
        self._splicer._pump(self.incoming)

    def connectionLost(self, reason: Failure) -> None:
        """Never called: doRead and doWrite return None."""


class Splicer:
    """Both directions of one relay through two pipes, until `stop()`.

    Creating one raises OSError when the process is out of descriptors
    (each relay spliced holds four more: two pipes).
    """

    def __init__(
        self,
        reactor: Any,
        client_fd: int,
        remote_fd: int,
        events: SpliceEvents,
    ) -> None:
        self._reactor = reactor
        self._events = events
        self._client = _Socket(self, client_fd, "client")
        self._remote = _Socket(self, remote_fd, "remote")
        self._up = _Direction("client", client_fd, remote_fd)
        try:
            self._down = _Direction("remote", remote_fd, client_fd)
        except OSError:
            self._up.take_back()  # closes its pipe
            raise
        self._client.outgoing = self._remote.incoming = self._up
        self._remote.outgoing = self._client.incoming = self._down
        self._reading: set[_Socket] = set()
        self._writing: set[_Socket] = set()
        self.running = True

    def start(self) -> None:
        """Watch both sources; a direction with bytes queued watches its sink."""
        for direction in (self._up, self._down):
            self._watch(direction)

    def stop(self) -> dict[str, bytes]:
        """Hand the sockets back: unwatch them and return each source's
        bytes still in its pipe (for the Twisted relay to write on)."""
        self.running = False
        for sock in self._reading:
            self._reactor.removeReader(sock)
        for sock in self._writing:
            self._reactor.removeWriter(sock)
        self._reading.clear()
        self._writing.clear()
        return {"client": self._up.take_back(), "remote": self._down.take_back()}

    def _pump(self, direction: _Direction) -> None:
        if not self.running:
            return
        direction.pump(self._events)
        if direction.ended:
            self._events.irregular()
        elif self.running:
            self._watch(direction)

    def _watch(self, direction: _Direction) -> None:
        """Read the source while the pipe is empty, else wait for the sink."""
        source = self._client if direction is self._up else self._remote
        sink = self._remote if direction is self._up else self._client
        held = direction.queued > 0
        if held:
            self._set(self._reading, source, False, self._reactor.removeReader)
            self._set(self._writing, sink, True, self._reactor.addWriter)
        else:
            self._set(self._writing, sink, False, self._reactor.removeWriter)
            self._set(self._reading, source, True, self._reactor.addReader)
        if held != direction.held:
            direction.held = held
            self._events.blocked(direction.source, held)

    @staticmethod
    def _set(watched: set[_Socket], sock: _Socket, on: bool, change: Any) -> None:
        if (sock in watched) != on:
            change(sock)
            (watched.add if on else watched.discard)(sock)
