"""The SOCKS4/4A server's factories: what all client connections share.

`SOCKS4ServerFactory` holds the policy, settings, reactor, resolver, ident
query and next hop, the CONNECTs open per client host (for BIND) and the
live counts; each connection is a `SOCKS4Server` (`serverprotocol.py`).
`ProxyListenerFactory` builds the same protocol for a listener behind a
PROXY-protocol balancer.
"""

from __future__ import annotations

from typing import Any, Optional, cast

from twisted.internet.interfaces import IAddress, IHostnameResolver
from twisted.internet.protocol import Factory

from socksident import bind
from socksident._types import ReactorTCPTime, global_reactor
from socksident.identclient import IdentQuery, query_ident
from socksident.livecounts import LiveCounts
from socksident.nexthop import NextHop
from socksident.policy import DefaultPolicy, IPolicy
from socksident.serverprotocol import ClientGone, SOCKS4Server
from socksident.settings import ServerSettings

__all__ = [
    "ClientGone",
    "LiveCounts",
    "ProxyListenerFactory",
    "SOCKS4Server",
    "SOCKS4ServerFactory",
    "ServerSettings",
]


class SOCKS4ServerFactory(Factory):
    """Holds what all connections share: policy, settings, reactor, resolver.

    It also keeps the CONNECT relays open per client host and destination
    (`bind.OpenConnects`: by address, and through the next hop by the
    destination named), so a BIND can be limited to follow a primary
    CONNECT.
    """

    def __init__(
        self,
        policy: Optional[IPolicy] = None,
        settings: Optional[ServerSettings] = None,
        reactor: Optional[ReactorTCPTime] = None,
        resolver: Optional[IHostnameResolver] = None,
        ident_query: IdentQuery = query_ident,
        next_hop: Optional[NextHop] = None,
    ) -> None:
        self.next_hop = next_hop
        self.policy = policy if policy is not None else DefaultPolicy()
        self.settings = settings if settings is not None else ServerSettings()
        self._reactor = reactor
        self._resolver = resolver
        self.ident_query = ident_query
        self.open_connects = bind.OpenConnects()
        self.open_hop_connects = bind.OpenConnects()
        self.live = LiveCounts()
        self.open_connections: set[SOCKS4Server] = set()

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            self._reactor = global_reactor()
        return self._reactor

    @property
    def resolver(self) -> IHostnameResolver:
        if self._resolver is None:
            self._resolver = cast(IHostnameResolver, self.reactor.nameResolver)
        return self._resolver

    def buildProtocol(self, addr: Optional[IAddress]) -> "SOCKS4Server":
        return SOCKS4Server(self)

    def proxy_listener(self) -> "ProxyListenerFactory":
        """A factory for a listener behind a PROXY-protocol balancer, sharing this one's state."""
        return ProxyListenerFactory(self)


class ProxyListenerFactory(Factory):
    """Connections that start with a PROXY header (``--port haproxy:...``).

    Not a wrapper: it builds the same `SOCKS4Server` on the same factory,
    which reads the header itself, so the transport stays the real one
    (half-close works) and every count stays in one place.
    """

    noisy = False

    def __init__(self, server: SOCKS4ServerFactory) -> None:
        self.server = server

    def buildProtocol(self, addr: Optional[IAddress]) -> "SOCKS4Server":
        return SOCKS4Server(self.server, expect_header=True)
