"""Open client connections and active relays, counted where they change;
and the admitted connections, overall and per client host, that the
limits (`--max-connections`, `--max-per-host`) are checked against."""

from __future__ import annotations

from typing import Callable, Optional, Union

from socksident.socks4 import RequestRejectedOrFailed

__all__ = ["Admission", "Admissions", "LimitReached", "LiveCounts"]


class LimitReached(RequestRejectedOrFailed):
    """91: `--max-connections` or `--max-per-host` is reached (its own class
    in the access record and the metrics' refusals)."""


class LiveCounts:
    """Open client connections and active relays, with watchers told of each
    change (the metrics' gauges: they work across worker processes, where a
    gauge that reads a value at scrape time does not)."""

    def __init__(self) -> None:
        self.connections = 0
        self.relays = 0
        self.watchers: list[Callable[[str, int], None]] = []
        self.admitted = Admissions()

    def change(self, what: str, delta: int) -> None:
        """`what` is ``connections`` or ``relays``."""
        setattr(self, what, getattr(self, what) + delta)
        for watcher in self.watchers:
            watcher(what, delta)


class Admissions:
    """Connections admitted under the limits, in total and per client host.

    A refused connection is not counted: it holds no slot while it waits to
    be answered, so a flood of refused clients cannot keep a slot taken.
    Hosts whose count falls to zero are forgotten, so the table stays as
    small as the set of hosts connected now.
    """

    def __init__(self) -> None:
        self.total = 0
        self.per_host: dict[str, int] = {}

    def admit(self, host: str, max_total: int, max_per_host: int) -> Optional[LimitReached]:
        """Count `host` in and return None, or return the refusal (0: no limit)."""
        if max_total and self.total >= max_total:
            return LimitReached(f"connection limit {max_total} reached")
        held = self.per_host.get(host, 0)
        if max_per_host and held >= max_per_host:
            return LimitReached(f"per-host limit {max_per_host} reached for {host}")
        self.total += 1
        self.per_host[host] = held + 1
        return None

    def take(self, host: str, max_total: int, max_per_host: int) -> Union["Admission", LimitReached]:
        """`admit`, as a place to hand back once (or the refusal)."""
        refusal = self.admit(host, max_total, max_per_host)
        return refusal if refusal is not None else Admission(self, host)

    def release(self, host: str) -> None:
        """An admitted connection from `host` has ended."""
        self.total -= 1
        left = self.per_host[host] - 1
        if left:
            self.per_host[host] = left
        else:
            del self.per_host[host]


class Admission:
    """One connection's place under the limits; whatever ends the
    connection, and however often, the place is handed back once."""

    __slots__ = ("_admissions", "host")  # one per open connection

    def __init__(self, admissions: Admissions, host: str) -> None:
        self._admissions: Optional[Admissions] = admissions
        self.host = host

    def release(self) -> None:
        if self._admissions is not None:
            self._admissions.release(self.host)
            self._admissions = None
