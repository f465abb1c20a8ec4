"""The one time limit a client connection is under at any moment.

A connection passes through several limits (the request, the connect, the
BIND wait), never two at once.  Moving to the next limit moves the live
timer instead of cancelling it and scheduling another: one `DelayedCall`
per connection for its whole life, which the reactor's timer heap feels at
thousands of handshakes a second.
"""

from __future__ import annotations

from typing import Callable, Optional

from socksident._types import DelayedCall, ReactorTime

__all__ = ["Deadline"]


class Deadline:
    """Calls `expired(what, seconds)` when the limit set last runs out."""

    __slots__ = ("_reactor", "_expired", "_timer", "what", "seconds")  # one per connection

    def __init__(self, reactor: ReactorTime, expired: Callable[[str, float], None]) -> None:
        self._reactor = reactor
        self._expired = expired
        self._timer: Optional[DelayedCall] = None
        self.what = ""
        self.seconds = 0.0

    def set(self, seconds: float, what: str) -> None:
        """From now, `seconds` for `what` (the text the refusal or log names)."""
        self.what, self.seconds = what, seconds
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self._reactor.callLater(seconds, self._run_out)

    def cancel(self) -> None:
        """No limit any more (settled, or the connection ended)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    @property
    def active(self) -> bool:
        return self._timer is not None and self._timer.active()

    def _run_out(self) -> None:
        self._timer = None
        self._expired(self.what, self.seconds)
