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

from dataclasses import replace
from typing import Any, Optional, Protocol as Structural, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident.accesslog import AccessRecord, emit
from socksident.address import host_and_port
from socksident.connection import ConnectionInfo
from socksident.deadline import Deadline
from socksident.establish import Establishment, SharedState
from socksident.ident import IdentAnswer
from socksident.livecounts import Admission, LiveCounts
from socksident.proxy import HeaderParser, ProxyCommand, ProxyHeader, ProxyHeaderError
from socksident.relay import Relay
from socksident.remote import PendingEvents, RemoteProtocol
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
from socksident.writenow import write_now

__all__ = ["ClientGone", "ServerShared", "SOCKS4Server"]

log = Logger()

_ONE_REPLY = {code: (code,) for code in ReplyCode}


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

    # One per open connection, relays idle for hours among them: slots, for
    # Protocol's own attributes too.
    __slots__ = ("transport", "connected", "factory", "settings", "reactor", "state", "_header",
                 "request", "relay", "_replies", "_reason", "_refusal", "_abort_cause",
                 "_parser", "_pending", "_establishing", "_deadline", "_chain", "_logged",
                 "_recorded", "_admission", "_cut_off", "_time_to_grant", "connection", "started")

    # A stream transport that is also a push producer and a consumer (TCP,
    # TLS, UNIX); Twisted's own annotation is the narrower Optional[ITransport].
    transport: Any
    connection: ConnectionInfo
    started: float

    def __init__(self, factory: ServerShared, expect_header: bool = False) -> None:
        self.transport = None
        self.connected = 0
        self.factory = factory
        self.settings = factory.settings
        self.reactor = factory.reactor
        self.state = State.HEADER if expect_header else State.REQUEST
        self._header: Optional[HeaderParser] = HeaderParser() if expect_header else None
        self.request: Optional[Request] = None
        self.relay: Optional[Relay] = None
        self._replies: tuple[ReplyCode, ...] = ()
        self._reason: Optional[str] = None  # when not the decision's
        self._refusal: Optional[SOCKS4Refusal] = None
        self._abort_cause: Optional[AbortCause] = None
        self._parser: Optional[RequestParser] = RequestParser(
            self.settings.max_user_id_length, self.settings.max_hostname_length
        )  # until the request is read
        # The client's early bytes and end, until the relay starts (then None).
        self._pending: Optional[PendingEvents] = PendingEvents()
        self._establishing: Optional[Establishment] = None
        # The one time limit until the connection is settled (then None).
        self._deadline: Optional[Deadline] = Deadline(self.reactor, self._time_up)
        self._chain: Optional[Deferred[RemoteProtocol]] = None
        self._logged = False
        self._recorded = True  # False: no access record (a balancer's health check)
        self._admission: Optional[Admission] = None  # its place under the limits
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
        self._limit(self.settings.request_timeout, "no complete request")
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
            assert self._pending is not None
            self._pending.read_closed = True
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our write half closed during a relay; the relay tracks the rest."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._settled()
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
        try:
            self.connection = self.connection.behind(header)
        except RequestRejectedOrFailed as refusal:
            self._abort_cause = refusal
        else:
            self._admit()
        if leftover:
            self._read_request(leftover)

    def cut_off(self, why: str) -> None:
        """End this connection now (a stopping server); its record says `why`."""
        self._cut_off = why
        if self.relay is not None:
            self.relay.unsplice()  # the sockets are Twisted's again before the abort
        self.transport.abortConnection()

    # -- the limits ------------------------------------------------------------

    def _admit(self) -> None:
        """Count this client under the limits, or mark it to be refused.

        A refused client is still read: it gets its 91 (naming the limit)
        once its request arrives, or is closed at the request deadline.
        """
        taken = self.factory.live.admitted.take(
            self.connection.client_host, self.settings.max_connections, self.settings.max_per_host
        )
        if isinstance(taken, Admission):
            self._admission = taken
        elif self._abort_cause is None:
            self._abort_cause = taken

    # -- reading the request ------------------------------------------------

    def _read_request(self, data: bytes) -> None:
        assert self._parser is not None
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
        assert self._pending is not None  # (no relay yet)
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
        assert self._parser is not None
        parser, self._parser = self._parser, None  # a relay may last for days
        if parser.leftover:
            self._keep_early(parser.leftover)
        if isinstance(self._abort_cause, SOCKS4Refusal):
            self._reply_and_close(self._abort_cause)
            return
        self._limit(self.settings.connect_timeout, "no connection established")
        self._establishing = Establishment(self.factory, self.connection, request)
        chain = self._chain = self._establishing.start(self._bind_listening)
        chain.addCallbacks(self._granted, self._ended)  # (may settle at once)
        chain.addErrback(self._unexpected)

    def _bind_listening(self, host: str, port: int) -> None:
        """BIND's first reply: where the application server should connect
        (our listener, or the next hop's)."""
        self._send_reply(ReplyCode.GRANTED, port, reply_address(host))
        self._enter(State.BIND_WAIT)
        self._limit(self.settings.bind_timeout, "no inbound BIND connection")

    def _granted(self, remote: RemoteProtocol) -> None:
        self._settled()
        self._chain = None  # settled: a relay may last for days
        self._time_to_grant = self.reactor.seconds() - self.started
        assert self._establishing is not None
        granted = self._establishing.granted_address
        peer_host, peer_port = granted or host_and_port(remote.transport.getPeer())
        self._send_reply(ReplyCode.GRANTED, peer_port, reply_address(peer_host))
        relay = Relay.for_connection(
            self.transport, remote.transport, self.reactor, self._relay_finished, self.settings
        )
        self.relay = relay
        self._enter(State.RELAY)
        self.factory.live.change("relays", +1)
        assert self._establishing is not None
        self._establishing.track_open_connect(+1)
        pending, self._pending = self._pending, None  # a relay may last for days
        assert pending is not None
        relay.start(pending.take_data())
        remote.attach(relay)
        pending.replay(relay, relay.client)
        self._establishing.run_on_granted()

    def _ended(self, failure: Failure) -> None:
        self._settled()
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
        log.failure("unexpected error serving {client}", failure, client=self.connection.client)
        if self.state is State.RELAY:
            assert self.relay is not None
            self.relay.unsplice()
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
        write_now(self.transport, build_reply(code, port, address))
        # Most connections send one reply: its tuple is shared, not kept per relay.
        self._replies = self._replies + (code,) if self._replies else _ONE_REPLY[code]

    def _reply_and_close(self, refusal: SOCKS4Refusal) -> None:
        self._refusal = refusal
        self._reason = refusal.reason
        self._enter(State.CLOSED)
        self._settled()
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
        self._settled()
        self.transport.loseConnection()
        self._finish()

    def _relay_finished(self, relay: Relay) -> None:
        self.factory.live.change("relays", -1)
        assert self._establishing is not None
        self._establishing.track_open_connect(-1)
        if relay.idle_closed:
            self._reason = f"idle for {self.settings.idle_timeout:g} s"
        self._enter(State.CLOSED)
        self._finish()

    @property
    def ident_answer(self) -> Optional[IdentAnswer]:
        """What the client's identd said, if it was asked and has answered."""
        establishing = self._establishing
        return establishing.ident_answer if establishing is not None else None

    def _finish(self) -> None:
        """Write the one access record this connection produces."""
        if self._logged:
            return
        self._logged = True
        self.factory.live.change("connections", -1)
        self.factory.open_connections.discard(self)
        if self._admission is not None:
            self._admission.release()
        if not self._recorded:
            return
        record = AccessRecord.of(
            self.connection,
            self.request,
            self._establishing,
            self.relay,
            replies=self._replies,
            reason=self._reason,
            refusal=self._refusal,
            started=self.started,
            duration=self.reactor.seconds() - self.started,
            time_to_grant=self._time_to_grant,
        )
        if self._cut_off is not None:
            why = f"{record.reason}; cut off: {self._cut_off}" if record.reason else self._cut_off
            record = replace(record, reason=why)
        emit(record)

    # -- the one deadline ---------------------------------------------------------

    def _limit(self, seconds: float, what: str) -> None:
        assert self._deadline is not None  # (set only until the connection is settled)
        self._deadline.set(seconds, what)

    def _settled(self) -> None:
        """Granted, refused or gone: no time limit any more, and no timer kept
        for a relay that may last for days."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _time_up(self, what: str, seconds: float) -> None:
        if self.state is State.HEADER:
            self._close_without_reply(f"no complete PROXY header within {seconds:g} s")
        elif self.state is State.REQUEST:
            self._close_without_reply(f"{what} within {seconds:g} s")
        else:
            self._abort(RequestRejectedOrFailed(f"{what} within {seconds:g} s"))
