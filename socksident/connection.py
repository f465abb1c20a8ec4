"""Who is at each end of a client's connection, read once when it is made.

Three different "local addresses" matter and differ behind a load balancer:
the address the client connected to (what policies and the access log see),
and the socket's real local address, which is the only one this host can
listen on (BIND) or send an ident query from.  A frozen `ConnectionInfo`
carries them all, so no later step reads the transport again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from socksident.address import host_and_port

__all__ = ["ConnectionInfo"]


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Both ends of one client connection.

    ``client_*`` and ``server_*`` are the client as policies, rules and the
    log judge it and the address it connected to; ``local_*`` is this
    socket's own end.  Without a PROXY header, server and local are the same.
    """

    client_host: str
    client_port: int
    server_host: str
    server_port: int
    local_host: str
    local_port: int

    @classmethod
    def of_transport(cls, transport: Any) -> "ConnectionInfo":
        """Read a Twisted transport's peer and host (a UNIX peer reads as ``?``)."""
        client_host, client_port = host_and_port(transport.getPeer())
        local_host, local_port = host_and_port(transport.getHost())
        return cls(client_host, client_port, local_host, local_port, local_host, local_port)

    @property
    def client(self) -> str:
        """``host:port`` of the client, as the access log writes it."""
        return f"{self.client_host}:{self.client_port}"

    @property
    def listener(self) -> str:
        """``host:port`` the client connected to."""
        return f"{self.server_host}:{self.server_port}"
