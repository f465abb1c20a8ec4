"""Write to, half-close and close a plain TCP transport at once, not on the reactor's next turn.

`transport.write`, `loseWriteConnection` and `loseConnection` only queue: the
bytes, the FIN or the close happen when the reactor next finds the socket
writable, which costs two ``epoll_ctl`` calls (watch for writability, stop
watching) and a reactor turn each.  A SOCKS handshake and a short relayed
exchange are a few small writes, two half-closes and two closes, and those
round trips were a measurable part of the CPU a CONNECT costs.

All three act at once only when nothing is queued ahead (so the order of
bytes, FIN and close holds) and hand every other case to Twisted: flow
control, errors, TLS and a busy buffer stay Twisted's.  The half-close does
what Twisted's own write handler does once the buffer is empty
(`FileDescriptor.doWrite`), so the transport's state stays Twisted's too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["close_now", "close_write_now", "write_now"]


def _idle_plain_tcp(transport: Any) -> bool:
    """Whether `transport` is a connected plain TCP transport with nothing queued."""
    return bool(
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def write_now(transport: Any, data: bytes) -> None:
    """Send `data` on `transport` now if it can go now, else as `transport.write` would."""
    if not _idle_plain_tcp(transport):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:
        # A full buffer waits for writability; any other error Twisted meets
        # again on its own write, and closes the connection the way it always does.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def close_write_now(transport: Any) -> None:
    """Half-close `transport` now if nothing is queued, else as `loseWriteConnection` would."""
    if _idle_plain_tcp(transport):
        # FileDescriptor.doWrite, once its buffer is empty after a
        # loseWriteConnection: mark the half written-off, then shut it.
        transport._writeDisconnected = True
        transport._closeWriteConnection()
    else:
        transport.loseWriteConnection()


def close_now(transport: Any) -> None:
    """Close `transport` now if nothing is queued, else once it is flushed (`loseConnection`)."""
    if _idle_plain_tcp(transport):
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        # Twisted shuts a socket both ways before closing it, so that the FIN
        # goes even if a child process shares the descriptor.  The FIN has
        # just gone, and shutting the read half changes nothing on the wire:
        # the call would only fail (ENOTCONN once the peer's FIN is in).
        transport._shouldShutdown = False
    # With its write half shut, Twisted's loseConnection closes at once.
    transport.loseConnection()
