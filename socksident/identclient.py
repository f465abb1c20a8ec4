"""The Twisted side of RFC 1413: ask the client's identd who owns a connection.

`query_ident` always fires with an `IdentAnswer`; refused or unreachable
identds, time-outs and garbage are answers too (``NO_ANSWER``), because the
caller's policy (`socksident.policy.verdict`) decides what they mean.  One
time limit covers both the connect and the answer, and every way out closes
the connection and cancels the timer, so nothing outlives the Deferred.

Security: an ident answer comes from the client's own host and is only as
trustworthy as that host and the network path to it (RFC 1413, section 6).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any, Callable, Optional
from typing import Protocol as _Interface
from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from socksident._types import DelayedCall, ReactorTCPTime, global_reactor
from socksident.address import ip_of
from socksident.dial import dial
from socksident.ident import (
    IdentAnswer,
    IdentOutcome,
    MalformedResponse,
    ResponseReader,
    build_query,
)
from socksident.writenow import close_now, write_now

__all__ = ["IDENT_PORT", "DEFAULT_TIMEOUT", "IdentQuery", "IdentReactor", "SharedIdentQuery", "query_ident"]

IDENT_PORT = 113
#: The original SOCKS4 server's limit; RFC 1413 suggests clients wait longer.
DEFAULT_TIMEOUT = 15.0

log = Logger()


class _Transport(_Interface):
    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...


#: What the ident client needs from a reactor: IReactorTCP and IReactorTime.
IdentReactor = ReactorTCPTime


def _connect_host(client_host: str) -> str:
    """Where to reach the identd.

    A dual-stack listener reports IPv4 clients as ``::ffff:a.b.c.d``; asking
    the plain IPv4 address works whether or not the host has IPv6.
    """
    address = ip_of(client_host)
    if address is None or isinstance(address, ipaddress.IPv6Address):
        return client_host  # names and scoped addresses pass through
    return str(address)


def _bind_address(server_host: str, connect_host: str) -> Optional[str]:
    """Query from the address the client connected to, as RFC 1413 expects.

    No bind for an unspecified address (we do not know which one the client
    used) or when the families differ (the bind would only fail).
    """
    server = ip_of(server_host)
    client = ip_of(connect_host)
    if server is None or server.is_unspecified:
        return None
    if client is not None and client.version != server.version:
        return None
    if "%" in server_host:  # a link-local address binds only with its scope
        return server_host
    return str(server)


class _IdentProtocol(Protocol):
    """Hands the connection's events to the query that owns it."""

    def __init__(self, query: _IdentQuery) -> None:
        self._query = query

    def connectionMade(self) -> None:
        self._query.connected(cast(_Transport, self.transport))

    def dataReceived(self, data: bytes) -> None:
        self._query.data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._query.connection_lost(reason)


class _IdentFactory(Factory):
    noisy = False  # no "Starting factory" line for every query

    def __init__(self, query: _IdentQuery) -> None:
        self._query = query

    def buildProtocol(self, addr: Optional[IAddress]) -> _IdentProtocol:
        return _IdentProtocol(self._query)


class _IdentQuery:
    """One query from connect to answer, started when made; finishes exactly once.

    ``_attempt`` is the connect under way (None once it has connected or
    failed), ``_transport`` the connection once made (None once lost).
    """

    def __init__(
        self,
        reactor: IdentReactor,
        client_host: str,
        client_port: int,
        server_host: str,
        server_port: int,
        ident_port: int,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._query = build_query(client_port, server_port)
        self._reader = ResponseReader(client_port, server_port)
        self._host = _connect_host(client_host)
        self._bind = _bind_address(server_host, self._host)
        self._ports = (client_port, server_port)
        self._timeout = timeout
        self.deferred: Deferred[IdentAnswer] = Deferred(self._cancel)
        self._transport: Optional[_Transport] = None
        self._done = False
        self._started = reactor.seconds()
        self._timer = cast(DelayedCall, reactor.callLater(timeout, self._timed_out))
        # No event here: twistd writes debug events too, and the answer's
        # event (and the access record) already say who was asked.
        # `dial`, not connectTCP: no connector per query, and a source
        # address that does not pick its port until connect() (see `dial`).
        # No time limit of the attempt's own: our one timer reports (and
        # counts) every time-out, and a request costs one timer less.
        self._attempt: Optional[Deferred[IProtocol]] = dial(
            reactor, self._host, ident_port, _IdentFactory(self), self._bind
        )
        self._attempt.addErrback(self.connection_failed)

    # Events from the attempt and the protocol.

    def connected(self, transport: _Transport) -> None:
        self._attempt = None
        if self._done:
            transport.abortConnection()
            return
        self._transport = transport
        write_now(transport, self._query)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        try:
            answer = self._reader.feed(data)
        except MalformedResponse as e:
            self._no_answer(f"malformed answer: {e}", abort=True)
            return
        if answer is not None:
            self._finish(answer, abort=False)

    def connection_lost(self, reason: Failure) -> None:
        self._transport = None
        if self._done:
            return
        try:
            self._reader.connection_closed()
        except MalformedResponse as e:
            if isinstance(reason.value, ConnectionDone):
                self._no_answer(f"malformed answer: {e}", abort=False)
            else:
                self._no_answer(
                    f"connection lost before an answer: {reason.getErrorMessage()}",
                    abort=False,
                )

    def connection_failed(self, reason: Failure) -> None:
        self._attempt = None
        if self._done:
            return  # our own cancel of the attempt, after a time-out or cancel
        if isinstance(reason.value, ConnectionRefusedError):
            why = "connection refused"
        else:
            why = f"connection failed: {reason.getErrorMessage()}"
        self._no_answer(why, abort=False)

    def _timed_out(self) -> None:
        self._no_answer(f"no answer within {self._timeout:g} s", abort=True)

    # Ways out.

    def _no_answer(self, why: str, *, abort: bool) -> None:
        self._finish(IdentAnswer(IdentOutcome.NO_ANSWER, error=why), abort=abort)

    def _stop(self, *, abort: bool) -> None:
        """Cancel the timer and let go of the connection or the attempt."""
        self._done = True
        if self._timer.active():
            self._timer.cancel()
        transport, self._transport = self._transport, None
        if transport is not None:
            if abort:
                transport.abortConnection()
            else:
                close_now(transport)
        elif self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()

    def _finish(self, answer: IdentAnswer, *, abort: bool) -> None:
        if self._done:
            return
        self._stop(abort=abort)
        answer = replace(answer, duration=self._reactor.seconds() - self._started)
        if answer.outcome is IdentOutcome.NO_ANSWER:
            # Worth an operator's attention: it explains a 92.  An answer is
            # routine and all of it is in the request's access record; an event
            # of its own cost about as much as the access event (twistd writes
            # debug events too), which was a tenth of an ident request's CPU.
            log.info(
                "ident {client_port} , {server_port} at {host}: {outcome}"
                " ({error}) after {duration} s",
                client_port=self._ports[0],
                server_port=self._ports[1],
                host=self._host,
                outcome=answer.outcome.value,
                error=answer.error,
                duration=answer.duration,
            )
        self.deferred.callback(answer)

    def _cancel(self, deferred: Deferred[IdentAnswer]) -> None:
        """The caller gave up: stop everything; the Deferred fails with CancelledError."""
        if self._done:
            return
        self._stop(abort=True)
        log.debug(
            "ident query {client_port} , {server_port} to {host} cancelled",
            client_port=self._ports[0],
            server_port=self._ports[1],
            host=self._host,
        )


def query_ident(
    client_host: str,
    client_port: int,
    server_host: str,
    server_port: int,
    *,
    reactor: Optional[IdentReactor] = None,
    ident_port: int = IDENT_PORT,
    timeout: float = DEFAULT_TIMEOUT,
) -> Deferred[IdentAnswer]:
    """Ask the identd on `client_host` who owns ``client_port -> server_port``.

    `server_host`/`server_port` are the proxy's end of the client's
    connection; the query is sent from `server_host` unless it is the
    unspecified address.  The Deferred fires with an `IdentAnswer` (never an
    error for network trouble) and fails only with `CancelledError` when
    cancelled.  `reactor` defaults to the global reactor at call time.
    """
    if reactor is None:
        reactor = cast(IdentReactor, global_reactor())
    try:
        query = _IdentQuery(
            reactor, client_host, client_port, server_host, server_port, ident_port, timeout
        )
    except ValueError as e:  # no port pair to ask about (a non-TCP client)
        return succeed(IdentAnswer(IdentOutcome.NO_ANSWER, error=f"cannot ask: {e}"))
    return query.deferred


class IdentQuery(_Interface):
    """The signature of `query_ident`, which a server factory may replace."""

    def __call__(
        self,
        client_host: str,
        client_port: int,
        server_host: str,
        server_port: int,
        *,
        reactor: Optional[IdentReactor] = ...,
        ident_port: int = ...,
        timeout: float = ...,
    ) -> Deferred[IdentAnswer]: ...


class SharedIdentQuery:
    """One request's ident query: started by the first asker, shared by all.

    A policy may ask more than once (an embedder's policy, a rules line and
    its command); the identd is asked once, later askers get the same answer,
    and the query stops only when its last waiting asker gives up.  Call it
    as `PolicyContext.ident`.
    """

    def __init__(self, start: Callable[[], Deferred[IdentAnswer]]) -> None:
        self._start = start
        self.answer: Optional[IdentAnswer] = None
        self._query: Optional[Deferred[IdentAnswer]] = None
        self._waiters: list[Deferred[IdentAnswer]] = []

    def __call__(self) -> Deferred[IdentAnswer]:
        if self.answer is not None:
            return succeed(self.answer)
        waiter: Deferred[IdentAnswer] = Deferred(self._waiter_cancelled)
        self._waiters.append(waiter)
        if self._query is None:
            self._query = self._start()
            self._query.addCallbacks(self._answered, self._failed)
        return waiter

    def _answered(self, answer: IdentAnswer) -> None:
        self.answer = answer
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(answer)

    def _failed(self, failure: Failure) -> None:
        """The query's own cancellation (its last waiter's doing) or a bug in an
        injected query function: whoever still waits learns of it at once."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    def _waiter_cancelled(self, waiter: Deferred[IdentAnswer]) -> None:
        self._waiters.remove(waiter)
        if not self._waiters and self._query is not None and not self._query.called:
            self._query.cancel()
