"""One SOCKS4 client handshake: the request, its reply or typed error, one time limit.

`Handshake` sits between the proxy connection and the user's protocol: it
sends the request, reads the reply (BIND's two), and once granted passes
every event on, half-close included, as Twisted's own `_WrappingProtocol`
does.  `Attempt` is one connect to the proxy with one time limit.  The
endpoints of `socksident.client` are built on them.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional, Union

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident._types import DelayedCall, ReactorTime
from socksident.socks4 import (
    Command,
    ReplyCode,
    build_request,
    is_valid_hostname,
    parse_reply,
    refusal_for,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "Attempt",
    "Handshake",
    "HandshakeFactory",
    "HandshakeTimeout",
    "InvalidReply",
    "ProxyClosed",
    "SOCKS4ClientError",
    "ShortReply",
    "socks4_request",
]


#: Seconds from the start of the proxy connection to the (first) reply: the
#: protocol's two minutes to establish a connection.
DEFAULT_TIMEOUT = 120.0

_REPLY_SIZE = 8


class SOCKS4ClientError(Exception):
    """The proxy did not answer as SOCKS4 says; ``reason`` is for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidReply(SOCKS4ClientError):
    """Eight bytes that are not a SOCKS4 reply (version byte, reply code)."""


class ShortReply(SOCKS4ClientError):
    """The proxy closed the connection in the middle of its reply."""


class ProxyClosed(SOCKS4ClientError):
    """The proxy closed the connection before replying at all."""


class HandshakeTimeout(SOCKS4ClientError):
    """No reply within the endpoint's time limit."""


def socks4_request(command: Command, host: str, port: int, user: Union[bytes, str]) -> bytes:
    """The request for `host`: SOCKS4 for an IPv4 literal, SOCKS4A for a name.

    Raises ValueError for what SOCKS4 cannot carry (IPv6, a bad name, a port
    out of range, a NUL in the user id).
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    raw_user = user.encode("latin-1") if isinstance(user, str) else user
    if b"\x00" in raw_user:
        raise ValueError("a SOCKS4 USERID cannot contain NUL")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not is_valid_hostname(host.encode("ascii", "replace")):
            raise ValueError(f"not an IPv4 address or a host name: {host!r}") from None
        return build_request(command, port, "0.0.0.1", raw_user, host)
    if address.version != 4:
        raise ValueError(f"SOCKS4 carries IPv4 addresses only, not {host}")
    return build_request(command, port, str(address), raw_user)


@implementer(IHalfCloseableProtocol)
class Handshake(Protocol):
    """Sends the request, reads the replies, then passes every event on.

    `done` fires with the user's protocol after the last 90 (BIND has two)
    or fails with the error; ``on_first`` sees BIND's first reply.
    """

    transport: Any

    def __init__(
        self,
        request: bytes,
        factory: IProtocolFactory,
        replies: int,
        on_first: Optional[Callable[[IPv4Address], None]] = None,
    ) -> None:
        self._request = request
        self._factory = factory
        self._replies_left = replies
        self._on_first = on_first
        self._buffer = b""
        self.done: Deferred[IProtocol] = Deferred()
        self.wrapped: Optional[IProtocol] = None
        self.proxy = "the proxy"

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        if host is not None:
            self.proxy = f"proxy {host}:{port}"
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self.done.called:
            return
        self._buffer += data
        while self.wrapped is None and not self.done.called and len(self._buffer) >= _REPLY_SIZE:
            reply, self._buffer = self._buffer[:_REPLY_SIZE], self._buffer[_REPLY_SIZE:]
            self._reply(reply)
        if self.wrapped is not None and self._buffer:
            rest, self._buffer = self._buffer, b""
            self.wrapped.dataReceived(rest)

    def _reply(self, reply: bytes) -> None:
        code, port, address = parse_reply(reply)
        if reply[0] != 0 or code not in set(ReplyCode):
            self.fail(InvalidReply(f"{self.proxy} sent {reply!r}, not a SOCKS4 reply"))
            return
        if code != ReplyCode.GRANTED:
            self.fail(refusal_for(ReplyCode(code), f"{self.proxy} answered {code}"))
            return
        self._replies_left -= 1
        if self._replies_left > 0:
            if self._on_first is not None:
                if address == "0.0.0.0":
                    address = getattr(self.transport.getPeer(), "host", address)
                self._on_first(IPv4Address("TCP", address, port))
            return
        self._hand_over(IPv4Address("TCP", address, port))

    def _hand_over(self, address: IAddress) -> None:
        protocol = self._factory.buildProtocol(address)
        if protocol is None:
            self.fail(CancelledError("the factory built no protocol"))
            return
        self.wrapped = protocol
        protocol.makeConnection(self.transport)
        self.done.callback(protocol)

    def fail(self, error: BaseException, abort: bool = False) -> None:
        """End the handshake with `error` and close the proxy connection."""
        if self.done.called:
            return
        self.done.errback(Failure(error))
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        wrapped = self.wrapped
        if wrapped is None:
            self._closed_early()
            self.transport.loseConnection()
        elif IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.readConnectionLost()
        else:
            # What TCP does for a protocol that is not half-closeable.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.wrapped is not None and IHalfCloseableProtocol.providedBy(self.wrapped):
            self.wrapped.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        else:
            self._closed_early(reason)

    def _closed_early(self, reason: Optional[Failure] = None) -> None:
        # A TLS proxy connection that failed verification ends here: say why.
        why = ""
        if reason is not None and not reason.check(ConnectionDone):
            why = f" ({reason.getErrorMessage()})"
        if self._buffer:
            self.fail(
                ShortReply(
                    f"{self.proxy} closed after {len(self._buffer)} bytes of its reply{why}"
                )
            )
        else:
            self.fail(ProxyClosed(f"{self.proxy} closed the connection without a reply{why}"))


class HandshakeFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], Handshake]) -> None:
        self._make = make
        self.handshake: Optional[Handshake] = None

    def buildProtocol(self, addr: Optional[IAddress]) -> Handshake:
        self.handshake = self._make()
        return self.handshake


class Attempt:
    """One connect: the proxy connection, the handshake, one time limit."""

    def __init__(
        self,
        proxy: IStreamClientEndpoint,
        handshake: Callable[[], Handshake],
        reactor: ReactorTime,
        timeout: float,
    ) -> None:
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._factory = HandshakeFactory(handshake)
        self._timeout = timeout
        self._timer: Optional[DelayedCall] = reactor.callLater(timeout, self._time_up)
        self._connecting: Deferred[Any] = proxy.connect(self._factory)
        self._connecting.addCallbacks(self._connected, self._proxy_failed)

    def _connected(self, protocol: Any) -> None:
        handshake = self._factory.handshake
        assert handshake is not None
        handshake.done.addCallbacks(self._succeed, self._fail)

    def _proxy_failed(self, failure: Failure) -> None:
        self._fail(failure)

    def _succeed(self, protocol: IProtocol) -> None:
        self._stop_timer()
        if not self.result.called:
            self.result.callback(protocol)

    def _fail(self, failure: Failure) -> None:
        self._stop_timer()
        if not self.result.called:
            self.result.errback(failure)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stop(self, error: BaseException) -> None:
        """Close whatever is under way; the callbacks above then find
        `result` already fired."""
        handshake = self._factory.handshake
        if not self._connecting.called:
            self._connecting.cancel()
        if handshake is not None:
            handshake.fail(error, abort=True)

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        self._stop_timer()
        self._stop(CancelledError())

    def wait_again(self) -> None:
        """BIND's first reply came: the time limit starts over for the second."""
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(self._timeout)

    def _time_up(self) -> None:
        self._timer = None
        error = HandshakeTimeout(f"no SOCKS4 reply within {self._timeout:g} s")
        if not self.result.called:
            self.result.errback(Failure(error))
        self._stop(error)
