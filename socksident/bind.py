"""BIND's listening socket: open it, take exactly one connection, close it.

A BIND listener that outlives its client is a port left open on the proxy
for anyone to reach, so `OneShotListener.close` is idempotent and
`accept_from` calls it on every path: success, refusal, time limit (a
cancel), client gone (a cancel).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTCP
from twisted.internet.protocol import ServerFactory

from socksident.address import host_and_port
from socksident.remote import RemoteProtocol
from socksident.socks4 import RequestRejectedOrFailed

__all__ = [
    "NoFreePort",
    "OneShotListener",
    "OpenConnects",
    "accept_from",
    "candidate_ports",
    "listen_once",
]


class NoFreePort(RequestRejectedOrFailed):
    """Every port the BIND range allows is taken: 91."""


class _InboundProtocol(RemoteProtocol):
    def __init__(self, ready: "Deferred[RemoteProtocol]") -> None:
        super().__init__()
        self._ready = ready

    def connectionMade(self) -> None:
        # Nothing is read from a connection that may yet be refused (the
        # DSTIP check); the relay resumes it.
        self.transport.pauseProducing()
        if not self._ready.called:
            self._ready.callback(self)
        else:
            self.transport.abortConnection()


class _AcceptOne(ServerFactory):
    """Builds a protocol for the first connection only; later ones are refused."""

    noisy = False

    def __init__(self) -> None:
        self.accepted: "Deferred[RemoteProtocol]" = Deferred()
        self._taken = False

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[RemoteProtocol]:
        if self._taken:
            return None
        self._taken = True
        return _InboundProtocol(self.accepted)


class OneShotListener:
    """A listening port that hands over its first connection and then closes."""

    def __init__(self, port: IListeningPort, factory: _AcceptOne) -> None:
        self._port: Optional[IListeningPort] = port
        self._factory = factory
        self.host, self.port = host_and_port(port.getHost())

    @property
    def accepted(self) -> "Deferred[RemoteProtocol]":
        return self._factory.accepted

    def close(self) -> None:
        if self._port is not None:
            port, self._port = self._port, None
            port.stopListening()


class OpenConnects(Counter[tuple[str, str]]):
    """The CONNECT relays open now, counted per (client host, destination).

    The protocol document asks that BIND follow a primary CONNECT to the
    same application server; this is where the server looks that up.
    """

    def count(self, client_host: str, destination: str, delta: int) -> None:
        key = (client_host, destination)
        self[key] += delta
        if self[key] <= 0:
            del self[key]

    def any_open(self, client_host: str, destinations: Iterable[str]) -> bool:
        return any((client_host, d) in self for d in destinations)


def candidate_ports(
    port_range: Optional[tuple[int, int]], chooser: random.Random = random.SystemRandom()
) -> list[int]:
    """Every port of the range once, from a random starting point.

    A guessable BIND port lets a stranger connect first; the DSTIP check
    refuses them, but closes the client's BIND with them.  Without a range
    the kernel picks an ephemeral port (0).
    """
    if port_range is None:
        return [0]
    low, high = port_range
    start = chooser.randint(low, high)
    return list(range(start, high + 1)) + list(range(low, start))


def listen_once(
    reactor: IReactorTCP, host: str, ports: Iterable[int]
) -> OneShotListener:
    """Listen on `host` on the first port of `ports` that is free."""
    factory = _AcceptOne()
    last_error: Any = None
    for number in ports:
        try:
            port = reactor.listenTCP(number, factory, backlog=1, interface=host)
        except CannotListenError as error:
            last_error = error
            continue
        return OneShotListener(port, factory)
    raise NoFreePort(f"no free port to listen on at {host}: {last_error}")


async def accept_from(
    reactor: IReactorTCP,
    host: str,
    port_range: Optional[tuple[int, int]],
    addresses: tuple[str, ...],
    on_listening: Callable[[OneShotListener], None],
) -> RemoteProtocol:
    """Listen on `host`, call `on_listening` (BIND's first reply), accept one
    connection and return it if it comes from one of `addresses`.

    A connection from anywhere else is aborted and refused (91).  The
    listener is closed before this returns, raises or is cancelled.
    """
    listener = listen_once(reactor, host, candidate_ports(port_range))
    try:
        on_listening(listener)
        inbound = await listener.accepted
    finally:
        listener.close()
    peer, _ = host_and_port(inbound.transport.getPeer())
    if peer not in addresses:
        inbound.transport.abortConnection()
        raise RequestRejectedOrFailed(
            f"BIND connection came from {peer}, not {', '.join(addresses)}"
        )
    return inbound
