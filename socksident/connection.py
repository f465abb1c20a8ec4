"""Who is at each end of a client's connection, read once when it is made.

Three different "local addresses" matter and differ behind a load balancer:
the address the client connected to (what policies and the access log see),
and the socket's real local address, which is the only one this host can
listen on (BIND) or send an ident query from.  A frozen `ConnectionInfo`
carries them all, so no later step reads the transport again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Optional

from socksident.address import host_and_port
from socksident.proxy import ProxyHeader
from socksident.socks4 import RequestRejectedOrFailed

__all__ = ["ConnectionInfo"]


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Both ends of one client connection.

    ``client_*`` and ``server_*`` are the client as policies, rules and the
    log judge it and the address it connected to; ``local_*`` is this
    socket's own end.  Without a PROXY header, server and local are the same
    and ``via`` is None; behind a balancer ``via`` is the balancer's end.
    """

    client_host: str
    client_port: int
    server_host: str
    server_port: int
    local_host: str
    local_port: int
    via: Optional[tuple[str, int]] = None  # the balancer, when a PROXY header named the client

    @classmethod
    def of_transport(cls, transport: Any) -> "ConnectionInfo":
        """Read a Twisted transport's peer and host (a UNIX peer reads as ``?``)."""
        client_host, client_port = host_and_port(transport.getPeer())
        local_host, local_port = host_and_port(transport.getHost())
        # This host's own addresses are few: one string each, not one per
        # connection (a relay may idle for days).  Clients' are not interned.
        local_host = sys.intern(local_host)
        return cls(client_host, client_port, local_host, local_port, local_host, local_port)

    def behind(self, header: ProxyHeader) -> "ConnectionInfo":
        """The client and listener a PROXY header names; the socket's peer becomes `via`.

        The local end stays the socket's: only that is an address of this
        host.  A PROXY header without a TCP client (UNIX, UNSPEC) names no
        one a rule or identd could judge: that is a refusal (91).
        """
        source, destination = header.source, header.destination
        if source is None or destination is None:
            raise RequestRejectedOrFailed(
                f"PROXY v{header.version} header names no TCP client ({header.family})"
            )
        return replace(
            self,
            client_host=source[0],
            client_port=source[1],
            server_host=destination[0],
            server_port=destination[1],
            via=(self.client_host, self.client_port),
        )

    @property
    def client(self) -> str:
        """``host:port`` of the client, as the access log writes it."""
        return f"{self.client_host}:{self.client_port}"

    @property
    def via_text(self) -> Optional[str]:
        """``host:port`` of the balancer, or None for a direct client."""
        return f"{self.via[0]}:{self.via[1]}" if self.via is not None else None

    @property
    def listener(self) -> str:
        """``host:port`` the client connected to."""
        return f"{self.server_host}:{self.server_port}"
