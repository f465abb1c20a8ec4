"""Open client connections and active relays, counted where they change."""

from __future__ import annotations

from typing import Callable

__all__ = ["LiveCounts"]


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
