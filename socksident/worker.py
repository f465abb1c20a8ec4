"""One worker of `--workers N`: adopted sockets, its own reactor, events to the parent.

The parent (`socksident.workers`) starts it as ``python -m socksident.worker``
with the socks4 options and its listening sockets as inherited descriptors.
It builds the ordinary service (`tap.makeService`, as a worker: no access
log file, no metrics endpoint of its own), sends every log event to the
parent as a JSON line on `EVENTS_FD`, and exits when SIGTERM stops its
reactor, or when the kernel sends SIGTERM because the parent is gone.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import signal
import socket
import sys
from typing import Any, Optional, Sequence, cast

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger, globalLogBeginner
from twisted.python import usage
from zope.interface import implementer

from socksident._types import global_reactor
from socksident.workerevents import event_to_line
from socksident.workers import EVENTS_FD

__all__ = ["AdoptedListener", "worker_main"]

log = Logger()

_PR_SET_PDEATHSIG = 1


class AdoptedListener(service.Service):
    """Serves a listening socket the parent opened (`IReactorSocket.adoptStreamPort`)."""

    def __init__(self, description: str, fd: int, factory: Factory, reactor: Any = None) -> None:
        self.description = description
        self.fd = fd
        self.factory = factory
        self._reactor = reactor
        self.port: Optional[IListeningPort] = None

    def startService(self) -> None:
        super().startService()
        reactor = self._reactor if self._reactor is not None else global_reactor()
        probe = socket.socket(fileno=os.dup(self.fd))  # learns the socket's family
        try:
            family = probe.family
        finally:
            probe.close()
        self.port = reactor.adoptStreamPort(self.fd, family, self.factory)
        os.close(self.fd)  # the port holds its own duplicate

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        if self.port is None:
            return succeed(None)
        port, self.port = self.port, None
        return cast("Deferred[Any]", port.stopListening())


@implementer(ILogObserver)
class _EventsToParent:
    """Sends each event as one JSON line to the parent (the one log writer).

    While the reactor runs, the lines of one reactor turn go up together in
    one write, on the next turn: a write per event cost the worker a system
    call and the parent a wake-up, a read and a reactor turn for every
    access event.  Before the reactor runs and after it stopped, each event
    goes at once (`flush` after `reactor.run()` sends the last turn's).
    """

    def __init__(self, stream: Any, reactor: Any) -> None:
        self.stream = stream
        self._reactor = reactor
        self._lines: list[str] = []
        self._flushing: Optional[IDelayedCall] = None

    def __call__(self, event: dict[str, Any]) -> None:
        self._lines.append(event_to_line(event))
        if not self._reactor.running:
            self.flush()
        elif self._flushing is None:
            self._flushing = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Write the lines not yet sent, in one write."""
        if self._flushing is not None and self._flushing.active():
            self._flushing.cancel()
        self._flushing = None
        lines, self._lines = self._lines, []
        self.stream.write("".join(lines))
        self.stream.flush()


def _die_with_parent(parent: int) -> None:
    """SIGTERM from the kernel when the parent exits, however it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # it exited before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _stopping_anyway(signum: int, frame: Any) -> None:
    """SIGTERM once the reactor has stopped: the worker is exiting already."""


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m socksident.worker",
        description="One worker of `twistd socks4 --workers N`; started by that parent.",
    )
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--reactor", required=True, help="module whose install() to call")
    parser.add_argument("--listen-fds", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("socks4", nargs=argparse.REMAINDER)
    arguments = parser.parse_args(argv)
    if arguments.socks4[:1] == ["--"]:
        arguments.socks4 = arguments.socks4[1:]
    return arguments


def worker_main(argv: Sequence[str]) -> int:
    """Run one worker until SIGTERM: the parent's options, adopted sockets, own reactor."""
    arguments = _arguments(argv)
    _die_with_parent(arguments.parent)
    importlib.import_module(arguments.reactor).install()
    from twisted.internet import reactor

    stream = os.fdopen(EVENTS_FD, "w", encoding="utf-8")
    events = _EventsToParent(stream, reactor)
    globalLogBeginner.beginLoggingTo([events], redirectStandardIO=False)
    from socksident import tap

    options = tap.Options(worker=True)
    try:
        options.parseOptions(arguments.socks4)
    except usage.UsageError as error:
        log.error("worker {worker}: {error}", worker=arguments.index, error=str(error))
        return 2
    fds = [int(fd) for fd in arguments.listen_fds.split(",") if fd]
    adopted = iter(fds)

    def listener(description: str, endpoint: Any, factory: Factory) -> service.IService:
        return AdoptedListener(description, next(adopted), factory)

    top = tap.makeService(options, listener=listener)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    log.info("worker {worker} (pid {pid}) serving", worker=arguments.index, pid=os.getpid())
    # The parent stops workers with SIGTERM: a terminal's SIGINT to the whole
    # group waits for it, and a second SIGTERM after the reactor has put its
    # own handler back (on its way out) must not turn a clean exit into a kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stopping_anyway)
    # SIGUSR1 reopens the access log, which only the parent writes; sent to
    # the whole process group it must not kill a worker (the default action).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    reactor.run()
    events.flush()
    return 0


if __name__ == "__main__":
    from socksident import worker  # the importable module, not this __main__ copy

    sys.exit(worker.worker_main(sys.argv[1:]))
