"""The Twisted ident client, driven in memory with MemoryReactorClock.

Nothing here touches the network or real time: the test plays the identd by
building the client's protocol from the factory handed to connectTCP and
feeding it bytes, and plays the clock with `advance`.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import pytest
import twisted.internet
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    NoRouteError,
    UserError,
)
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from socksident.ident import IdentAnswer, IdentOutcome
from socksident.identclient import SharedIdentQuery, query_ident

CLIENT_HOST = "192.0.2.10"  # the SOCKS client, where the identd runs
CLIENT_PORT = 40000  # its source port
SERVER_HOST = "192.0.2.1"  # our address the client connected to
SERVER_PORT = 1080  # our port the client connected to
QUERY = b"40000 , 1080\r\n"


class Identd:
    """One ident query in progress, with the test acting as the identd."""

    def __init__(self, reactor: Optional[MemoryReactorClock] = None, **kwargs: Any) -> None:
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        args = {
            "client_host": CLIENT_HOST,
            "client_port": CLIENT_PORT,
            "server_host": SERVER_HOST,
            "server_port": SERVER_PORT,
        }
        args.update(kwargs)
        self.results: list[Any] = []
        self.deferred: Deferred[IdentAnswer] = query_ident(
            args.pop("client_host"),
            args.pop("client_port"),
            args.pop("server_host"),
            args.pop("server_port"),
            reactor=self.reactor,
            **args,
        )
        self.deferred.addBoth(self.results.append)
        self.protocol: Optional[IProtocol] = None
        self.transport = StringTransportWithDisconnection()

    @property
    def call(self) -> tuple[Any, ...]:
        [call] = self.reactor.tcpClients
        return tuple(call)

    @property
    def connector(self) -> Any:
        [connector] = self.reactor.connectors
        return connector

    def accept(self) -> None:
        host, port, factory, _, _ = self.call
        address = IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        self.protocol = factory.buildProtocol(address)
        assert self.protocol is not None
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def refuse(self, exception: Exception) -> None:
        _, _, factory, _, _ = self.call
        factory.clientConnectionFailed(self.connector, Failure(exception))

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    @property
    def fired(self) -> bool:
        return bool(self.results)

    @property
    def answer(self) -> IdentAnswer:
        assert self.results, "the query has not finished"
        [result] = self.results
        if isinstance(result, Failure):
            result.raiseException()
        assert isinstance(result, IdentAnswer)
        return result

    @property
    def closed(self) -> bool:
        """Closed gracefully (loseConnection) or aborted."""
        return not self.transport.connected

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    def assert_clean(self) -> None:
        """Finished, and nothing left behind in the reactor."""
        assert self.fired
        assert self.reactor.getDelayedCalls() == []


# The query itself


def test_sends_the_query_from_the_address_the_client_used() -> None:
    identd = Identd()
    host, port, _, _, bind = identd.call
    assert (host, port) == (CLIENT_HOST, 113)
    assert bind == (SERVER_HOST, 0)
    identd.accept()
    assert identd.transport.value() == QUERY
    assert not identd.fired


def test_other_ident_port() -> None:
    identd = Identd(ident_port=1113)
    assert identd.call[1] == 1113


@pytest.mark.parametrize("server_host", ["0.0.0.0", "::"])
def test_no_bind_for_an_unspecified_server_address(server_host: str) -> None:
    identd = Identd(server_host=server_host)
    assert identd.call[4] is None


def test_ipv4_mapped_addresses_are_unwrapped() -> None:
    identd = Identd(client_host="::ffff:192.0.2.10", server_host="::ffff:192.0.2.1")
    host, _, _, _, bind = identd.call
    assert host == CLIENT_HOST
    assert bind == (SERVER_HOST, 0)


def test_ipv6_client() -> None:
    identd = Identd(client_host="2001:db8::10", server_host="2001:db8::1")
    host, port, _, _, bind = identd.call
    assert (host, port) == ("2001:db8::10", 113)
    assert bind == ("2001:db8::1", 0)
    assert isinstance(identd.connector.getDestination(), IPv6Address)
    identd.accept()
    identd.send(b"40000 , 1080 : USERID : UNIX : alice\r\n")
    assert identd.answer.user_id == "alice"


def test_a_link_local_server_address_keeps_its_scope() -> None:
    identd = Identd(client_host="fe80::10%eth0", server_host="fe80::1%eth0")
    host, _, _, _, bind = identd.call
    assert host == "fe80::10%eth0"
    assert bind == ("fe80::1%eth0", 0)


def test_no_bind_when_families_differ() -> None:
    identd = Identd(client_host="2001:db8::10", server_host=SERVER_HOST)
    assert identd.call[4] is None


def test_default_reactor_is_looked_up_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor = MemoryReactorClock()
    monkeypatch.setattr(twisted.internet, "reactor", reactor, raising=False)
    d = query_ident(CLIENT_HOST, CLIENT_PORT, SERVER_HOST, SERVER_PORT)
    assert [c[:2] for c in reactor.tcpClients] == [(CLIENT_HOST, 113)]
    d.cancel()
    d.addErrback(lambda f: f.trap(CancelledError))


# Answers


def test_good_answer() -> None:
    identd = Identd()
    identd.advance(1)
    identd.accept()
    identd.advance(1)
    identd.send(b"40000 , 1080 : USERID : UNIX : alice\r\n")
    assert identd.answer == IdentAnswer(
        IdentOutcome.USER, user_id="alice", opsys="UNIX", duration=2.0
    )
    assert identd.closed and not identd.aborted
    identd.assert_clean()


def test_answer_in_pieces_with_bare_lf() -> None:
    identd = Identd()
    identd.accept()
    for piece in (b"40000 ,", b" 1080 : USERID : UNIX , UTF-8", b" : bob", b"\n"):
        assert not identd.fired
        identd.send(piece)
    assert identd.answer.user_id == "bob"
    assert identd.answer.charset == "UTF-8"
    identd.assert_clean()


@pytest.mark.parametrize(
    "error", ["INVALID-PORT", "NO-USER", "HIDDEN-USER", "UNKNOWN-ERROR", "X-PRIVATE"]
)
def test_error_answers(error: str) -> None:
    identd = Identd()
    identd.accept()
    identd.send(b"40000 , 1080 : ERROR : " + error.encode() + b"\r\n")
    assert identd.answer.outcome is IdentOutcome.ERROR
    assert identd.answer.error == error
    assert identd.closed and not identd.aborted
    identd.assert_clean()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"1080 , 40000 : USERID : UNIX : alice\r\n", "reply is for ports 1080 , 40000"),
        (b"40000 , 1080 : ERROR : NOPE\r\n", "unknown error type"),
        (b"HTTP/1.0 400 Bad Request\r\n", "malformed answer"),
        (b"\x00\xff\xfe garbage\n", "malformed answer"),
    ],
)
def test_malformed_answers_are_no_answer(data: bytes, message: str) -> None:
    identd = Identd()
    identd.accept()
    identd.send(data)
    assert identd.answer.outcome is IdentOutcome.NO_ANSWER
    assert identd.answer.error is not None
    assert identd.answer.error.startswith("malformed answer: ")
    assert message in identd.answer.error
    assert identd.aborted
    identd.assert_clean()


def test_endless_line() -> None:
    identd = Identd()
    identd.accept()
    identd.send(b"40000 , 1080 : USERID : UNIX : " + b"a" * 500)
    assert not identd.fired
    identd.send(b"a" * 500)
    assert identd.answer.outcome is IdentOutcome.NO_ANSWER
    assert identd.answer.error == "malformed answer: more than 1000 bytes without a line ending"
    assert identd.aborted
    identd.assert_clean()


def test_premature_close() -> None:
    identd = Identd()
    identd.accept()
    identd.send(b"40000 , 1080 : USERID : UNIX : alice")
    assert identd.protocol is not None
    identd.protocol.connectionLost(Failure(ConnectionDone()))
    assert identd.answer == IdentAnswer(
        IdentOutcome.NO_ANSWER,
        error="malformed answer: connection closed before a complete line",
    )
    identd.assert_clean()


def test_connection_lost_uncleanly() -> None:
    identd = Identd()
    identd.accept()
    assert identd.protocol is not None
    identd.protocol.connectionLost(Failure(ConnectionLost()))
    assert identd.answer.outcome is IdentOutcome.NO_ANSWER
    assert identd.answer.error is not None
    assert identd.answer.error.startswith("connection lost before an answer")
    identd.assert_clean()


def test_bytes_after_the_answer_change_nothing() -> None:
    identd = Identd()
    identd.accept()
    identd.send(b"40000 , 1080 : USERID : UNIX : alice\r\n")
    identd.send(b"40000 , 1080 : USERID : UNIX : mallory\r\n")
    assert identd.answer.user_id == "alice"
    assert len(identd.results) == 1


# Time


def test_identd_accepts_and_never_answers() -> None:
    identd = Identd()
    identd.accept()
    identd.advance(14.9)
    assert not identd.fired
    assert not identd.closed
    identd.advance(0.1)
    assert identd.answer.outcome is IdentOutcome.NO_ANSWER
    assert identd.answer.error == "no answer within 15 s"
    assert identd.answer.duration == pytest.approx(15.0)
    assert identd.aborted
    identd.assert_clean()


def test_connect_never_completes() -> None:
    identd = Identd()
    identd.advance(15)
    assert identd.answer.outcome is IdentOutcome.NO_ANSWER
    assert identd.answer.error == "no answer within 15 s"
    assert identd.connector.stoppedConnecting
    identd.assert_clean()
    # A real connector reports the stop as a failure; that must be ignored.
    identd.refuse(UserError())
    assert len(identd.results) == 1


def test_slow_but_correct_identd() -> None:
    identd = Identd()
    identd.advance(1)
    identd.accept()
    identd.advance(13)
    identd.send(b"40000 , 1080 : USERID : UNIX : alice\r\n")
    assert identd.answer.user_id == "alice"
    assert identd.answer.duration == pytest.approx(14.0)
    identd.assert_clean()


def test_one_time_limit_covers_connect_and_answer() -> None:
    identd = Identd()
    identd.advance(10)
    identd.accept()
    identd.advance(5)  # 15 s since the query started, 5 s since the connect
    assert identd.answer.error == "no answer within 15 s"
    assert identd.aborted
    identd.assert_clean()


def test_timeout_is_configurable() -> None:
    identd = Identd(timeout=30)
    identd.accept()
    identd.advance(29)
    assert not identd.fired
    identd.advance(1)
    assert identd.answer.error == "no answer within 30 s"
    identd.assert_clean()


def test_the_connector_has_no_limit_of_its_own() -> None:
    """Our timer is the only one: it reports every time-out, and it stops the connector."""
    identd = Identd(timeout=15)
    assert identd.call[3] is None


# Connection failures


def test_connection_refused() -> None:
    identd = Identd()
    identd.advance(0.5)
    identd.refuse(ConnectionRefusedError())
    assert identd.answer == IdentAnswer(
        IdentOutcome.NO_ANSWER, error="connection refused", duration=0.5
    )
    assert not identd.connector.stoppedConnecting
    identd.assert_clean()


def test_host_unreachable() -> None:
    identd = Identd()
    identd.refuse(NoRouteError())
    assert identd.answer.outcome is IdentOutcome.NO_ANSWER
    assert identd.answer.error == "connection failed: No route to host."
    identd.assert_clean()


class _FailingReactor(MemoryReactorClock):
    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError("no sockets left")


def test_connect_that_raises_at_once() -> None:
    identd = Identd(reactor=_FailingReactor())
    assert identd.answer.outcome is IdentOutcome.NO_ANSWER
    assert identd.answer.error == (
        "connection failed: An error occurred while connecting: no sockets left."
    )
    identd.assert_clean()


# Cancellation


def test_cancel_while_connecting() -> None:
    identd = Identd()
    identd.deferred.cancel()
    [failure] = identd.results
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    assert identd.connector.stoppedConnecting
    identd.assert_clean()
    identd.refuse(UserError())  # the connector's report of the stop
    assert len(identd.results) == 1


def test_cancel_while_waiting_for_the_answer() -> None:
    identd = Identd()
    identd.accept()
    identd.deferred.cancel()
    [failure] = identd.results
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    assert identd.aborted
    identd.assert_clean()
    identd.advance(60)
    assert len(identd.results) == 1


def test_cancel_after_the_answer_changes_nothing() -> None:
    identd = Identd()
    identd.accept()
    identd.send(b"40000 , 1080 : ERROR : NO-USER\r\n")
    identd.deferred.cancel()
    assert identd.answer.error == "NO-USER"


def test_connect_completing_after_cancel_is_aborted() -> None:
    """A connection that wins the race with stopConnecting is not left open."""
    identd = Identd()
    identd.deferred.cancel()
    identd.accept()
    assert identd.aborted
    assert identd.transport.value() == b""


# Logging


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    captured: list[LogEvent] = []

    def observer(event: LogEvent) -> None:
        if event.get("log_namespace") == "socksident.identclient":
            captured.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(observer)


def test_no_answer_is_logged_with_its_fields_and_its_time(events: list[LogEvent]) -> None:
    reactor = MemoryReactorClock()
    reactor.advance(100)  # the query's time is its own, not the clock's
    identd = Identd(reactor)
    identd.advance(2.5)
    identd.refuse(ConnectionRefusedError())
    assert identd.answer.duration == 2.5
    [event] = events
    assert event["log_level"] is LogLevel.info
    assert formatEvent(event) == (
        "ident 40000 , 1080 at 192.0.2.10: no-answer (connection refused) after 2.5 s"
    )
    assert (event["client_port"], event["server_port"], event["host"]) == (
        CLIENT_PORT, SERVER_PORT, CLIENT_HOST)
    assert (event["outcome"], event["error"], event["duration"]) == (
        "no-answer", "connection refused", 2.5)


@pytest.mark.parametrize(
    "reply, outcome",
    [
        (b"40000 , 1080 : USERID : UNIX : alice\r\n", IdentOutcome.USER),
        (b"40000 , 1080 : ERROR : NO-USER\r\n", IdentOutcome.ERROR),
    ],
)
def test_an_answer_is_not_an_event_of_its_own(
    events: list[LogEvent], reply: bytes, outcome: IdentOutcome
) -> None:
    """All of it goes into the request's access record."""
    identd = Identd()
    identd.accept()
    identd.send(reply)
    assert identd.answer.outcome is outcome
    assert events == []


def test_a_cancelled_query_is_a_debug_event(events: list[LogEvent]) -> None:
    identd = Identd()
    identd.deferred.addErrback(lambda failure: failure.trap(CancelledError))
    identd.deferred.cancel()
    [event] = events
    assert event["log_level"] is LogLevel.debug
    assert formatEvent(event) == "ident query 40000 , 1080 to 192.0.2.10 cancelled"
    assert (event["client_port"], event["server_port"], event["host"]) == (
        CLIENT_PORT, SERVER_PORT, CLIENT_HOST)


def test_a_client_without_ports_gets_no_answer_instead_of_an_exception() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from socksident.identclient import query_ident

    reactor = MemoryReactorClock()
    answers: list[Any] = []
    query_ident("?", 0, "?", 0, reactor=reactor).addBoth(answers.append)
    [answer] = answers
    assert answer.outcome is IdentOutcome.NO_ANSWER and "cannot ask" in answer.error
    assert reactor.tcpClients == []


# -- SharedIdentQuery: one query per request, shared by every asker -------------


class Starts:
    """The query function a SharedIdentQuery starts: records each start."""

    def __init__(self) -> None:
        self.queries: list[Deferred[IdentAnswer]] = []
        self.cancelled = 0

    def __call__(self) -> Deferred[IdentAnswer]:
        def cancel(d: Deferred[IdentAnswer]) -> None:
            self.cancelled += 1

        query: Deferred[IdentAnswer] = Deferred(cancel)
        self.queries.append(query)
        return query


ALICE = IdentAnswer(IdentOutcome.USER, user_id="alice", opsys="UNIX")


def test_shared_query_starts_once_for_several_askers() -> None:
    starts = Starts()
    shared = SharedIdentQuery(starts)
    first, second = shared(), shared()
    assert len(starts.queries) == 1 and not first.called and not second.called
    starts.queries[0].callback(ALICE)
    assert first.result is ALICE and second.result is ALICE
    assert shared.answer is ALICE


def test_asking_after_the_answer_gets_the_same_answer_at_once() -> None:
    starts = Starts()
    shared = SharedIdentQuery(starts)
    shared()
    starts.queries[0].callback(ALICE)
    later = shared()
    assert later.called and later.result is ALICE
    assert len(starts.queries) == 1


def test_nothing_is_asked_until_someone_asks() -> None:
    starts = Starts()
    shared = SharedIdentQuery(starts)
    assert starts.queries == [] and shared.answer is None


def test_one_asker_giving_up_leaves_the_query_running() -> None:
    starts = Starts()
    shared = SharedIdentQuery(starts)
    first, second = shared(), shared()
    first.addErrback(lambda f: f.trap(CancelledError))
    first.cancel()
    assert starts.cancelled == 0 and not starts.queries[0].called
    starts.queries[0].callback(ALICE)
    assert second.result is ALICE


def test_the_last_asker_giving_up_cancels_the_query() -> None:
    starts = Starts()
    shared = SharedIdentQuery(starts)
    first, second = shared(), shared()
    failures: list[Failure] = []
    for waiter in (first, second):
        waiter.addErrback(failures.append)
        waiter.cancel()
    assert starts.cancelled == 1
    assert [f.check(CancelledError) for f in failures] == [CancelledError, CancelledError]
    assert shared.answer is None


def test_a_failing_query_fails_every_waiter() -> None:
    starts = Starts()
    shared = SharedIdentQuery(starts)
    first, second = shared(), shared()
    failures: list[Failure] = []
    first.addErrback(failures.append)
    second.addErrback(failures.append)
    starts.queries[0].errback(RuntimeError("a broken injected query"))
    assert [f.check(RuntimeError) for f in failures] == [RuntimeError, RuntimeError]


def test_a_query_that_answers_at_once_answers_its_first_asker() -> None:
    shared = SharedIdentQuery(lambda: succeed(ALICE))
    assert shared().result is ALICE
