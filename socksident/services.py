"""The services `twistd socks4` runs beside its listeners, and the listener itself.

Each is one concern of a running server: reloading the rules on SIGHUP,
keeping start-up's objects away from the cyclic collector, announcing the
ports, stopping in order, and a `--port` that stops start-up when it cannot
listen.  `tap.makeService` assembles them.
"""

from __future__ import annotations

import gc
import signal
from typing import Any, Callable, cast

from twisted.application import internet, service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from socksident._types import global_reactor

__all__ = [
    "Announce",
    "FreezeAfterStartUp",
    "ListenError",
    "Listener",
    "ListenerMaker",
    "ReloadOnHangup",
    "StopInOrder",
]

log = Logger()


class ReloadOnHangup(service.Service):
    """SIGHUP re-reads the rules; connections in progress keep their decision."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        reactor = cast(IReactorFromThreads, global_reactor())

        def hangup(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.policy.reload)

        self._previous = signal.signal(signal.SIGHUP, hangup)

    def stopService(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        super().stopService()


class FreezeAfterStartUp(service.Service):
    """Move start-up's objects (modules, classes, the options) out of the
    cyclic collector's sight once the reactor runs: every full collection
    would otherwise walk them again, per request, for nothing."""

    def startService(self) -> None:
        super().startService()
        global_reactor().callWhenRunning(gc.freeze)


class Announce(service.Service):
    """The one start-up line naming every --port."""

    def __init__(self, ports: list[str]) -> None:
        self.ports = ports

    def startService(self) -> None:
        super().startService()
        log.info("socksident SOCKS4/4A server listening on {ports}", ports=", ".join(self.ports))


class StopInOrder(service.MultiService):
    """Stops its services last to first, each once the later ones have stopped.

    The parent of --workers N closes the access log and removes the metrics
    directory only after every worker has exited, so the records of
    connections that finish during the workers' shutdown are still written.
    """

    def stopService(self) -> "Deferred[Any]":
        service.Service.stopService(self)
        stopped: Deferred[Any] = succeed(None)
        for child in reversed(list(self)):
            stopped.addCallback(_then_stop, child)
        return stopped


def _then_stop(_: object, child: service.IService) -> Any:
    return child.stopService()


class ListenError(Exception):
    """A `--port` that cannot listen; the message leads with the port, since
    a daemonizing twistd passes on only its first 100 bytes."""


class Listener(internet.StreamServerEndpointService):
    """A `--port` that stops start-up, naming itself, when it cannot listen.

    Twisted's default is to log the failure and run on, serving nothing.  An
    ordinary exception (not SystemExit) lets a daemonizing twistd report it
    to the waiting parent and remove its pid file.
    """

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True  # as twisted.application.strports does

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            raise ListenError(f"--port {self.description}: {error.socketError}") from None


#: Builds the service that serves one --port: (description, endpoint, factory).
ListenerMaker = Callable[[str, Any, Factory], service.IService]
