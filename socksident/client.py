"""A SOCKS4/4A client as Twisted endpoints: CONNECT and BIND through a proxy.

`SOCKS4ClientEndpoint(host, port, proxyEndpoint, user)` connects to the
proxy through any client endpoint (TCP, TLS, UNIX, another SOCKS4 endpoint,
so chains compose), sends one request and, once the proxy answered 90,
hands the connection to the user's protocol, which then sees a plain
stream: the handshake protocol stays in between only to pass events on,
half-close included, as Twisted's own `_WrappingProtocol` does.

Every way the handshake can end badly is a typed error: the proxy's
refusals are the server's own refusal classes (`RequestRejectedOrFailed`
91, `IdentdUnreachable` 92, `IdentdMismatch` 93, txsocksx's names), and a
proxy that answers garbage, closes early or is too slow raises a
`SOCKS4ClientError`.  Cancelling the Deferred closes the proxy connection.

`SOCKS4BindEndpoint` does BIND: `bind(factory)` returns a `PendingBind`
whose ``listening`` fires with the address the proxy listens on and whose
``connected`` fires with the protocol once the application server came in.
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

from socksident._types import DelayedCall, ReactorTime, global_reactor
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
    "HandshakeTimeout",
    "InvalidReply",
    "PendingBind",
    "ProxyClosed",
    "SOCKS4BindEndpoint",
    "SOCKS4ClientEndpoint",
    "SOCKS4ClientError",
    "ShortReply",
    "endpoint_from_string_arguments",
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
class _Handshake(Protocol):
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


class _HandshakeFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], _Handshake]) -> None:
        self._make = make
        self.handshake: Optional[_Handshake] = None

    def buildProtocol(self, addr: Optional[IAddress]) -> _Handshake:
        self.handshake = self._make()
        return self.handshake


class _Attempt:
    """One connect: the proxy connection, the handshake, one time limit."""

    def __init__(
        self,
        proxy: IStreamClientEndpoint,
        handshake: Callable[[], _Handshake],
        reactor: ReactorTime,
        timeout: float,
    ) -> None:
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._factory = _HandshakeFactory(handshake)
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


def _checked_host(host: Union[str, bytes]) -> str:
    return host.decode("ascii") if isinstance(host, bytes) else host


@implementer(IStreamClientEndpoint)
class SOCKS4ClientEndpoint:
    """CONNECT to `host`:`port` through the SOCKS4 proxy at `proxyEndpoint`.

    An IPv4 literal is sent as SOCKS4, a name as SOCKS4A (the proxy
    resolves it).  `user` is the USERID.  The connected protocol's
    transport is the proxy connection's: its ``getPeer()`` is the proxy.
    `timeout` bounds the proxy connection and its reply together.
    """

    def __init__(
        self,
        host: Union[str, bytes],
        port: int,
        proxyEndpoint: IStreamClientEndpoint,
        user: Union[bytes, str] = b"",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        reactor: Optional[ReactorTime] = None,
    ) -> None:
        self.host = _checked_host(host)
        self.port = port
        self.proxyEndpoint = proxyEndpoint
        self.user = user
        self.timeout = timeout
        self._request = socks4_request(Command.CONNECT, self.host, port, user)
        self._reactor = reactor

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        reactor = self._reactor if self._reactor is not None else global_reactor()
        return _Attempt(
            self.proxyEndpoint,
            lambda: _Handshake(self._request, protocolFactory, 1),
            reactor,
            self.timeout,
        ).result

    def __repr__(self) -> str:
        return f"<SOCKS4ClientEndpoint {self.host}:{self.port} via {self.proxyEndpoint!r}>"


class PendingBind:
    """One BIND under way.

    ``listening`` fires with the `IPv4Address` the proxy listens on (its own
    address when the reply says 0.0.0.0), for the application server to be
    told; ``connected`` fires with the protocol after the second 90, or
    fails (and so does ``listening`` if it has not fired).  ``cancel()``
    closes the proxy connection.
    """

    def __init__(self) -> None:
        self.listening: Deferred[IPv4Address] = Deferred()
        self.connected: Deferred[IProtocol] = Deferred()

    def cancel(self) -> None:
        self.connected.cancel()


@implementer(IStreamClientEndpoint)
class SOCKS4BindEndpoint:
    """BIND through the proxy at `proxyEndpoint`, for a connection from
    `host`:`port` (the application server the primary connection reached).

    `bind(factory)` gives both steps; `connect(factory)` is the endpoint
    interface and fires with the protocol only, reporting the listening
    address to `on_listening`, if given.
    """

    def __init__(
        self,
        host: Union[str, bytes],
        port: int,
        proxyEndpoint: IStreamClientEndpoint,
        user: Union[bytes, str] = b"",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        reactor: Optional[ReactorTime] = None,
        on_listening: Optional[Callable[[IPv4Address], object]] = None,
    ) -> None:
        self.host = _checked_host(host)
        self.port = port
        self.proxyEndpoint = proxyEndpoint
        self.user = user
        self.timeout = timeout
        self.on_listening = on_listening
        self._request = socks4_request(Command.BIND, self.host, port, user)
        self._reactor = reactor

    def bind(self, protocolFactory: IProtocolFactory) -> PendingBind:
        reactor = self._reactor if self._reactor is not None else global_reactor()
        pending = PendingBind()
        attempt: Optional[_Attempt] = None

        def first(address: IPv4Address) -> None:
            if attempt is not None:
                attempt.wait_again()
            pending.listening.callback(address)

        attempt = _Attempt(
            self.proxyEndpoint,
            lambda: _Handshake(self._request, protocolFactory, 2, first),
            reactor,
            self.timeout,
        )

        def failed(failure: Failure) -> Failure:
            if not pending.listening.called:
                pending.listening.errback(failure)
            return failure

        result = attempt.result
        result.addErrback(failed)
        pending.connected = Deferred(lambda _: result.cancel())
        result.chainDeferred(pending.connected)
        return pending

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        pending = self.bind(protocolFactory)
        if self.on_listening is not None:
            pending.listening.addCallback(self.on_listening)
        pending.listening.addErrback(lambda _: None)
        return pending.connected

    def __repr__(self) -> str:
        return f"<SOCKS4BindEndpoint {self.host}:{self.port} via {self.proxyEndpoint!r}>"


def endpoint_from_string_arguments(
    reactor: Any,
    *args: str,
    host: Optional[str] = None,
    port: Optional[str] = None,
    proxy: Optional[str] = None,
    user: str = "",
    timeout: Optional[str] = None,
) -> SOCKS4ClientEndpoint:
    """The ``socks4:`` endpoint string: ``host`` and ``port`` (also positional),
    ``proxy`` a nested client endpoint description (its colons escaped),
    ``user`` the USERID, ``timeout`` in seconds."""
    from twisted.internet.endpoints import clientFromString

    positional = list(args)
    if host is None and positional:
        host = positional.pop(0)
    if port is None and positional:
        port = positional.pop(0)
    if positional:
        raise ValueError(f"socks4: unexpected arguments {positional!r}")
    if host is None or port is None or proxy is None:
        raise ValueError("socks4: needs host, port and proxy (an endpoint description)")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"socks4: port must be a number, not {port!r}") from None
    seconds = DEFAULT_TIMEOUT
    if timeout is not None:
        seconds = float(timeout)
        if not seconds > 0:
            raise ValueError(f"socks4: timeout must be positive, not {timeout!r}")
    return SOCKS4ClientEndpoint(
        host,
        number,
        clientFromString(reactor, proxy),
        user.encode("latin-1"),
        timeout=seconds,
        reactor=reactor,
    )
