"""Fixtures shared by the in-memory and the integration tests."""

from typing import Iterator

import pytest
from twisted.logger import LogEvent, globalLogPublisher


@pytest.fixture
def access_events() -> Iterator[list[LogEvent]]:
    """The access-log events (namespace socksident.access) emitted during a test."""
    events: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "socksident.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)
