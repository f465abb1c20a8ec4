"""The one deadline of a connection: moved from limit to limit, never doubled."""

from __future__ import annotations

from twisted.internet.task import Clock

from socksident.deadline import Deadline


def make() -> tuple[Clock, Deadline, list[tuple[str, float]]]:
    clock = Clock()
    expired: list[tuple[str, float]] = []
    return clock, Deadline(clock, lambda what, seconds: expired.append((what, seconds))), expired


def test_runs_out_once_with_what_and_seconds() -> None:
    clock, deadline, expired = make()
    deadline.set(10, "no complete request")
    clock.advance(9.9)
    assert expired == [] and deadline.active
    clock.advance(0.1)
    assert expired == [("no complete request", 10)]
    assert not deadline.active
    clock.advance(100)
    assert expired == [("no complete request", 10)]


def test_the_next_limit_moves_the_live_timer_from_now() -> None:
    clock, deadline, expired = make()
    deadline.set(10, "no complete request")
    first = clock.getDelayedCalls()
    clock.advance(6)
    deadline.set(5, "no connection established")
    assert clock.getDelayedCalls() == first  # moved, not replaced
    clock.advance(4.9)
    assert expired == []
    clock.advance(0.1)
    assert expired == [("no connection established", 5)]


def test_cancel_stops_it_and_a_later_limit_starts_afresh() -> None:
    clock, deadline, expired = make()
    deadline.set(1, "first")
    deadline.cancel()
    assert clock.getDelayedCalls() == [] and not deadline.active
    deadline.cancel()  # twice is harmless
    clock.advance(5)
    assert expired == []
    deadline.set(2, "second")
    clock.advance(2)
    assert expired == [("second", 2)]


def test_set_after_it_ran_out_schedules_a_new_timer() -> None:
    clock, deadline, expired = make()
    deadline.set(1, "a")
    clock.advance(1)
    deadline.set(3, "b")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3)
    assert expired == [("a", 1), ("b", 3)]
