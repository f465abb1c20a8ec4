"""Where a granted request goes: resolving its name, connecting to it.

The server asks the policy between the two steps, so the policy sees every
address a SOCKS4A name resolved to before anything is dialled.  Connection
errors become a 91 refusal naming each address tried; anything else (a bug)
propagates to the server's one "internal error" path with its traceback.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
)
from zope.interface import implementer

from socksident._types import ReactorTCPTime
from socksident.address import is_unspecified
from socksident.socks4 import Request, RequestRejectedOrFailed

__all__ = ["ConnectFailed", "addresses_of", "connect", "resolve"]


class ConnectFailed(RequestRejectedOrFailed):
    """No address of the destination took the connection: 91."""


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
        raise RequestRejectedOrFailed(f"{request.destination} does not resolve")
    if any(is_unspecified(address) for address in addresses):
        raise RequestRejectedOrFailed(f"{request.destination} is the unspecified address")
    return addresses


async def connect(
    reactor: ReactorTCPTime,
    addresses: tuple[str, ...],
    port: int,
    timeout: float,
    factory: IProtocolFactory,
) -> tuple[str, IProtocol]:
    """Connect to the first of `addresses` that answers, trying them in turn;
    the address that answered and the connected protocol.

    Cancelling stops the attempt under way (CancelledError); when every
    address fails, `ConnectFailed` says how each one did.
    """
    failures = []
    for address in addresses:
        endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = endpoint_type(reactor, address, port, timeout=timeout)
        try:
            protocol: IProtocol = await endpoint.connect(factory)
        except (CancelledError, ConnectingCancelledError):
            raise CancelledError() from None
        except (ConnectError, DNSLookupError) as error:
            failures.append(f"{address}: {error}")
            continue
        return address, protocol
    raise ConnectFailed("connect failed: " + "; ".join(failures))
