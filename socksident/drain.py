"""A graceful stop: on SIGTERM, let the open connections finish, up to a limit.

twistd stops its services in the reactor's "before shutdown" phase and waits
for the Deferreds their `stopService` returns.  The listeners stop listening
at once; `Drain.stopService` returns a Deferred that fires when the last
client connection has ended, or, after `--shutdown-timeout`, once it has
cut off the rest (each still writes its access record).  A second SIGTERM
cuts them off at once.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from socksident._types import DelayedCall, global_reactor

__all__ = ["Drain"]

log = Logger()


class Drain(service.Service):
    """Delays the process's stop until `factory`'s connections have ended.

    `factory` is a `server.SOCKS4ServerFactory`: its `live` counts and its
    `open_connections` (the protocols, to cut off).
    """

    def __init__(
        self,
        factory: Any,
        timeout: float,
        reactor: Any = None,
        catch_second_signal: bool = True,
    ) -> None:
        self.factory = factory
        self.timeout = timeout
        self._reactor = reactor
        self._catch_second_signal = catch_second_signal
        self._done: Optional[Deferred[None]] = None
        self._timer: Optional[DelayedCall] = None
        self._previous_handler: Any = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            self._reactor = global_reactor()
        return self._reactor

    def stopService(self) -> Deferred[None]:
        super().stopService()
        # twistd re-raises the signal that stopped the reactor once it has
        # stopped, so the exit status would say "killed"; a drained stop is a
        # clean one: exit 0 (as the --workers parent does).
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None
        open_now = self.factory.live.connections
        if open_now == 0:
            return succeed(None)
        log.info(
            "stopping: waiting up to {timeout:g} s for {count} open connections",
            timeout=self.timeout,
            count=open_now,
        )
        self._done = Deferred()
        self.factory.live.watchers.append(self._changed)
        self._timer = self.reactor.callLater(self.timeout, self.cut_off, "shutdown timeout")
        if self._catch_second_signal:
            reactor = self.reactor

            def second_term(signum: int, frame: Any) -> None:
                reactor.callFromThread(self.cut_off, "second SIGTERM")

            self._previous_handler = signal.signal(signal.SIGTERM, second_term)
        return self._done

    def cut_off(self, why: str) -> None:
        """Abort every connection still open; each writes its access record."""
        if self._done is None or self._done.called:
            return
        open_connections = list(self.factory.open_connections)
        log.info("stopping: {why}, cutting off {count} connections", why=why, count=len(open_connections))
        for connection in open_connections:
            connection.cut_off(f"server stopping ({why})")

    def _changed(self, what: str, delta: int) -> None:
        if what == "connections" and self.factory.live.connections == 0:
            # Once the last record is written: the count drops just before it.
            self.reactor.callLater(0, self._finished)

    def _finished(self) -> None:
        done = self._done
        if done is None or done.called or self.factory.live.connections:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.factory.live.watchers.remove(self._changed)
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        log.info("stopping: every connection has ended")
        done.callback(None)
