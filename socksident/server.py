"""The SOCKS4/4A server: one `SOCKS4Server` protocol per client connection.

A connection is a small state machine (`State`, `TRANSITIONS`): it reads one
request, then runs one chain of Deferreds (written as a coroutine): resolve
a SOCKS4A name, ask the policy (which may ask identd), connect or
listen-and-accept, reply, relay.  A single deadline covers the
establishment of the connection; whatever ends the chain early (a time
limit, a BIND client sending too much, the client leaving) is stored as the
abort cause before the chain is cancelled, and cancelling cancels whatever
step is pending, so no socket outlives its client.  Every ending writes
exactly one `AccessRecord`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union, cast

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IHostnameResolver
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident import bind, outbound
from socksident.nexthop import NextHop, NextHopFailed
from socksident._types import DelayedCall, ReactorTCPTime, global_reactor
from socksident.accesslog import AccessRecord, emit
from socksident.address import host_and_port, is_unspecified, not_local_because
from socksident.connection import ConnectionInfo
from socksident.ident import IdentAnswer, IdentOutcome
from socksident.identclient import IdentQuery, SharedIdentQuery, query_ident
from socksident.policy import Decision, DefaultPolicy, IEarlyRefusal, IPolicy, PolicyContext
from socksident.proxy import HeaderParser, ProxyCommand, ProxyHeader, ProxyHeaderError
from socksident.relay import PendingEvents, Relay, RemoteProtocol
from socksident.settings import ServerSettings
from socksident.socks4 import (
    Command,
    MalformedRequest,
    NotSocks4,
    ReplyCode,
    Request,
    RequestParser,
    RequestRejectedOrFailed,
    SOCKS4Refusal,
    build_reply,
    foreign_protocol_answer,
    reply_address,
)
from socksident.state import State, enter

__all__ = [
    "ClientGone",
    "LiveCounts",
    "ProxyListenerFactory",
    "SOCKS4Server",
    "SOCKS4ServerFactory",
    "ServerSettings",
]

log = Logger()

class ClientGone(Exception):
    """The abort cause when the client closed before its request was settled."""


AbortCause = Union[SOCKS4Refusal, ClientGone]


_REMOTE_FACTORY = Factory.forProtocol(RemoteProtocol)
_REMOTE_FACTORY.noisy = False


class LiveCounts:
    """Open client connections and active relays, with watchers told of each
    change (the metrics' gauges: they work across worker processes, where a
    gauge that reads a value at scrape time does not)."""

    def __init__(self) -> None:
        self.connections = 0
        self.relays = 0
        self.watchers: list[Callable[[str, int], None]] = []

    def change(self, what: str, delta: int) -> None:
        """`what` is ``connections`` or ``relays``."""
        setattr(self, what, getattr(self, what) + delta)
        for watcher in self.watchers:
            watcher(what, delta)


class SOCKS4ServerFactory(Factory):
    """Holds what all connections share: policy, settings, reactor, resolver.

    It also keeps the CONNECT relays open per client host and destination
    (`bind.OpenConnects`), so a BIND can be limited to follow a primary
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
        self.live = LiveCounts()

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


@implementer(IHalfCloseableProtocol)
class SOCKS4Server(Protocol):
    """One client connection, from its first byte to its access record."""

    # A stream transport that is also a push producer and a consumer (TCP,
    # TLS, UNIX); Twisted's own annotation is the narrower Optional[ITransport].
    transport: Any
    connection: ConnectionInfo
    started: float

    def __init__(self, factory: SOCKS4ServerFactory, expect_header: bool = False) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.reactor = factory.reactor
        self.state = State.HEADER if expect_header else State.REQUEST
        self._header: Optional[HeaderParser] = HeaderParser() if expect_header else None
        self.request: Optional[Request] = None
        self.decision: Optional[Decision] = None
        self.relay: Optional[Relay] = None
        self.destination_address: Optional[str] = None
        self._replies: list[ReplyCode] = []
        self._reason = ""
        self._refusal: Optional[SOCKS4Refusal] = None
        self._abort_cause: Optional[AbortCause] = None
        self._parser = RequestParser(
            self.settings.max_user_id_length, self.settings.max_hostname_length
        )
        self._pending = PendingEvents()  # the client's, until the relay starts
        self._ident: Optional[SharedIdentQuery] = None
        self._timer: Optional[DelayedCall] = None
        self._timer_what = ""
        self._timer_seconds = 0.0
        self._chain: Optional[Deferred[RemoteProtocol]] = None
        self._logged = False
        self._via: Optional[NextHop] = None  # set when the request goes to the next hop
        self._hop_reply: Optional[str] = None
        self._time_to_grant: Optional[float] = None

    def _enter(self, state: State) -> None:
        self.state = enter(self.state, state)

    # -- connection events ------------------------------------------------

    def connectionMade(self) -> None:
        self.started = self.reactor.seconds()
        self.connection = ConnectionInfo.of_transport(self.transport)
        self.factory.live.change("connections", +1)
        self._set_timer(self.settings.request_timeout, "no complete request")

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.HEADER:
            self._read_header(data)
        elif self.state is State.REQUEST:
            self._read_request(data)
        elif self.state is State.RELAY:
            assert self.relay is not None
            self.relay.data(self.relay.client, data)
        elif self.state is not State.CLOSED:
            self._keep_early(data)

    def readConnectionLost(self) -> None:
        if self.state is State.RELAY:
            assert self.relay is not None
            self.relay.read_closed(self.relay.client)
        elif self.state is State.PENDING and self._is_connect():
            # A client may send its request and data, then shut down its
            # write half: deliver all of it once connected, then pass the FIN.
            self._pending.read_closed = True
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our write half closed during a relay; the relay tracks the rest."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self.state is State.RELAY:
            assert self.relay is not None
            self.relay.lost(self.relay.client)
        elif self.state is State.REQUEST:
            self._close_without_reply("client closed the connection before a complete request")
        elif self.state is State.HEADER:
            self._close_without_reply("closed before a complete PROXY header")
        elif self.state is not State.CLOSED:
            self._abort(ClientGone())

    # -- reading the PROXY header (a listener behind a balancer) -----------

    def _read_header(self, data: bytes) -> None:
        assert self._header is not None
        try:
            header = self._header.feed(data)
        except ProxyHeaderError as error:
            # Never served as the balancer: that would grant its address.
            self._close_without_reply(f"PROXY listener: {error}")
            return
        if header is not None:
            self._header_read(header, self._header.leftover)

    def _header_read(self, header: ProxyHeader, leftover: bytes) -> None:
        if header.command is ProxyCommand.LOCAL:
            # The balancer's own connection (a health check): no client, no
            # request, and no access record, or health checks would flood it.
            log.debug("PROXY LOCAL connection from {via}: closed", via=self.connection.client)
            self._logged = True
            self._close_without_reply("PROXY LOCAL")
            return
        self._enter(State.REQUEST)
        if header.source is None or header.destination is None:
            self._abort_cause = RequestRejectedOrFailed(
                f"PROXY v{header.version} header names no TCP client ({header.family})"
            )
        else:
            self.connection = self.connection.with_header(header.source, header.destination)
        if leftover:
            self._read_request(leftover)

    # -- reading the request ------------------------------------------------

    def _read_request(self, data: bytes) -> None:
        try:
            request = self._parser.feed(data)
        except NotSocks4 as error:
            self._not_socks4(error)
        except MalformedRequest as error:
            self._reply_and_close(error)
        else:
            if request is not None:
                self._begin(request)

    def _not_socks4(self, error: NotSocks4) -> None:
        answer, kind = foreign_protocol_answer(error.first_bytes)
        if answer:
            self.transport.write(answer)
        self._close_without_reply(f"sent {kind} ({error.first_bytes!r})")

    def _keep_early(self, data: bytes) -> None:
        self._pending.data(data)
        if self._pending.size < self.settings.early_data_limit:
            return
        if self._is_connect():
            self.transport.pauseProducing()
        else:
            # Paused, we would not see this client leave, and a BIND
            # listener must not outlive its client: refuse instead.
            self._abort(
                RequestRejectedOrFailed(
                    f"client sent {self._pending.size} bytes before its BIND completed"
                    f" (limit {self.settings.early_data_limit})"
                )
            )

    def _is_connect(self) -> bool:
        return self.request is not None and self.request.command is Command.CONNECT

    # -- the chain ------------------------------------------------------------

    def _begin(self, request: Request) -> None:
        self.request = request
        self._enter(State.PENDING)
        if self._parser.leftover:
            self._keep_early(self._parser.leftover)
        if isinstance(self._abort_cause, SOCKS4Refusal):
            self._reply_and_close(self._abort_cause)
            return
        self._set_timer(self.settings.connect_timeout, "no connection established")
        chain = self._connect_address(request)
        self._chain = chain if chain is not None else Deferred.fromCoroutine(self._serve(request))
        self._chain.addCallbacks(self._granted, self._ended)
        self._chain.addErrback(self._unexpected)

    def _context(self, addresses: tuple[str, ...]) -> PolicyContext:
        if self._ident is None:
            self._ident = SharedIdentQuery(self._start_ident_query)
        info = self.connection
        return PolicyContext(
            info.client_host,
            info.client_port,
            info.server_host,
            info.server_port,
            addresses,
            self._ident,
        )

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
        query: IdentQuery = self.factory.ident_query
        return query(
            info.client_host,
            info.client_port,
            info.server_host,
            info.server_port,
            reactor=self.reactor,
            ident_port=self.settings.ident_port,
            timeout=self.settings.ident_timeout,
        )

    def _connect_address(self, request: Request) -> Optional[Deferred[RemoteProtocol]]:
        """The hot path, a CONNECT to an IP address, without the coroutine.

        The same steps as `_serve` (policy, then connect), as plain calls
        and at most two Deferreds; None for every other request.
        """
        if (
            request.hostname is not None
            or request.command is not Command.CONNECT
            or is_unspecified(request.address)
        ):
            return None
        addresses = (request.address,)
        try:
            decided = self.factory.policy.check(request, self._context(addresses))
            if isinstance(decided, Deferred):
                return decided.addCallback(self._connect_decided)
            return self._connect_decided(decided)
        except Exception:  # a bug: the one "internal error" path, as in _serve
            return fail()

    def _connect_decided(self, decision: Decision) -> Deferred[RemoteProtocol]:
        self.decision = decision
        self._reason = decision.reason
        refusal = decision.refusal()
        if refusal is not None:
            return fail(refusal)
        assert self.request is not None
        self.destination_address = self.request.address
        if self.settings.source_addresses:
            # A chosen source address: the race's attempt binds it (and
            # refuses a family without one).
            raced = outbound.connect(
                self.reactor,
                (self.request.address,),
                self.request.port,
                self.settings.connect_timeout,
                _REMOTE_FACTORY,
                self.settings.source_addresses,
            )
            return cast("Deferred[RemoteProtocol]", raced.addCallback(lambda won: won[1]))
        connected = outbound.connect_one(
            self.reactor, self.request.address, self.request.port, _REMOTE_FACTORY
        )
        return cast("Deferred[RemoteProtocol]", connected)

    async def _serve(self, request: Request) -> RemoteProtocol:
        policy = self.factory.policy
        if request.hostname is not None and IEarlyRefusal.providedBy(policy):
            early = policy.refuse_early(request, self._context(()))
            refusal = early.refusal() if early is not None else None
            if refusal is not None:
                self.decision = early
                raise refusal
        try:
            addresses = await outbound.addresses_of(self.factory.resolver, request)
        except outbound.NotResolved:
            if self.factory.next_hop is None:
                raise
            self._via, addresses = self.factory.next_hop, ()
        decision = cast(
            Decision, await maybeDeferred(policy.check, request, self._context(addresses))
        )
        self.decision = decision
        self._reason = decision.reason
        refusal = decision.refusal()
        if refusal is not None:
            raise refusal
        if self._via is not None:
            return await self._through_next_hop(self._via, request)
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
        return await self._bind(addresses)

    async def _through_next_hop(self, hop: NextHop, request: Request) -> RemoteProtocol:
        if request.command is not Command.CONNECT:
            raise RequestRejectedOrFailed(
                f"{request.destination} does not resolve here; BIND is not forwarded"
                f" to the next hop {hop.name}"
            )
        try:
            remote = await hop.connect(
                self.reactor, request, self.settings.connect_timeout, _REMOTE_FACTORY
            )
        except NextHopFailed as failed:
            self._hop_reply = failed.answer
            log.info("{client}: {reason}", client=self._client, reason=failed.reason)
            raise
        self._hop_reply = "90"
        return cast(RemoteProtocol, remote)

    async def _bind(self, addresses: tuple[str, ...]) -> RemoteProtocol:
        if not self.settings.bind_without_connect and not self.factory.open_connects.any_open(
            self.connection.client_host, addresses
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
            self._bind_listening,
        )
        self.destination_address, _ = host_and_port(inbound.transport.getPeer())
        return inbound

    def _bind_listening(self, listener: bind.OneShotListener) -> None:
        """BIND's first reply: where the application server should connect."""
        self._send_reply(ReplyCode.GRANTED, listener.port, reply_address(listener.host))
        self._enter(State.BIND_WAIT)
        self._set_timer(self.settings.bind_timeout, "no inbound BIND connection")

    def _granted(self, remote: RemoteProtocol) -> None:
        self._cancel_timer()
        self._time_to_grant = self.reactor.seconds() - self.started
        peer_host, peer_port = host_and_port(remote.transport.getPeer())
        self._send_reply(ReplyCode.GRANTED, peer_port, reply_address(peer_host))
        relay = Relay(
            self.transport,
            remote.transport,
            self.reactor,
            self._relay_finished,
            self.settings.idle_timeout,
            self.settings.linger_timeout,
            self.settings.paused_check_interval,
        )
        self.relay = relay
        self._enter(State.RELAY)
        self.factory.live.change("relays", +1)
        self._track_connect(+1)
        relay.start(self._pending.take_data())
        remote.attach(relay)
        self._pending.replay(relay, relay.client)
        assert self.decision is not None
        if self.decision.on_granted is not None:
            try:
                self.decision.on_granted()
            except Exception:
                log.failure("the policy's on_granted for {client} failed", client=self._client)

    def _ended(self, failure: Failure) -> None:
        self._cancel_timer()
        cause: object = failure.value
        if failure.check(CancelledError) and self._abort_cause is not None:
            cause = self._abort_cause
        if isinstance(cause, SOCKS4Refusal):
            self._reply_and_close(cause)
        elif isinstance(cause, ClientGone):
            if self.state is State.BIND_WAIT:
                self._close_without_reply("client closed the connection before the second reply")
            else:
                self._close_without_reply("client closed the connection first")
        else:
            failure.raiseException()

    def _unexpected(self, failure: Failure) -> None:
        log.failure("unexpected error serving {client}", failure, client=self._client)
        if self.state is State.RELAY:
            self.transport.abortConnection()  # the relay finishes the record
        elif self.state is not State.CLOSED:
            self._reply_and_close(RequestRejectedOrFailed(f"internal error: {failure.value!r}"))

    def _abort(self, cause: AbortCause) -> None:
        """End the chain early; the first cause is the one recorded."""
        if self._abort_cause is None:
            self._abort_cause = cause
        if self._chain is not None and not self._chain.called:
            self._chain.cancel()

    # -- endings --------------------------------------------------------------

    def _send_reply(self, code: ReplyCode, port: int = 0, address: str = "0.0.0.0") -> None:
        self.transport.write(build_reply(code, port, address))
        self._replies.append(code)

    def _reply_and_close(self, refusal: SOCKS4Refusal) -> None:
        self._refusal = refusal
        self._reason = refusal.reason
        self._enter(State.CLOSED)
        self._cancel_timer()
        if not isinstance(self._abort_cause, ClientGone):
            self._send_reply(refusal.code)
            self.transport.loseConnection()
        self._finish()

    def _close_without_reply(self, reason: str) -> None:
        self._reason = reason
        self._enter(State.CLOSED)
        self._cancel_timer()
        self.transport.loseConnection()
        self._finish()

    def _relay_finished(self, relay: Relay) -> None:
        self.factory.live.change("relays", -1)
        self._track_connect(-1)
        if relay.idle_closed:
            self._reason = f"idle for {self.settings.idle_timeout:g} s"
        self._enter(State.CLOSED)
        self._finish()

    def _track_connect(self, delta: int) -> None:
        if self._is_connect() and self.destination_address is not None:
            self.factory.open_connects.count(
                self.connection.client_host, self.destination_address, delta
            )

    @property
    def _client(self) -> str:
        return self.connection.client

    @property
    def ident_answer(self) -> Optional[IdentAnswer]:
        """What the client's identd said, if it was asked and has answered."""
        if self.decision is not None and self.decision.ident is not None:
            return self.decision.ident
        return self._ident.answer if self._ident is not None else None

    def _finish(self) -> None:
        """Write the one access record this connection produces."""
        if self._logged:
            return
        self._logged = True
        self.factory.live.change("connections", -1)
        decision, relay = self.decision, self.relay
        emit(
            AccessRecord(
                connection=self.connection,
                request=self.request,
                decision=decision,
                ident=self.ident_answer,
                replies=tuple(self._replies),
                reason=self._reason,
                refusal=self._refusal,
                address=self.destination_address,
                bytes_up=relay.bytes_up if relay else 0,
                bytes_down=relay.bytes_down if relay else 0,
                started=self.started,
                duration=self.reactor.seconds() - self.started,
                cut_off=relay.cut_off if relay else None,
                dropped=relay.dropped if relay else 0,
                next_hop=self._via.name if self._via is not None else None,
                next_hop_reply=self._hop_reply,
                time_to_grant=self._time_to_grant,
            )
        )

    # -- the one timer ----------------------------------------------------------

    def _set_timer(self, seconds: float, what: str) -> None:
        """(Re)arm the one deadline; a live timer is moved, not replaced."""
        self._timer_what = what
        self._timer_seconds = seconds
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.reactor.callLater(seconds, self._time_up)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _time_up(self) -> None:
        self._timer = None
        what, seconds = self._timer_what, self._timer_seconds
        if self.state is State.HEADER:
            self._close_without_reply(f"no complete PROXY header within {seconds:g} s")
        elif self.state is State.REQUEST:
            self._close_without_reply(f"{what} within {seconds:g} s")
        else:
            self._abort(RequestRejectedOrFailed(f"{what} within {seconds:g} s"))
