"""The next hop: SOCKS4A names this proxy cannot resolve go to another SOCKS server.

The protocol document ends with "SOCKSified sockd may pass domain names that
it cannot resolve to the next-hop SOCKS server"; this is that, through the
client endpoint (`socksident.client`).  The name goes on unresolved and the
client's USERID with it.  Whatever goes wrong at the hop is a 91 to our
client: its 92 and 93 describe the hop's view of *us*, not of our client.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint

from socksident._types import ReactorTime
from socksident.client import SOCKS4ClientEndpoint, SOCKS4ClientError
from socksident.socks4 import Request, RequestRejectedOrFailed, SOCKS4Refusal

__all__ = ["NextHop", "NextHopFailed"]


class NextHopFailed(RequestRejectedOrFailed):
    """The next hop refused, could not be reached or did not speak SOCKS4: 91.

    ``answer`` is what the hop answered, for the access record (``"92"``,
    ``"unreachable: ..."``, ``"garbage: ..."``).
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

    async def connect(
        self, reactor: ReactorTime, request: Request, timeout: float, factory: IProtocolFactory
    ) -> IProtocol:
        """CONNECT to `request`'s destination through the hop, as its client asked.

        Cancelling (the server's own deadline) closes the hop connection.
        """
        endpoint = SOCKS4ClientEndpoint(
            request.destination,
            request.port,
            self.endpoint,
            request.user_id.encode("latin-1"),
            timeout=timeout,
            reactor=reactor,
        )
        try:
            protocol: IProtocol = await endpoint.connect(factory)
        except (CancelledError, ConnectingCancelledError):
            raise CancelledError() from None
        except SOCKS4Refusal as refusal:
            code = int(refusal.code)
            raise NextHopFailed(f"next hop {self.name} answered {code}", str(code)) from None
        except SOCKS4ClientError as error:
            raise NextHopFailed(
                f"next hop {self.name}: {error.reason}", f"bad reply: {error.reason}"
            ) from None
        except (ConnectError, DNSLookupError) as error:
            raise NextHopFailed(
                f"next hop {self.name} unreachable: {error}", f"unreachable: {error}"
            ) from None
        return protocol
