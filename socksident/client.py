"""A SOCKS4/4A client as Twisted endpoints: CONNECT and BIND through a proxy.

`SOCKS4ClientEndpoint(host, port, proxyEndpoint, user)` connects to the
proxy through any client endpoint (TCP, TLS, UNIX, another SOCKS4 endpoint,
so chains compose), sends one request and, once the proxy answered 90,
hands the connection to the user's protocol, which then sees a plain
stream: the handshake protocol (`clienthandshake.Handshake`) stays in
between only to pass events on, half-close included.

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

from typing import Any, Callable, Optional, Union

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident._types import ReactorTime, global_reactor
from socksident.clienthandshake import (
    DEFAULT_TIMEOUT,
    Attempt,
    Handshake,
    HandshakeTimeout,
    InvalidReply,
    ProxyClosed,
    SOCKS4ClientError,
    ShortReply,
    socks4_request,
)
from socksident.socks4 import Command

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
        return Attempt(
            self.proxyEndpoint,
            lambda: Handshake(self._request, protocolFactory, 1),
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
        attempt: Optional[Attempt] = None

        def first(address: IPv4Address) -> None:
            if attempt is not None:
                attempt.wait_again()
            pending.listening.callback(address)

        attempt = Attempt(
            self.proxyEndpoint,
            lambda: Handshake(self._request, protocolFactory, 2, first),
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
