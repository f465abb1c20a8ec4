"""One client connection of the SOCKS4/4A server, from its first byte to its record.

A connection is a small state machine (`State`, `TRANSITIONS`): it reads an
optional PROXY header and one request, then runs one chain of Deferreds
(`establish.Establishment`: resolve, policy and ident, connect, next hop
or BIND), replies and relays.  A single deadline covers the establishment
of the connection; whatever ends the chain early (a time limit, a BIND
client sending too much, the client leaving) is stored as the abort cause
before the chain is cancelled, and cancelling cancels whatever step is
pending, so no socket outlives its client.  Every ending writes exactly one
`AccessRecord`.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol as Structural, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident._types import DelayedCall
from socksident.accesslog import AccessRecord, emit
from socksident.address import host_and_port
from socksident.connection import ConnectionInfo
from socksident.establish import Establishment, SharedState
from socksident.ident import IdentAnswer
from socksident.livecounts import LiveCounts
from socksident.policy import Decision
from socksident.proxy import HeaderParser, ProxyCommand, ProxyHeader, ProxyHeaderError
from socksident.relay import PendingEvents, Relay, RemoteProtocol
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

__all__ = ["ClientGone", "ServerShared", "SOCKS4Server"]

log = Logger()


class ClientGone(Exception):
    """The abort cause when the client closed before its request was settled."""


AbortCause = Union[SOCKS4Refusal, ClientGone]


class ServerShared(SharedState, Structural):
    """What a connection needs of its factory (`server.SOCKS4ServerFactory`)."""

    live: LiveCounts
    open_connections: set[Any]  # the SOCKS4Server of each open connection (to cut off)


@implementer(IHalfCloseableProtocol)
class SOCKS4Server(Protocol):
    """One client connection, from its first byte to its access record."""

    # A stream transport that is also a push producer and a consumer (TCP,
    # TLS, UNIX); Twisted's own annotation is the narrower Optional[ITransport].
    transport: Any
    connection: ConnectionInfo
    started: float

    def __init__(self, factory: ServerShared, expect_header: bool = False) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.reactor = factory.reactor
        self.state = State.HEADER if expect_header else State.REQUEST
        self._header: Optional[HeaderParser] = HeaderParser() if expect_header else None
        self.request: Optional[Request] = None
        self.relay: Optional[Relay] = None
        self._replies: list[ReplyCode] = []
        self._reason: Optional[str] = None  # when not the decision's
        self._refusal: Optional[SOCKS4Refusal] = None
        self._abort_cause: Optional[AbortCause] = None
        self._parser = RequestParser(
            self.settings.max_user_id_length, self.settings.max_hostname_length
        )
        self._pending = PendingEvents()  # the client's, until the relay starts
        self._establishing: Optional[Establishment] = None
        self._timer: Optional[DelayedCall] = None
        self._timer_what = ""
        self._timer_seconds = 0.0
        self._chain: Optional[Deferred[RemoteProtocol]] = None
        self._logged = False
        self._recorded = True  # False: no access record (a balancer's health check)
        self._admitted_host: Optional[str] = None  # counted under the limits
        self._cut_off: Optional[str] = None  # why the server cut this connection off
        self._time_to_grant: Optional[float] = None

    def _enter(self, state: State) -> None:
        self.state = enter(self.state, state)

    # -- connection events ------------------------------------------------

    def connectionMade(self) -> None:
        self.started = self.reactor.seconds()
        self.connection = ConnectionInfo.of_transport(self.transport)
        self.factory.live.change("connections", +1)
        self.factory.open_connections.add(self)
        self._set_timer(self.settings.request_timeout, "no complete request")
        if self.state is State.REQUEST:
            self._admit()  # behind a balancer: once the header names the client

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
            self._recorded = False
            self._close_without_reply("PROXY LOCAL")
            return
        self._enter(State.REQUEST)
        if header.source is None or header.destination is None:
            self._abort_cause = RequestRejectedOrFailed(
                f"PROXY v{header.version} header names no TCP client ({header.family})"
            )
        else:
            self.connection = self.connection.with_header(header.source, header.destination)
            self._admit()
        if leftover:
            self._read_request(leftover)

    def cut_off(self, why: str) -> None:
        """End this connection now (a stopping server); its record says `why`."""
        self._cut_off = why
        self.transport.abortConnection()

    # -- the limits ------------------------------------------------------------

    def _admit(self) -> None:
        """Count this client under the limits, or mark it to be refused.

        A refused client is still read: it gets its 91 (naming the limit)
        once its request arrives, or is closed at the request deadline.
        """
        host = self.connection.client_host
        refusal = self.factory.live.admitted.admit(
            host, self.settings.max_connections, self.settings.max_per_host
        )
        if refusal is None:
            self._admitted_host = host
        elif self._abort_cause is None:
            self._abort_cause = refusal

    def _release(self) -> None:
        if self._admitted_host is not None:
            self.factory.live.admitted.release(self._admitted_host)
            self._admitted_host = None

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
        self._establishing = Establishment(
            self.factory, self.connection, request, self._bind_listening
        )
        self._chain = self._establishing.start()
        self._chain.addCallbacks(self._granted, self._ended)
        self._chain.addErrback(self._unexpected)

    def _bind_listening(self, host: str, port: int) -> None:
        """BIND's first reply: where the application server should connect
        (our listener, or the next hop's)."""
        self._send_reply(ReplyCode.GRANTED, port, reply_address(host))
        self._enter(State.BIND_WAIT)
        self._set_timer(self.settings.bind_timeout, "no inbound BIND connection")

    def _granted(self, remote: RemoteProtocol) -> None:
        self._cancel_timer()
        self._time_to_grant = self.reactor.seconds() - self.started
        assert self._establishing is not None
        granted = self._establishing.granted_address
        peer_host, peer_port = granted or host_and_port(remote.transport.getPeer())
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
        if self.state is State.REQUEST and isinstance(self._abort_cause, SOCKS4Refusal):
            # Refused before its request came (a limit, a header without a
            # client): the record says why it would have been refused.
            self._refusal = self._abort_cause
            reason = f"{self._abort_cause.reason}; {reason}"
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
        """Count an open CONNECT for the BINDs that may follow it: by the
        address reached, or through the next hop by the destination named."""
        if not self._is_connect():
            return
        assert self.request is not None and self._establishing is not None
        client = self.connection.client_host
        if self._establishing.via is not None:
            self.factory.open_hop_connects.count(client, self.request.destination, delta)
        elif self.destination_address is not None:
            self.factory.open_connects.count(client, self.destination_address, delta)

    @property
    def _client(self) -> str:
        return self.connection.client

    @property
    def ident_answer(self) -> Optional[IdentAnswer]:
        """What the client's identd said, if it was asked and has answered."""
        establishing = self._establishing
        return establishing.ident_answer if establishing is not None else None

    @property
    def decision(self) -> Optional[Decision]:
        """The policy's decision, once it has decided."""
        return self._establishing.decision if self._establishing is not None else None

    @property
    def destination_address(self) -> Optional[str]:
        """The address connected to (or, for BIND, the application server's)."""
        establishing = self._establishing
        return establishing.destination_address if establishing is not None else None

    def _finish(self) -> None:
        """Write the one access record this connection produces."""
        if self._logged:
            return
        self._logged = True
        self.factory.live.change("connections", -1)
        self.factory.open_connections.discard(self)
        self._release()
        if not self._recorded:
            return
        decision, relay, establishing = self.decision, self.relay, self._establishing
        reason = self._reason
        if reason is None:
            reason = decision.reason if decision is not None else ""
        if self._cut_off is not None:
            reason = f"{reason}; cut off: {self._cut_off}" if reason else self._cut_off
        via = establishing.via if establishing is not None else None
        emit(
            AccessRecord(
                connection=self.connection,
                request=self.request,
                decision=decision,
                ident=self.ident_answer,
                replies=tuple(self._replies),
                reason=reason,
                refusal=self._refusal,
                address=self.destination_address,
                bytes_up=relay.bytes_up if relay else 0,
                bytes_down=relay.bytes_down if relay else 0,
                started=self.started,
                duration=self.reactor.seconds() - self.started,
                cut_off=relay.cut_off if relay else None,
                dropped=relay.dropped if relay else 0,
                next_hop=via.name if via is not None else None,
                next_hop_reply=establishing.hop_reply if establishing is not None else None,
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
