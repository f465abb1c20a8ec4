"""The SOCKS4/4A server: one `SOCKS4Server` protocol per client connection.

A connection reads one request, then runs one chain of Deferreds (written as
a coroutine): resolve a SOCKS4A name, ask the policy (which may ask identd),
connect or listen-and-accept, reply, relay.  A single deadline covers the
establishment of the connection with the application server; cancelling the
chain cancels whatever step is pending, and every step cleans up after
itself, so no socket outlives its client.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, cast

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHostnameResolver,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident import bind
from socksident.address import host_and_port, ip_of, is_unspecified
from socksident.ident import IdentAnswer, IdentOutcome
from socksident.identclient import query_ident
from socksident.policy import DefaultPolicy, IEarlyRefusal, IPolicy, PolicyContext
from socksident.relay import Relay, RemoteProtocol
from socksident.socks4 import (
    MAX_HOSTNAME_LENGTH,
    MAX_USER_ID_LENGTH,
    Command,
    NotSocks4,
    ProtocolError,
    ReplyCode,
    Request,
    RequestParser,
    build_reply,
)

log = Logger()
access_log = Logger(namespace="socksident.access")

SOCKS5_NO_ACCEPTABLE_METHODS = b"\x05\xff"
HTTP_NOT_A_WEB_PROXY = (
    b"HTTP/1.0 400 Bad Request\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: close\r\n\r\n"
    b"This is a SOCKS4/SOCKS4A proxy, not an HTTP proxy. "
    b"Configure your client for SOCKS4 or SOCKS4A.\r\n"
)


@dataclass(frozen=True)
class ServerSettings:
    """Every limit the server enforces, with the defaults documented in the README."""

    request_timeout: float = 30.0  # time to send a complete request
    connect_timeout: float = 120.0  # the protocol's 2 minutes to establish a connection
    bind_timeout: float = 120.0  # time for BIND's inbound connection to arrive
    idle_timeout: Optional[float] = None  # close a relay silent this long; None: never
    ident_timeout: float = 15.0  # connect + answer, as the CSTC server
    ident_port: int = 113
    bind_without_connect: bool = False
    bind_ports: Optional[tuple[int, int]] = None  # None: any free port
    bind_address: Optional[str] = None  # None: the address the client connected to
    max_user_id_length: int = MAX_USER_ID_LENGTH
    max_hostname_length: int = MAX_HOSTNAME_LENGTH
    early_data_limit: int = 64 * 1024  # buffered client bytes before its reply


class Refused(Exception):
    """The request ends with `code`; `reason` goes to the access log."""

    def __init__(self, code: ReplyCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _ident_summary(answer: Optional[IdentAnswer]) -> str:
    """The ident result as the access log's text shows it.

    ``-`` (nobody was asked), ``user:'name'``, ``error:TYPE`` or ``no-answer``;
    the structured event carries the same in its ``ident_*`` fields.
    """
    if answer is None:
        return "-"
    if answer.user_id is not None:
        return f"user:{answer.user_id!r}"
    if answer.outcome is IdentOutcome.ERROR:
        return f"error:{answer.error}"
    return "no-answer"


def _reply_address(host: str) -> str:
    """SOCKS4 replies carry IPv4 only; 0.0.0.0 tells the client to use ours."""
    address = ip_of(host)
    return str(address) if isinstance(address, ipaddress.IPv4Address) else "0.0.0.0"


_REMOTE_FACTORY = Factory.forProtocol(RemoteProtocol)
_REMOTE_FACTORY.noisy = False


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects a name's addresses from an IHostnameResolver into a Deferred."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.done: "Deferred[tuple[str, ...]]" = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if host is not None and host not in self.found:
            self.found.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(tuple(self.found))


class SOCKS4ServerFactory(Factory):
    """Holds what all connections share: policy, settings, reactor, resolver.

    It also remembers which CONNECT relays are open, per client host and
    destination, so a BIND can be limited to follow a primary CONNECT.
    """

    def __init__(
        self,
        policy: Optional[IPolicy] = None,
        settings: Optional[ServerSettings] = None,
        reactor: Any = None,
        resolver: Optional[IHostnameResolver] = None,
        ident_query: Any = query_ident,
    ) -> None:
        self.policy = policy if policy is not None else DefaultPolicy()
        self.settings = settings if settings is not None else ServerSettings()
        self._reactor = reactor
        self._resolver = resolver
        self.ident_query = ident_query
        self.open_connects: Counter[tuple[str, str]] = Counter()

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def resolver(self) -> IHostnameResolver:
        if self._resolver is None:
            self._resolver = self.reactor.nameResolver
        return self._resolver

    def buildProtocol(self, addr: Optional[IAddress]) -> "SOCKS4Server":
        return SOCKS4Server(self)


@implementer(IHalfCloseableProtocol)
class SOCKS4Server(Protocol):
    """One client connection, from its first byte to the access-log line."""

    # A stream transport that is also a push producer and a consumer (TCP,
    # TLS, UNIX); Twisted's own annotation is the narrower Optional[ITransport].
    transport: Any

    def __init__(self, factory: SOCKS4ServerFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.reactor = factory.reactor
        self.state = "request"
        self.request: Optional[Request] = None
        self.code: Optional[ReplyCode] = None
        self.reason = ""
        self.rule: Optional[str] = None
        self.destination_address: Optional[str] = None
        self.ident_answer: Optional[IdentAnswer] = None
        self.relay: Optional[Relay] = None
        self._parser = RequestParser(
            self.settings.max_user_id_length, self.settings.max_hostname_length
        )
        self._early: list[bytes] = []
        self._early_size = 0
        self._client_read_closed = False
        self._client_gone = False
        self._timed_out: Optional[str] = None
        self._too_early: Optional[str] = None  # why a BIND client was cut off
        self._timer: Optional[IDelayedCall] = None
        self._chain: Optional[Deferred[Any]] = None
        self._listener: Optional[bind.OneShotListener] = None
        self._ident_query: Optional[Deferred[IdentAnswer]] = None
        self._ident_waiters: list[Deferred[IdentAnswer]] = []
        self._logged = False

    # -- connection events ------------------------------------------------

    def connectionMade(self) -> None:
        self.started = self.reactor.seconds()
        self.client_host, self.client_port = host_and_port(self.transport.getPeer())
        self.server_host, self.server_port = host_and_port(self.transport.getHost())
        self._set_timer(self.settings.request_timeout, "no complete request")

    def dataReceived(self, data: bytes) -> None:
        if self.state == "request":
            self._read_request(data)
        elif self.state == "relay":
            assert self.relay is not None
            self.relay.data(self.relay.client, data)
        elif self.state in ("pending", "bind-wait"):
            self._keep_early(data)

    def readConnectionLost(self) -> None:
        if self.state == "relay":
            assert self.relay is not None
            self.relay.read_closed(self.relay.client)
        elif self.state == "pending" and self.request is not None and (
            self.request.command is Command.CONNECT
        ):
            # A client may send its request and data, then shut down its
            # write half: deliver all of it once connected, then pass the FIN.
            self._client_read_closed = True
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our write half closed during a relay; the relay tracks the rest."""

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self._cancel_timer()
        if self.state == "relay":
            assert self.relay is not None
            self.relay.lost(self.relay.client)
            return
        self._client_gone = True
        if self.state == "request":
            self.state = "closed"
            log.debug("{client} left before sending a request", client=self.client_host)
        elif self._chain is not None and not self._chain.called:
            self._chain.cancel()

    # -- reading the request ------------------------------------------------

    def _read_request(self, data: bytes) -> None:
        try:
            request = self._parser.feed(data)
        except NotSocks4 as error:
            self._not_socks4(error)
            return
        except ProtocolError as error:
            assert error.reply is not None
            self._reply_and_close(error.reply, error.reason)
            return
        if request is not None:
            self._begin(request)

    def _not_socks4(self, error: NotSocks4) -> None:
        first = error.first_bytes
        if first[:1] == b"\x05":
            self.transport.write(SOCKS5_NO_ACCEPTABLE_METHODS)
            kind = "a SOCKS5 greeting"
        elif first[:1].isalpha():
            self.transport.write(HTTP_NOT_A_WEB_PROXY)
            kind = "what looks like HTTP"
        else:
            kind = "not SOCKS4"
        log.info(
            "{client} sent {kind} ({first!r}); closed",
            client=self.client_host,
            kind=kind,
            first=first,
        )
        self.state = "closed"
        self._cancel_timer()
        self.transport.loseConnection()

    def _keep_early(self, data: bytes) -> None:
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size >= self.settings.early_data_limit:
            if self.request is not None and self.request.command is Command.BIND:
                # Paused, we would not see this client leave, and a BIND
                # listener must not outlive its client: refuse instead.
                self._too_early = (
                    f"client sent {self._early_size} bytes before its BIND completed"
                    f" (limit {self.settings.early_data_limit})"
                )
                if self._chain is not None and not self._chain.called:
                    self._chain.cancel()
            else:
                self.transport.pauseProducing()

    # -- the chain ------------------------------------------------------------

    def _begin(self, request: Request) -> None:
        self.request = request
        self.state = "pending"
        if self._parser.leftover:
            self._keep_early(self._parser.leftover)
        if self._too_early:
            self._reply_and_close(ReplyCode.REJECTED, self._too_early)
            return
        self._set_timer(self.settings.connect_timeout, "no connection established")
        self._chain = Deferred.fromCoroutine(self._serve(request))
        self._chain.addCallbacks(self._granted, self._ended)
        self._chain.addErrback(self._unexpected)

    def _context(self, addresses: tuple[str, ...]) -> PolicyContext:
        return PolicyContext(
            self.client_host,
            self.client_port,
            self.server_host,
            self.server_port,
            addresses,
            self._ident,
        )

    async def _serve(self, request: Request) -> RemoteProtocol:
        policy = self.factory.policy
        if request.hostname is not None and IEarlyRefusal.providedBy(policy):
            refusal = policy.refuse_early(request, self._context(()))
            if refusal is not None:
                self.rule = refusal.rule
                raise Refused(refusal.code, refusal.reason)
        addresses = await self._resolve(request)
        if not addresses:
            raise Refused(ReplyCode.REJECTED, f"{request.destination} does not resolve")
        if any(is_unspecified(address) for address in addresses):
            # 0.0.0.0 and :: reach this host itself; no rule is written for them.
            raise Refused(
                ReplyCode.REJECTED, f"{request.destination} is the unspecified address"
            )
        decision = await maybeDeferred(policy.check, request, self._context(addresses))
        self.rule, self.reason = decision.rule, decision.reason
        self.ident_answer = decision.ident or self.ident_answer
        if not decision.granted:
            raise Refused(decision.code, decision.reason)
        if request.command is Command.CONNECT:
            return await self._connect(addresses, request.port)
        return await self._bind(addresses)

    async def _resolve(self, request: Request) -> tuple[str, ...]:
        if request.hostname is None:
            return (request.address,)
        receiver = _Addresses()
        self.factory.resolver.resolveHostName(
            receiver, request.hostname, portNumber=request.port
        )
        return await receiver.done

    def _ident(self) -> "Deferred[IdentAnswer]":
        """Ask the client's identd once; every caller shares the answer."""
        if self.ident_answer is not None:
            return succeed(self.ident_answer)
        waiter: Deferred[IdentAnswer] = Deferred(self._ident_waiter_cancelled)
        self._ident_waiters.append(waiter)
        if self._ident_query is None:
            self._ident_query = self.factory.ident_query(
                self.client_host,
                self.client_port,
                self.server_host,
                self.server_port,
                reactor=self.reactor,
                ident_port=self.settings.ident_port,
                timeout=self.settings.ident_timeout,
            )
            self._ident_query.addCallbacks(self._ident_answered, self._ident_failed)
        return waiter

    def _ident_answered(self, answer: IdentAnswer) -> None:
        self.ident_answer = answer
        waiters, self._ident_waiters = self._ident_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(answer)

    def _ident_failed(self, failure: Failure) -> None:
        """The query's own cancellation (its last waiter's doing) or a bug in an
        injected `ident_query`: whoever still waits learns of it at once."""
        waiters, self._ident_waiters = self._ident_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(failure)

    def _ident_waiter_cancelled(self, waiter: "Deferred[IdentAnswer]") -> None:
        """The query stops when its last waiter gives up, not before."""
        if waiter in self._ident_waiters:
            self._ident_waiters.remove(waiter)
        if (
            not self._ident_waiters
            and self._ident_query is not None
            and not self._ident_query.called
        ):
            self._ident_query.cancel()

    async def _connect(self, addresses: tuple[str, ...], port: int) -> RemoteProtocol:
        """Try each permitted address in turn, as HostnameEndpoint would."""
        failures = []
        for address in addresses:
            endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = endpoint_type(
                self.reactor, address, port, timeout=self.settings.connect_timeout
            )
            try:
                remote = cast(RemoteProtocol, await endpoint.connect(_REMOTE_FACTORY))
            except (CancelledError, ConnectingCancelledError):
                raise CancelledError()
            except Exception as error:
                failures.append(f"{address}: {error}")
                continue
            self.destination_address = address
            return remote
        raise Refused(ReplyCode.REJECTED, "connect failed: " + "; ".join(failures))

    async def _bind(self, addresses: tuple[str, ...]) -> RemoteProtocol:
        if not self.settings.bind_without_connect and not any(
            self.factory.open_connects[(self.client_host, a)] for a in addresses
        ):
            raise Refused(
                ReplyCode.REJECTED,
                "BIND without an open CONNECT from this client to "
                f"{', '.join(addresses)} (see --bind-without-connect)",
            )
        try:
            listener = bind.listen_once(
                self.reactor,
                self.settings.bind_address or self.server_host,
                bind.candidate_ports(self.settings.bind_ports),
            )
        except bind.NoFreePort as error:
            raise Refused(ReplyCode.REJECTED, str(error))
        self._listener = listener
        try:
            self.code = ReplyCode.GRANTED  # the first reply; the second decides
            self.transport.write(
                build_reply(ReplyCode.GRANTED, listener.port, _reply_address(listener.host))
            )
            self.state = "bind-wait"
            self._set_timer(self.settings.bind_timeout, "no inbound BIND connection")
            inbound = await listener.accepted
        finally:
            listener.close()
        peer, _ = host_and_port(inbound.transport.getPeer())
        if peer not in addresses:
            inbound.transport.abortConnection()
            raise Refused(
                ReplyCode.REJECTED,
                f"BIND connection came from {peer}, not {', '.join(addresses)}",
            )
        self.destination_address = peer
        return inbound

    def _granted(self, remote: RemoteProtocol) -> None:
        self._cancel_timer()
        peer_host, peer_port = host_and_port(remote.transport.getPeer())
        self.code = ReplyCode.GRANTED
        self.transport.write(
            build_reply(ReplyCode.GRANTED, peer_port, _reply_address(peer_host))
        )
        relay = Relay(
            self.transport,
            remote.transport,
            self.reactor,
            self._relay_finished,
            self.settings.idle_timeout,
        )
        self.relay = relay
        self.state = "relay"
        self._track_connect(+1)
        early, self._early = b"".join(self._early), []
        relay.start(early)
        remote.attach(relay)
        if self._client_read_closed:
            relay.read_closed(relay.client)
        else:
            self.transport.resumeProducing()

    def _ended(self, failure: Failure) -> None:
        self._cancel_timer()
        if self._listener is not None:
            self._listener.close()
        if isinstance(failure.value, Refused):
            self._reply_and_close(failure.value.code, failure.value.reason)
        elif failure.check(CancelledError) and self._timed_out:
            self._reply_and_close(
                ReplyCode.REJECTED,
                f"{self._timed_out} within {self._timeout_seconds:g} s",
            )
        elif failure.check(CancelledError) and self._too_early:
            self._reply_and_close(ReplyCode.REJECTED, self._too_early)
        elif failure.check(CancelledError) and self._client_gone:
            self.reason = "client closed the connection first"
            self._finish()
        else:
            failure.raiseException()

    def _unexpected(self, failure: Failure) -> None:
        log.failure("unexpected error serving {client}", failure, client=self.client_host)
        self._reply_and_close(ReplyCode.REJECTED, f"internal error: {failure.value!r}")

    # -- endings --------------------------------------------------------------

    def _reply_and_close(self, code: ReplyCode, reason: Optional[str] = None) -> None:
        self.code = code
        if reason is not None:
            self.reason = reason
        self.state = "closed"
        self._cancel_timer()
        if not self._client_gone:
            self.transport.write(build_reply(code))
            self.transport.loseConnection()
        self._finish()

    def _relay_finished(self, relay: Relay) -> None:
        self._track_connect(-1)
        if relay.idle_closed:
            self.reason = f"idle for {self.settings.idle_timeout:g} s"
        self.state = "closed"
        self._finish()

    def _track_connect(self, delta: int) -> None:
        request = self.request
        if request is not None and request.command is Command.CONNECT:
            key = (self.client_host, self.destination_address or "")
            self.factory.open_connects[key] += delta
            if self.factory.open_connects[key] <= 0:
                del self.factory.open_connects[key]

    def _finish(self) -> None:
        """Write the one access-log event this request produces."""
        if self._logged:
            return
        self._logged = True
        request = self.request
        relay = self.relay
        answer = self.ident_answer
        fields: dict[str, Any] = dict(
            client=f"{self.client_host}:{self.client_port}",
            user=request.user_id if request else None,
            command=request.command.name if request else None,
            destination=request.destination if request else None,
            port=request.port if request else None,
            address=self.destination_address,
            code=int(self.code) if self.code is not None else None,
            reason=self.reason,
            rule=self.rule,
            ident=_ident_summary(answer),
            ident_outcome=answer.outcome.value if answer else None,
            ident_user=answer.user_id if answer else None,
            ident_opsys=answer.opsys if answer else None,
            ident_error=answer.error if answer else None,
            ident_duration=answer.duration if answer else None,
            bytes_up=relay.bytes_up if relay else 0,
            bytes_down=relay.bytes_down if relay else 0,
            duration=self.reactor.seconds() - self.started,
        )
        via = (
            f" [{self.destination_address}]"
            if request and request.hostname and self.destination_address
            else ""
        )
        # One preformatted field: every log line is formatted by the text
        # observer, and a format string of twenty fields costs more than the
        # relay itself on short connections.  The fields stay in the event.
        asked = (
            f" user={fields['user']!r} ident={fields['ident']}"
            f" {fields['command']} {fields['destination']}:{fields['port']}{via}"
            if request is not None
            else " (no valid request)"
        )
        summary = (
            f"{fields['client']}{asked} -> {fields['code']} ({self.reason})"
            f" up={fields['bytes_up']} down={fields['bytes_down']}"
            f" in {fields['duration']:.3f}s"
        )
        access_log.info("{summary}", summary=summary, **fields)

    # -- the one timer ----------------------------------------------------------

    def _set_timer(self, seconds: float, what: str) -> None:
        self._cancel_timer()
        self._timeout_seconds = seconds
        self._timer = self.reactor.callLater(seconds, self._time_up, what)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _time_up(self, what: str) -> None:
        self._timer = None
        self._timed_out = what
        if self.state == "request":
            self.state = "closed"
            log.info(
                "{client} sent {what} within {seconds:g} s; closed",
                client=self.client_host,
                what=what,
                seconds=self._timeout_seconds,
            )
            self.transport.loseConnection()
        elif self._chain is not None and not self._chain.called:
            self._chain.cancel()
