"""Where a granted request goes: resolving its name, connecting to it.

The server asks the policy between the two steps, so the policy sees every
address a SOCKS4A name resolved to before anything is dialled; then the
permitted addresses race (RFC 8305), which is why Twisted's
`HostnameEndpoint`, resolving by itself, cannot be used.  Connection
errors become a 91 refusal naming each address tried; anything else (a bug)
propagates to the server's one "internal error" path with its traceback.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident._types import DelayedCall, ReactorTCPTime
from socksident.address import is_unspecified
from socksident.dial import dial
from socksident.socks4 import Request, RequestRejectedOrFailed

__all__ = [
    "ConnectFailed",
    "NotResolved",
    "addresses_of",
    "connect",
    "connect_one",
    "resolve",
    "source_for",
]


class ConnectFailed(RequestRejectedOrFailed):
    """No address of the destination took the connection: 91."""


class NotResolved(RequestRejectedOrFailed):
    """A SOCKS4A name with no address here: 91, or the next hop's turn."""


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects a name's addresses from an IHostnameResolver into a Deferred."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.done: Deferred[tuple[str, ...]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if host is not None and host not in self.found:
            self.found.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(tuple(self.found))


def resolve(resolver: IHostnameResolver, name: str, port: int) -> Deferred[tuple[str, ...]]:
    """The distinct addresses `name` resolves to, in the resolver's order
    (empty when it does not resolve)."""
    receiver = _Addresses()
    resolver.resolveHostName(receiver, name, portNumber=port)
    return receiver.done


async def addresses_of(resolver: IHostnameResolver, request: Request) -> tuple[str, ...]:
    """DSTIP, or what a SOCKS4A name resolves to; 91 when there is nothing
    to connect to.  0.0.0.0 and :: are refused: a connect to either reaches
    this host itself, and no rule is written for them."""
    if request.hostname is None:
        addresses: tuple[str, ...] = (request.address,)
    else:
        addresses = await resolve(resolver, request.hostname, request.port)
    if not addresses:
        raise NotResolved(f"{request.destination} does not resolve")
    if any(is_unspecified(address) for address in addresses):
        raise RequestRejectedOrFailed(f"{request.destination} is the unspecified address")
    return addresses


def _interleaved(addresses: tuple[str, ...]) -> list[str]:
    """RFC 8305 section 4: alternate the families, the first address's first."""
    first = [a for a in addresses if (":" in a) == (":" in addresses[0])]
    other = [a for a in addresses if (":" in a) != (":" in addresses[0])]
    order: list[str] = []
    for index in range(max(len(first), len(other))):
        order.extend(group[index] for group in (first, other) if index < len(group))
    return order


def source_for(address: str, sources: tuple[str, ...]) -> Optional[str]:
    """The source address of `address`'s family; None when there is none."""
    return next((source for source in sources if (":" in source) == (":" in address)), None)


class _Race:
    """Happy Eyeballs over a fixed list of addresses (RFC 8305 section 5).

    An attempt starts every `delay` seconds, or at once when the previous
    one failed; the first to connect wins and every other is cancelled; one
    deadline covers the whole race.
    """

    def __init__(
        self,
        reactor: ReactorTCPTime,
        addresses: tuple[str, ...],
        port: int,
        timeout: float,
        factory: IProtocolFactory,
        sources: tuple[str, ...],
        delay: float,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.timeout = timeout
        self.factory = factory
        self.sources = sources
        self.delay = delay
        self.waiting = _interleaved(addresses)
        self.attempts: dict[str, Deferred[IProtocol]] = {}
        self.failures: list[str] = []
        self.done = False
        self.result: Deferred[tuple[str, IProtocol]] = Deferred(self._cancelled)
        self.next_attempt: Optional[DelayedCall] = None
        self.deadline: Optional[DelayedCall] = reactor.callLater(timeout, self._time_up)
        self._next()

    def _next(self) -> None:
        self.next_attempt = None
        while self.waiting and not self.done:
            address = self.waiting.pop(0)
            source = source_for(address, self.sources)
            if self.sources and source is None:
                family = "IPv6" if ":" in address else "IPv4"
                self.failures.append(f"{address}: no {family} --source-address to leave from")
                continue
            self._attempt(address, source)
            # (an attempt that failed at once has already moved the race on)
            if address in self.attempts and self.waiting and self.next_attempt is None:
                self.next_attempt = self.reactor.callLater(self.delay, self._next)
            return
        self._check_lost()

    def _attempt(self, address: str, source: Optional[str]) -> None:
        attempt = dial(self.reactor, address, self.port, self.factory, source)
        self.attempts[address] = attempt
        attempt.addCallbacks(
            self._won, self._lost, callbackArgs=(address,), errbackArgs=(address,)
        )

    def _won(self, protocol: IProtocol, address: str) -> None:
        # (Ending the race cancels every attempt, so none wins after it.)
        del self.attempts[address]
        self._stop()
        self.result.callback((address, protocol))

    def _lost(self, failure: Failure, address: str) -> None:
        del self.attempts[address]
        if self.done:  # cancelled as the race ended
            return
        if not failure.check(ConnectError):  # (a time-out is one too)
            self._stop()
            self.result.errback(failure)  # a bug: the server logs its traceback
            return
        self.failures.append(f"{address}: {failure.value}")
        if self.next_attempt is not None and self.next_attempt.active():
            self.next_attempt.cancel()
        self._next()

    def _check_lost(self) -> None:
        if not self.done and not self.attempts and not self.waiting:
            self._stop()
            self.result.errback(ConnectFailed("connect failed: " + "; ".join(self.failures)))

    def _time_up(self) -> None:
        self.deadline = None
        if self.done:
            return
        self.failures.extend(
            f"{address}: no answer within {self.timeout:g} s" for address in self.attempts
        )
        self._stop()
        self.result.errback(ConnectFailed("connect failed: " + "; ".join(self.failures)))

    def _stop(self) -> None:
        self.done = True
        for call in (self.next_attempt, self.deadline):
            if call is not None and call.active():
                call.cancel()
        self.next_attempt = self.deadline = None
        for attempt in list(self.attempts.values()):
            attempt.cancel()
        self.attempts.clear()

    def _cancelled(self, result: Deferred[tuple[str, IProtocol]]) -> None:
        self._stop()  # the Deferred then fails with CancelledError


def connect(
    reactor: ReactorTCPTime,
    addresses: tuple[str, ...],
    port: int,
    timeout: float,
    factory: IProtocolFactory,
    sources: tuple[str, ...] = (),
    delay: float = 0.3,
) -> Deferred[tuple[str, IProtocol]]:
    """Race connections to `addresses` Happy-Eyeballs style; the address
    that answered first and its connected protocol.

    A new attempt starts every `delay` seconds (at once after a failure),
    families alternating; the first connection wins and the others are
    cancelled; `timeout` bounds the whole race.  With `sources`, each
    attempt leaves from the source address of its family, and an address
    of a family without one is not tried.  Cancelling stops every attempt
    (CancelledError); when no address connects, `ConnectFailed` says how
    each one did.
    """
    return _Race(reactor, addresses, port, timeout, factory, sources, delay).result


def connect_one(
    reactor: ReactorTCPTime, address: str, port: int, factory: IProtocolFactory
) -> Deferred[IProtocol]:
    """Connect to one address: the connected protocol, or `ConnectFailed`
    naming the address and what happened.

    The handshake's hot path, a CONNECT to an IP address: no race and no
    timer of its own (the server's one deadline cancels it, and cancelling
    stops the attempt: CancelledError).
    """
    return dial(reactor, address, port, factory).addErrback(_named, address)


def _named(failure: Failure, address: str) -> Failure:
    if failure.check(ConnectError):
        raise ConnectFailed(f"connect failed: {address}: {failure.value}")
    return failure
