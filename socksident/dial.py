"""Dialling one TCP address: Twisted's transport, without Twisted's connector.

`reactor.connectTCP` builds a `Connector` and a `Client` transport that
keeps the connector, and with it the factory and its Deferred, for the
whole life of the connection; it makes its socket in four system calls,
watches it for reading and writing while it connects, and calls
``connect`` once more when it is done.  A relay's remote side needs none of
that, and a proxy holding thousands of idle relays pays for it in memory,
as it pays on every CONNECT in CPU.

`dial` makes the socket non-blocking and close-on-exec in one call, watches
it for writability only, and on success wraps it in a `DialledConnection`:
a `tcp.Connection`, Twisted's own transport, so writes, flow control,
half-close, the linger checks and the splice hand-over treat it like any
other.  A reactor that does not run on file descriptors (a memory reactor
in tests, IOCP), or a platform without ``SOCK_NONBLOCK``, dials through
the reactor's own `connectTCP` instead.

There is no timer here: every caller already has a deadline, and
cancelling the Deferred stops the attempt and closes the socket.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Optional

from twisted.internet import abstract, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectBindError, ConnectError, getConnectError
from twisted.internet.interfaces import IConnector, IProtocol, IProtocolFactory, IWriteDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["DialledConnection", "dial"]

#: Made non-blocking by socket() itself where the platform can (Python makes
#: every socket close-on-exec already); elsewhere `dial` uses `connectTCP`.
_NONBLOCK: Optional[int] = getattr(socket, "SOCK_NONBLOCK", None)
#: Linux's "bind the address, leave the port to connect()": connect() then
#: picks a port by the whole address pair, so connections to different
#: destinations share source ports.  A port picked by bind() is taken for
#: every destination: a proxy connecting out (or asking identds) from one
#: address could otherwise hold no more connections from it than the
#: ephemeral range has ports.
_BIND_ADDRESS_NO_PORT: Optional[int] = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)
#: connect()'s answers that mean "under way" on a non-blocking TCP socket
#: (0: done already; writability follows at once either way).
_UNDER_WAY = (0, errno.EINPROGRESS)


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


class DialledConnection(tcp.Connection):
    """A TCP connection `dial` made: reads at once, knows both its addresses.

    It keeps only what the peer's address needs (the destination's host
    and port, as two attributes: a tuple would cost more); the log prefix
    is one string for all of them.
    """

    logstr = "dialled"
    _tlsClientDefault = True  # startTLS on it would be the client's side
    # Made close-on-exec, the socket is this process's alone, so close()
    # sends the FIN: no shutdown(2) before it (one system call a relay).
    _shouldShutdown = False

    def __init__(
        self, sock: socket.socket, protocol: IProtocol, host: str, port: int, reactor: Any
    ) -> None:
        # tcp.Connection.__init__ but for its setblocking(False): socket()
        # made this one non-blocking, and the call would be one more ioctl a relay.
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = sock
        self.fileno = sock.fileno
        self.protocol = protocol
        self._peer_host = host
        self._peer_port = port
        self.connected = True
        self.startReading()

    def getPeer(self) -> IPv4Address | IPv6Address:
        return _address(self._peer_host, self._peer_port)

    def getHost(self) -> IPv4Address | IPv6Address:
        host, port = self.socket.getsockname()[:2]
        return _address(host, port)

    def __repr__(self) -> str:
        return f"<DialledConnection to {self._peer_host}:{self._peer_port}>"


@implementer(IWriteDescriptor)
class _Dialling:
    """A socket while it connects: watched for writability, then handed on."""

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        factory: IProtocolFactory,
        sock: socket.socket,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.factory = factory
        self.socket = sock
        self.fileno = sock.fileno
        self.done: Deferred[IProtocol] = Deferred(self._cancel)

    def logPrefix(self) -> str:
        return "dialling"

    def doWrite(self) -> None:
        """Writable: connected, or failed."""
        self.reactor.removeWriter(self)
        self._settle()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw an error or a hang-up (a refusal) and stopped watching."""
        self._settle()

    def _settle(self) -> None:
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(getConnectError((err, os.strerror(err))))
        else:
            self._connected()

    def _connected(self) -> None:
        protocol = self.factory.buildProtocol(_address(self.host, self.port))
        if protocol is None:
            self._fail(ConnectError(string="the factory built no protocol"))
            return
        transport = DialledConnection(self.socket, protocol, self.host, self.port, self.reactor)
        protocol.makeConnection(transport)
        self.done.callback(protocol)

    def _fail(self, reason: Exception) -> None:
        self.socket.close()
        self.done.errback(reason)

    def _cancel(self, done: Deferred[IProtocol]) -> None:
        self.reactor.removeWriter(self)
        self.socket.close()  # the Deferred then fails with CancelledError


def dial(
    reactor: Any,
    host: str,
    port: int,
    factory: IProtocolFactory,
    source: Optional[str] = None,
) -> Deferred[IProtocol]:
    """Connect to `host` (an IP address) on `port`, leaving from `source` if given.

    Fires with the protocol `factory` built, once it has its transport;
    fails with Twisted's `ConnectError` of the kind that happened
    (refused, unreachable, `ConnectBindError` for the source address).
    Cancelling stops the attempt (CancelledError).
    """
    if _NONBLOCK is None or not isinstance(reactor, PosixReactorBase):
        return _through_connector(reactor, host, port, factory, source)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
    except OSError as error:  # out of descriptors, or no such family here
        return fail(getConnectError(error))
    attempt = _Dialling(reactor, host, port, factory, sock)
    try:
        if source is not None:
            if _BIND_ADDRESS_NO_PORT is not None:
                sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
    except OSError as error:
        attempt._fail(ConnectBindError(error.errno, error.strerror))
        return attempt.done
    try:
        result = sock.connect_ex((host, port))
    except OSError as error:  # an address the socket cannot even take
        attempt._fail(getConnectError(error))
        return attempt.done
    if result in _UNDER_WAY:
        reactor.addWriter(attempt)
    else:
        attempt._fail(getConnectError((result, os.strerror(result))))
    return attempt.done


class _OneConnection(ClientFactory):
    """`dial` through `connectTCP`, for reactors that do not run on descriptors."""

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        self.factory = factory
        self.connector: Any = None  # set as soon as connectTCP returns
        self.done: Deferred[IProtocol] = Deferred(self._cancel)

    def _cancel(self, done: Deferred[IProtocol]) -> None:
        self.connector.stopConnecting()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.factory.buildProtocol(addr)
        if protocol is None:
            return None
        made = protocol.makeConnection

        def announce(transport: Any) -> None:
            # Twisted calls this right after buildProtocol, in the same turn:
            # the Deferred fires once the protocol has its transport.  The
            # protocol lives as long as the relay: it keeps no closure.
            del protocol.makeConnection
            made(transport)
            if self.done.called:  # cancelled while it connected
                transport.abortConnection()
            else:
                self.done.callback(protocol)

        protocol.makeConnection = announce  # type: ignore[method-assign]
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.done.called:
            self.done.errback(reason)


def _through_connector(
    reactor: Any, host: str, port: int, factory: IProtocolFactory, source: Optional[str]
) -> Deferred[IProtocol]:
    attempt = _OneConnection(factory)
    try:
        attempt.connector = reactor.connectTCP(
            host, port, attempt, timeout=None, bindAddress=None if source is None else (source, 0)
        )
    except OSError as error:  # a reactor that cannot even start (out of sockets)
        return fail(getConnectError(error))
    return attempt.done
