"""Happy Eyeballs over the permitted addresses, and the source address, on a memory reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectBindError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from socksident.outbound import ConnectFailed, connect, connect_one, source_for

FACTORY = Factory.forProtocol(Protocol)


def race(reactor: MemoryReactorClock, addresses: tuple[str, ...], **kw: Any) -> Any:
    results: list[Any] = []
    d = connect(reactor, addresses, 80, kw.pop("timeout", 10.0), FACTORY, **kw)
    d.addBoth(results.append)
    return d, results


def dialled(reactor: MemoryReactorClock) -> list[str]:
    return [host for host, *_ in reactor.tcpClients]


def answer(reactor: MemoryReactorClock, index: int) -> StringTransport:
    factory = reactor.tcpClients[index][2]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport


def refuse(reactor: MemoryReactorClock, index: int) -> None:
    factory = reactor.tcpClients[index][2]
    factory.clientConnectionFailed(reactor.connectors[index], Failure(ConnectionRefusedError()))


def test_a_new_attempt_every_delay_until_one_connects_losers_cancelled() -> None:
    reactor = MemoryReactorClock()
    _, results = race(reactor, ("2001:db8::1", "2001:db8::2", "192.0.2.1"))
    # Families alternate (RFC 8305 section 4): v6, v4, v6.
    assert dialled(reactor) == ["2001:db8::1"]
    reactor.advance(0.29)
    assert dialled(reactor) == ["2001:db8::1"]
    reactor.advance(0.01)
    assert dialled(reactor) == ["2001:db8::1", "192.0.2.1"]
    answer(reactor, 1)
    [(address, protocol)] = results
    assert address == "192.0.2.1" and isinstance(protocol, Protocol)
    assert reactor.connectors[0].stoppedConnecting
    reactor.advance(5)
    assert dialled(reactor) == ["2001:db8::1", "192.0.2.1"]  # no third attempt
    assert not reactor.getDelayedCalls()


def test_a_failure_starts_the_next_attempt_at_once() -> None:
    reactor = MemoryReactorClock()
    _, results = race(reactor, ("192.0.2.1", "192.0.2.2", "192.0.2.3"))
    refuse(reactor, 0)
    assert dialled(reactor) == ["192.0.2.1", "192.0.2.2"]
    refuse(reactor, 1)
    refuse(reactor, 2)
    [failure] = results
    assert failure.check(ConnectFailed)
    assert failure.value.reason.startswith("connect failed: 192.0.2.1: ")
    assert "192.0.2.3: " in failure.value.reason
    assert not reactor.getDelayedCalls()


def test_one_deadline_covers_the_race() -> None:
    reactor = MemoryReactorClock()
    _, results = race(reactor, ("192.0.2.1", "192.0.2.2"), timeout=5.0)
    reactor.advance(0.3)
    assert dialled(reactor) == ["192.0.2.1", "192.0.2.2"]
    assert reactor.tcpClients[1][3] is None  # no timer of its own: the deadline stops it
    reactor.advance(4.7)
    [failure] = results
    assert failure.check(ConnectFailed)
    assert failure.value.reason == (
        "connect failed: 192.0.2.1: no answer within 5 s; 192.0.2.2: no answer within 5 s"
    )
    assert all(connector.stoppedConnecting for connector in reactor.connectors)


def test_cancelling_stops_every_attempt() -> None:
    reactor = MemoryReactorClock()
    d, results = race(reactor, ("192.0.2.1", "192.0.2.2", "192.0.2.3"))
    reactor.advance(0.3)
    d.cancel()
    [failure] = results
    assert failure.check(CancelledError)
    assert all(connector.stoppedConnecting for connector in reactor.connectors)
    reactor.advance(10)
    assert len(dialled(reactor)) == 2 and not reactor.getDelayedCalls()


def test_attempts_leave_from_the_source_of_their_family() -> None:
    reactor = MemoryReactorClock()
    race(reactor, ("192.0.2.1", "2001:db8::1"), sources=("198.51.100.7", "2001:db8:f::7"))
    reactor.advance(0.3)
    assert [client[4] for client in reactor.tcpClients] == [
        ("198.51.100.7", 0), ("2001:db8:f::7", 0)]


def test_a_family_without_a_source_is_not_tried() -> None:
    reactor = MemoryReactorClock()
    _, results = race(reactor, ("2001:db8::1", "192.0.2.1"), sources=("198.51.100.7",))
    assert dialled(reactor) == ["192.0.2.1"]
    reactor.tcpClients[0][2].clientConnectionFailed(
        reactor.connectors[0], Failure(ConnectBindError(99, "Cannot assign requested address")))
    [failure] = results
    assert failure.value.reason.startswith(
        "connect failed: 2001:db8::1: no IPv6 --source-address to leave from; 192.0.2.1: ")
    _, only_v6 = race(MemoryReactorClock(), ("2001:db8::1",), sources=("198.51.100.7",))
    assert only_v6[0].value.reason == (
        "connect failed: 2001:db8::1: no IPv6 --source-address to leave from")


def test_source_for_matches_the_family() -> None:
    assert source_for("::1", ("127.0.0.2", "::2")) == "::2"
    assert source_for("10.0.0.1", ("::2",)) is None


def test_an_ipv4_address_without_an_ipv4_source_is_not_tried() -> None:
    _, only_v4 = race(MemoryReactorClock(), ("192.0.2.1",), sources=("2001:db8:f::7",))
    assert only_v4[0].value.reason == (
        "connect failed: 192.0.2.1: no IPv4 --source-address to leave from")


def test_no_address_at_all_fails_at_once() -> None:
    reactor = MemoryReactorClock()
    _, results = race(reactor, ())
    [failure] = results
    assert failure.check(ConnectFailed) and failure.value.reason == "connect failed: "
    assert reactor.tcpClients == [] and not reactor.getDelayedCalls()


def test_a_failure_while_another_attempt_is_under_way_leaves_the_race_running() -> None:
    reactor = MemoryReactorClock()
    _, results = race(reactor, ("192.0.2.1", "192.0.2.2"))
    reactor.advance(0.3)
    refuse(reactor, 0)
    assert results == []  # 192.0.2.2 may still answer
    answer(reactor, 1)
    [(address, _)] = results
    assert address == "192.0.2.2"


def test_one_address_leaves_only_the_deadline_running() -> None:
    reactor = MemoryReactorClock()
    race(reactor, ("192.0.2.1",), timeout=5.0)
    [deadline] = reactor.getDelayedCalls()
    assert deadline.getTime() == 5.0


def test_an_attempt_failing_with_a_bug_fails_the_race_with_it() -> None:
    reactor = MemoryReactorClock()
    _, results = race(reactor, ("192.0.2.1", "192.0.2.2"))
    reactor.advance(0.3)
    reactor.tcpClients[0][2].clientConnectionFailed(
        reactor.connectors[0], Failure(ZeroDivisionError("a bug")))
    [failure] = results
    assert failure.check(ZeroDivisionError) and str(failure.value) == "a bug"
    assert reactor.connectors[1].stoppedConnecting and not reactor.getDelayedCalls()


def test_connect_one_names_the_address_it_could_not_reach() -> None:
    reactor = MemoryReactorClock()
    results: list[Any] = []
    connect_one(reactor, "192.0.2.7", 80, FACTORY).addBoth(results.append)
    assert reactor.tcpClients[0][3:] == (None, None)  # no timer, no source: the server's
    refuse(reactor, 0)
    [failure] = results
    assert failure.value.reason == "connect failed: 192.0.2.7: Connection was refused by other side."
