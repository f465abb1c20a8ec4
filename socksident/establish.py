"""One request's way from the policy check to a connected remote side.

`Establishment.start()` is the chain of Deferreds the design card asks for:
resolve a SOCKS4A name, ask the policy (which may ask identd), then connect,
go through the next hop (CONNECT or BIND), or listen and accept a BIND.  It
knows nothing of the client's transport, replies or records: the protocol
(`serverprotocol.py`) owns those, cancels the chain when something ends it
early, and reads what was decided here (`granted_address` for its reply);
the access record reads `decision`, `destination_address`,
`next_hop_name`, `hop_reply` and `ident_answer`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, cast

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IHostnameResolver
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from socksident import bind, outbound
from socksident.address import host_and_port, is_unspecified, not_local_because
from socksident.connection import ConnectionInfo
from socksident.ident import IdentAnswer, IdentOutcome
from socksident.identclient import IdentQuery, SharedIdentQuery
from socksident.nexthop import NextHop, NextHopFailed
from socksident.policy import (
    Decision,
    IEarlyRefusal,
    IPolicy,
    PolicyContext,
    Route,
    through_next_hop,
)
from socksident.remote import RemoteProtocol
from socksident.settings import ServerSettings
from socksident.socks4 import Command, Request, RequestRejectedOrFailed

__all__ = ["BindListening", "Establishment", "SharedState"]

#: Sends a BIND's first reply: where the application server should connect.
BindListening = Callable[[str, int], None]

log = Logger()

_REMOTE_FACTORY = Factory.forProtocol(RemoteProtocol)
_REMOTE_FACTORY.noisy = False


class _ReportedAddress(Factory):
    """The remote side of a BIND through the next hop, keeping the address
    the hop's second reply gave (the application server's, as the hop saw it)."""

    noisy = False

    def __init__(self) -> None:
        self.address: Optional[tuple[str, int]] = None

    def buildProtocol(self, addr: Optional[IAddress]) -> RemoteProtocol:
        self.address = host_and_port(addr)
        return RemoteProtocol()


class SharedState(Protocol):
    """What an establishment needs of the server factory (all requests share it)."""

    policy: IPolicy
    settings: ServerSettings
    ident_query: IdentQuery
    next_hop: Optional[NextHop]
    open_connects: bind.OpenConnects
    open_hop_connects: bind.OpenConnects  # CONNECTs through the next hop, by destination

    @property
    def reactor(self) -> Any: ...

    @property
    def resolver(self) -> IHostnameResolver: ...


class Establishment:
    """Policy, then the remote side, for one parsed request."""

    # Kept for the access record as long as the relay lasts: slots.
    __slots__ = ("shared", "settings", "reactor", "connection", "request", "decision",
                 "destination_address", "via", "hop_reply", "granted_address", "ident")

    def __init__(
        self,
        shared: SharedState,
        connection: ConnectionInfo,
        request: Request,
    ) -> None:
        self.shared = shared
        self.settings = shared.settings
        self.reactor = shared.reactor
        self.connection = connection
        self.request = request
        self.decision: Optional[Decision] = None
        self.destination_address: Optional[str] = None
        self.via: Optional[NextHop] = None  # set when the request goes to the next hop
        self.hop_reply: Optional[str] = None
        # What the granting reply carries when not the remote side's peer:
        # a BIND through the next hop passes the hop's second reply on.
        self.granted_address: Optional[tuple[str, int]] = None
        self.ident: Optional[SharedIdentQuery] = None

    def start(self, bind_listening: BindListening) -> Deferred[RemoteProtocol]:
        """The chain: fires with the connected remote side, or fails with a refusal.

        `bind_listening(host, port)` sends a BIND's first reply; only the
        chain holds it, not the establishment a relay keeps for its record.
        """
        fast = self._connect_address()
        return fast if fast is not None else Deferred.fromCoroutine(self._serve(bind_listening))

    @property
    def ident_answer(self) -> Optional[IdentAnswer]:
        """What the client's identd said, if it was asked and has answered."""
        if self.decision is not None and self.decision.ident is not None:
            return self.decision.ident
        return self.ident.answer if self.ident is not None else None

    @property
    def next_hop_name(self) -> Optional[str]:
        """The next hop the request went to, as the access record names it."""
        return self.via.name if self.via is not None else None

    # -- once granted -------------------------------------------------------------

    def track_open_connect(self, delta: int) -> None:
        """A granted CONNECT's relay starts (+1) or ends (-1): BIND checks that
        its client has one open to the application server (through the next
        hop: to the destination as named)."""
        if self.request.command is not Command.CONNECT:
            return
        client = self.connection.client_host
        if self.via is not None:  # through the next hop: by the destination named
            self.shared.open_hop_connects.count(client, self.request.destination, delta)
        elif self.destination_address is not None:
            self.shared.open_connects.count(client, self.destination_address, delta)

    def run_on_granted(self) -> None:
        """The decision's `on_granted` (a rule's command), once the 90 is sent."""
        assert self.decision is not None
        if self.decision.on_granted is not None:
            try:
                self.decision.on_granted()
            except Exception:
                log.failure(
                    "the policy's on_granted for {client} failed", client=self.connection.client
                )

    # -- the policy -------------------------------------------------------------

    def _context(self, addresses: tuple[str, ...]) -> PolicyContext:
        info = self.connection
        return PolicyContext(
            info.client_host,
            info.client_port,
            info.server_host,
            info.server_port,
            addresses,
            self._ask_ident,
        )

    def _ask_ident(self) -> Deferred[IdentAnswer]:
        """The one query of this request, made when a policy first asks
        (most requests never do, and each query object costs memory)."""
        if self.ident is None:
            self.ident = SharedIdentQuery(self._start_ident_query)
        return self.ident()

    def _start_ident_query(self) -> Deferred[IdentAnswer]:
        info = self.connection
        if info.via is not None:
            why = not_local_because(info.server_host)
            if why is not None:
                # The client's identd only names connections it sees asked
                # about from their own far end: the balancer's address.
                reason = (
                    f"cannot ask from {info.server_host}, the address the client connected"
                    f" to through the balancer: {why}"
                )
                log.info("ident for {client}: {reason}", client=info.client, reason=reason)
                return succeed(IdentAnswer(IdentOutcome.NO_ANSWER, error=reason))
        query: IdentQuery = self.shared.ident_query
        return query(
            info.client_host,
            info.client_port,
            info.server_host,
            info.server_port,
            reactor=self.reactor,
            ident_port=self.settings.ident_port,
            timeout=self.settings.ident_timeout,
        )

    def _decided(self, decision: Decision) -> None:
        self.decision = decision
        refusal = decision.refusal()
        if refusal is not None:
            raise refusal

    def _routed(self, decision: Decision, resolved: bool) -> Optional[NextHop]:
        """The next hop this granted request goes through, by its route; None: direct."""
        hop = self.shared.next_hop
        via = through_next_hop(decision, self.request.destination, resolved, hop is not None)
        return hop if via else None

    # -- the hot path: CONNECT to an IP address -----------------------------------

    def _connect_address(self) -> Optional[Deferred[RemoteProtocol]]:
        """The same steps as `_serve` (policy, then connect) as plain calls
        and at most two Deferreds, for a CONNECT to an IP address; None for
        every other request."""
        request = self.request
        if (
            request.hostname is not None
            or request.command is not Command.CONNECT
            or is_unspecified(request.address)
        ):
            return None
        try:
            decided = self.shared.policy.check(request, self._context((request.address,)))
            if isinstance(decided, Deferred):
                return decided.addCallback(self._connect_decided)
            return self._connect_decided(decided)
        except Exception:  # a refusal, or a bug: the server tells them apart
            return fail()

    def _connect_decided(self, decision: Decision) -> Deferred[RemoteProtocol]:
        self._decided(decision)
        if decision.route is Route.NEXT_HOP:
            self.via = self._routed(decision, resolved=True)
            assert self.via is not None
            return Deferred.fromCoroutine(self._through_next_hop(self.via))
        address, port = self.request.address, self.request.port
        self.destination_address = address
        if self.settings.source_addresses:
            # A chosen source address: the race's attempt binds it (and
            # refuses a family without one).
            raced = outbound.connect(
                self.reactor,
                (address,),
                port,
                self.settings.connect_timeout,
                _REMOTE_FACTORY,
                self.settings.source_addresses,
            )
            return cast("Deferred[RemoteProtocol]", raced.addCallback(lambda won: won[1]))
        connected = outbound.connect_one(self.reactor, address, port, _REMOTE_FACTORY)
        return cast("Deferred[RemoteProtocol]", connected)

    # -- every other request ---------------------------------------------------------

    async def _serve(self, bind_listening: BindListening) -> RemoteProtocol:
        request, policy = self.request, self.shared.policy
        if request.hostname is not None and IEarlyRefusal.providedBy(policy):
            early = policy.refuse_early(request, self._context(()))
            if early is not None and early.refusal() is not None:
                self._decided(early)
        try:
            addresses = await outbound.addresses_of(self.shared.resolver, request)
        except outbound.NotResolved:
            if self.shared.next_hop is None:
                raise
            addresses = ()  # the policy decides whether the next hop may have it
        decision = cast(
            Decision, await maybeDeferred(policy.check, request, self._context(addresses))
        )
        self._decided(decision)
        self.via = self._routed(decision, resolved=bool(addresses))
        if self.via is not None:
            return await self._through_next_hop(self.via, bind_listening)
        if request.command is Command.CONNECT:
            address, remote = await outbound.connect(
                self.reactor,
                addresses,
                request.port,
                self.settings.connect_timeout,
                _REMOTE_FACTORY,
                self.settings.source_addresses,
                self.settings.connect_attempt_delay,
            )
            self.destination_address = address
            return cast(RemoteProtocol, remote)
        return await self._bind(addresses, bind_listening)

    async def _through_next_hop(
        self, hop: NextHop, bind_listening: Optional[BindListening] = None
    ) -> RemoteProtocol:
        """CONNECT, or BIND (which has `bind_listening`), through the next hop."""
        request = self.request
        try:
            if request.command is Command.BIND:
                assert bind_listening is not None
                return await self._bind_through(hop, bind_listening)
            remote = await hop.connect(
                self.reactor, request, self.settings.connect_timeout, _REMOTE_FACTORY
            )
        except NextHopFailed as failed:
            self.hop_reply = failed.answer
            log.info("{client}: {reason}", client=self.connection.client, reason=failed.reason)
            raise
        self.hop_reply = "90"
        return cast(RemoteProtocol, remote)

    async def _bind_through(self, hop: NextHop, bind_listening: BindListening) -> RemoteProtocol:
        """BIND at the hop: its first reply (where it listens) and its second
        (the application server came in, and passed its DSTIP check) go to
        our client as they came.  The server's deadlines cancel this; the
        endpoint's own limit is only a backstop behind them."""
        request, settings = self.request, self.settings
        if not settings.bind_without_connect and not self.shared.open_hop_connects.any_open(
            self.connection.client_host, (request.destination,)
        ):
            raise RequestRejectedOrFailed(
                "BIND without an open CONNECT from this client to "
                f"{request.destination} through the next hop (see --bind-without-connect)"
            )

        def listening(host: str, port: int) -> None:
            self.hop_reply = "90"
            bind_listening(host, port)

        reported = _ReportedAddress()
        remote = await hop.bind(
            self.reactor,
            request,
            settings.connect_timeout + settings.bind_timeout,
            reported,
            listening,
        )
        self.hop_reply = "90, 90"
        self.granted_address = reported.address
        return cast(RemoteProtocol, remote)

    async def _bind(
        self, addresses: tuple[str, ...], bind_listening: BindListening
    ) -> RemoteProtocol:
        client_host = self.connection.client_host
        if not self.settings.bind_without_connect and not self.shared.open_connects.any_open(
            client_host, addresses
        ):
            raise RequestRejectedOrFailed(
                "BIND without an open CONNECT from this client to "
                f"{', '.join(addresses)} (see --bind-without-connect)"
            )
        listen_on = self.settings.bind_address
        if listen_on is None:
            if self.connection.via is not None:
                raise RequestRejectedOrFailed(
                    "BIND on a PROXY listener needs a bind address (--bind-address)"
                )
            listen_on = self.connection.local_host
        inbound = await bind.accept_from(
            self.reactor,
            listen_on,
            self.settings.bind_ports,
            addresses,
            lambda listener: bind_listening(listener.host, listener.port),
        )
        self.destination_address, _ = host_and_port(inbound.transport.getPeer())
        return inbound
