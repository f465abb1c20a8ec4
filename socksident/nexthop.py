"""The next hop: SOCKS4A names this proxy cannot resolve go to another SOCKS server.

The protocol document ends with "SOCKSified sockd may pass domain names that
it cannot resolve to the next-hop SOCKS server"; this is that, through the
client endpoints (`socksident.client`), for CONNECT and BIND.  The name goes
on unresolved and the client's USERID with it.  Whatever goes wrong at the
hop is a 91 to our client: its 92 and 93 describe the hop's view of *us*,
not of our client.
"""

from __future__ import annotations

import ipaddress
from typing import Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint

from socksident._types import ReactorTime
from socksident.address import ip_of, plain_host
from socksident.client import SOCKS4BindEndpoint, SOCKS4ClientEndpoint, SOCKS4ClientError
from socksident.socks4 import Request, RequestRejectedOrFailed, SOCKS4Refusal

__all__ = ["NextHop", "NextHopFailed"]


class NextHopFailed(RequestRejectedOrFailed):
    """The next hop refused, could not be reached or did not speak SOCKS4: 91.

    ``answer`` is what the hop answered, for the access record (``"92"``,
    ``"unreachable: ..."``, ``"garbage: ..."``; for a BIND the hop granted
    first, ``"90, "`` and what came second).
    """

    def __init__(self, reason: str, answer: str) -> None:
        super().__init__(reason)
        self.answer = answer


class NextHop:
    """A next-hop SOCKS server: its endpoint and the name the log gives it."""

    def __init__(self, endpoint: IStreamClientEndpoint, name: str) -> None:
        self.endpoint = endpoint
        self.name = name

    def __repr__(self) -> str:
        return f"<NextHop {self.name}>"

    def _through(self, request: Request) -> tuple[str, int, IStreamClientEndpoint, bytes]:
        """The endpoint arguments for `request` through this hop: the
        destination as the client named it (unresolved) and its USERID."""
        return request.destination, request.port, self.endpoint, request.user_id.encode("latin-1")

    async def connect(
        self, reactor: ReactorTime, request: Request, timeout: float, factory: IProtocolFactory
    ) -> IProtocol:
        """CONNECT to `request`'s destination through the hop, as its client asked.

        Cancelling (the server's own deadline) closes the hop connection.
        """
        endpoint = SOCKS4ClientEndpoint(*self._through(request), timeout=timeout, reactor=reactor)
        try:
            protocol: IProtocol = await endpoint.connect(factory)
        except Exception as error:
            failure = self._failure(error)
            if failure is error:
                raise
            raise failure from None
        return protocol

    async def bind(
        self,
        reactor: ReactorTime,
        request: Request,
        timeout: float,
        factory: IProtocolFactory,
        on_listening: Callable[[str, int], object],
    ) -> IProtocol:
        """BIND through the hop for `request`'s application server.

        `on_listening` gets the address the hop listens on (its first 90:
        the address the application server must connect to, the hop's own
        when it says 0.0.0.0); the protocol is returned after the second 90.
        `timeout` only backs up the server's deadlines, which cancel this
        (closing the hop connection).
        """
        endpoint = SOCKS4BindEndpoint(*self._through(request), timeout=timeout, reactor=reactor)
        pending = endpoint.bind(factory)
        first: list[IPv4Address] = []
        unusable: list[NextHopFailed] = []

        def listening(address: IPv4Address) -> None:
            first.append(address)
            host = plain_host(address.host)
            ip = ip_of(host)
            if isinstance(ip, ipaddress.IPv4Address) and not ip.is_unspecified:
                on_listening(host, address.port)
                return
            # Our client would take 0.0.0.0 for *our* address, and a reply
            # holds IPv4 only: no address we could pass on is the hop's.
            where = f"{address.host}:{address.port}"
            unusable.append(
                NextHopFailed(
                    f"next hop {self.name} listens for the BIND at {where},"
                    " which a SOCKS4 reply to our client cannot carry",
                    f"90 at {where}, not an IPv4 address",
                )
            )
            pending.cancel()

        pending.listening.addCallbacks(listening, lambda _: None)
        try:
            protocol: IProtocol = await pending.connected
        except Exception as error:
            if unusable:
                raise unusable[0] from None
            failure = self._failure(error, granted_first=bool(first))
            if failure is error:
                raise
            raise failure from None
        return protocol

    def _failure(self, error: Exception, granted_first: bool = False) -> Exception:
        """What `error` from the client endpoint means here: a `NextHopFailed`
        (91), a plain CancelledError for a cancel, anything else unchanged."""
        if isinstance(error, (CancelledError, ConnectingCancelledError)):
            return CancelledError()
        then, said = ("90, then ", "90, ") if granted_first else ("", "")
        if isinstance(error, SOCKS4Refusal):
            code = int(error.code)
            return NextHopFailed(f"next hop {self.name} answered {then}{code}", f"{said}{code}")
        if isinstance(error, SOCKS4ClientError):
            answered = f" answered {then}" if granted_first else ": "
            return NextHopFailed(
                f"next hop {self.name}{answered}{error.reason}", f"{said}bad reply: {error.reason}"
            )
        if isinstance(error, (ConnectError, DNSLookupError)):
            return NextHopFailed(
                f"next hop {self.name} unreachable: {error}", f"unreachable: {error}"
            )
        return error
