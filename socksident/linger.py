"""The linger contract: no connection outlives its pair by more than a bound.

A flushing close (`loseConnection`) waits for the peer to take what is
queued, and a peer that never reads makes it wait for ever.  So once one
side of a relay is gone (closed or reset, not a half-close), the other side
gets `linger_timeout` seconds to take what is still queued for it, then it
is aborted, and the bytes still queued are counted as dropped.

A relay also has to notice that a side is gone while it is paused: a paused
TCP transport is not watched by the reactor at all, so a reset from a
client (or destination) that was paused because its peer does not read
goes unseen.  `is_reset` asks the kernel instead; the relay asks it, every
`paused_check_interval` seconds, about each side it holds paused.

Every relay (the Twisted `Relay`, any other implementation) keeps this
contract and reports the same two facts: which side was cut off, and how
many bytes it dropped.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any, Iterator, Optional

__all__ = ["CutOff", "buffered_in_twisted", "descriptor_socket", "is_reset", "queued_bytes"]

#: Which side a relay aborted at the end of its linger time: "client",
#: "remote" or "both"; None when every side closed on its own.
CutOff = Optional[str]

_TCP_CLOSE = 7  # tcp_states.h: a reset (or a completed close) leaves this state
_SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in the send queue the peer has not acknowledged


def _layers(transport: Any) -> Iterator[Any]:
    """The transport and those it wraps (TLS over TCP), outermost first."""
    for _ in range(8):
        if transport is None:
            return
        yield transport
        transport = getattr(transport, "transport", None)


def descriptor_socket(transport: Any) -> Optional[socket.socket]:
    """The kernel socket under `transport` (through a TLS layer), if it has one."""
    for layer in _layers(transport):
        sock = getattr(layer, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
    return None


def _kernel_queue(sock: socket.socket) -> int:
    if not sys.platform.startswith("linux"):
        return 0
    import fcntl

    try:
        raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])


def _buffered(layer: Any) -> int:
    """Bytes in one layer's write buffers (Twisted's FileDescriptor, or TLS's
    cleartext not yet encrypted)."""
    total = 0
    pending = getattr(layer, "_appSendBuffer", None)
    if isinstance(pending, list):
        total += sum(len(chunk) for chunk in pending)
    buffered = getattr(layer, "dataBuffer", None)
    if isinstance(buffered, bytes):
        total += len(buffered) - int(getattr(layer, "offset", 0))
        total += int(getattr(layer, "_tempDataLen", 0))
    return total


def buffered_in_twisted(transport: Any) -> int:
    """Bytes written to `transport` that Twisted has not handed to the kernel."""
    return sum(_buffered(layer) for layer in _layers(transport))


def queued_bytes(transport: Any) -> int:
    """Bytes written to `transport` that its peer has not taken.

    Twisted's write buffers (under TLS also the cleartext not yet encrypted,
    whose TCP buffer then holds encrypted bytes) plus, on Linux, the
    kernel's send queue.  Asked just before an abort, it is what the abort
    drops.
    """
    total = 0
    for layer in _layers(transport):
        total += _buffered(layer)
        sock = getattr(layer, "socket", None)
        if isinstance(sock, socket.socket):
            return total + _kernel_queue(sock)
    return total


def is_reset(transport: Any) -> bool:
    """Whether the connection under `transport` was reset by its peer.

    On Linux the TCP state says so without consuming anything (a reset
    socket is in state CLOSE); elsewhere a pending socket error does.  A FIN
    is not a reset: the bytes before it must still be read.
    """
    sock = descriptor_socket(transport)
    if sock is None or sock.fileno() < 0:
        return False
    try:
        tcp_info = getattr(socket, "TCP_INFO", None)
        if tcp_info is not None and sys.platform.startswith("linux"):
            return sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0] == _TCP_CLOSE
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    except OSError:
        return False
