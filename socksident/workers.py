"""`--workers N`: N server processes behind the same listening ports.

The process twistd runs (the parent) serves nothing itself.  It binds each
`--port` as a `reuseport.ListeningGroup` of N sockets, so each client host
always reaches the same worker, and starts worker k as
``python -m socksident.worker`` (`socksident.worker`) with the same socks4 options and socket k of
every group as inherited descriptors.  A worker builds the ordinary service
(`tap.makeService`) with listeners that adopt those sockets, and runs its own
reactor, without twistd.

What was per process stays correct per client host: the CONNECTs a BIND may
follow and per-host limits live in the one worker that sees all of a host's
connections.  The rule-command cap is divided among the workers.

The parent is the one log writer: a worker publishes every log event to it
as a JSON line on descriptor 3, and the parent re-publishes it (tagged
``worker k`` in the text log, ``worker`` in the event) to its own
observers: twistd's log file, the ``--access-log`` file (which only the
parent opens, so SIGUSR1 reopens it there and no worker keeps writing to a
rotated file) and whatever else observes there.  ``--metrics`` is served by
the parent too, summed over the workers (`socksident.metrics`).  It restarts
a worker that dies (with a backoff when it keeps dying), forwards SIGHUP
(the rules reload in every worker) and on shutdown stops the workers with
SIGTERM and waits for each.  A worker whose parent vanishes is sent SIGTERM
by the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable, Optional, Sequence, cast

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from socksident._types import global_reactor
from socksident.reuseport import ListeningGroup, open_group
from socksident.services import ListenError
from socksident.workerevents import event_from_line

__all__ = [
    "EVENTS_FD",
    "FIRST_LISTEN_FD",
    "MAX_RESTART_DELAY",
    "RESTART_DELAY",
    "STABLE_AFTER",
    "STOP_TIMEOUT",
    "WorkerPool",
    "check_endpoints",
    "parse_workers",
    "restart_delay",
]

log = Logger()

#: The worker's descriptor for its log events (JSON lines to the parent).
EVENTS_FD = 3
#: Worker descriptors from here on are its listening sockets, one per --port.
FIRST_LISTEN_FD = 4

#: Seconds before the first restart of a worker that died; doubles for each
#: further death of a worker that ran less than STABLE_AFTER seconds.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
#: Seconds the parent waits for a worker after SIGTERM before SIGKILL.
STOP_TIMEOUT = 60.0


def parse_workers(value: str) -> int:
    """``--workers``: a positive number, or ``auto`` for one per CPU."""
    if value == "auto":
        return os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise usage.UsageError(f"--workers takes a positive number or auto, not {value!r}")
    return count


def check_endpoints(count: int, descriptions: Sequence[str], endpoints: Sequence[Any]) -> None:
    """Several workers share only plain TCP listeners (tcp: and tcp6:)."""
    if count == 1:
        return
    for description, endpoint in zip(descriptions, endpoints):
        if type(endpoint) not in (TCP4ServerEndpoint, TCP6ServerEndpoint):
            raise usage.UsageError(
                f"--workers {count} serves tcp: and tcp6: ports only, not --port {description!r}"
                " (use --workers 1 for it)"
            )


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker after `failures` quick deaths in a row."""
    return float(min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** max(0, failures - 1)))


def _tcp_address(endpoint: Any) -> tuple[socket.AddressFamily, str, int, int]:
    """Family, interface, port and backlog of a tcp:/tcp6: endpoint."""
    family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
    interface = endpoint._interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return family, interface, int(endpoint._port), int(endpoint._backlog)


# -- the parent --------------------------------------------------------------------------


class _WorkerProtocol(ProcessProtocol):
    """One worker process as the parent sees it: its log stream and its end."""

    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: Optional[int] = None
        self.started = 0.0
        self.ended: Deferred[None] = Deferred()
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.pop(childFD, b"") + data).split(b"\n")
        if lines[-1]:
            self._partial[childFD] = lines[-1]
        for line in lines[:-1]:
            if line:
                self._line(childFD, line)

    def _line(self, childFD: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if childFD == EVENTS_FD:
            try:
                event = event_from_line(text)
            except ValueError:
                log.warn("worker {worker}: {line}", worker=self.index, line=text)
                return
            self.pool.publish(self.index, event)
        else:
            stream = "stdout" if childFD == 1 else "stderr"
            log.warn("worker {worker} {stream}: {line}", worker=self.index, stream=stream,
                     line=text)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in sorted(self._partial.items()):
            self._line(childFD, rest)
        self._partial.clear()
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """Binds the ports, starts and restarts the workers, fans out signals."""

    def __init__(
        self,
        count: int,
        argv: Sequence[str],
        descriptions: Sequence[str],
        endpoints: Sequence[Any],
        reload_on_hangup: bool,
        reactor: Any = None,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.stop_timeout = stop_timeout  # each worker's --shutdown-timeout, and a margin
        self.count = count
        self.argv = list(argv)
        self.descriptions = list(descriptions)
        self.endpoints = list(endpoints)
        self.reload_on_hangup = reload_on_hangup
        self.groups: list[ListeningGroup] = []
        self.workers: dict[int, _WorkerProtocol] = {}
        self._reactor = reactor
        self._failures = [0] * count
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._previous_hangup: Any = None
        #: Added to the workers' environment (read at each start).
        self.environ: dict[str, str] = {}
        #: Called with the pid of each worker that has exited.
        self.exited: list[Callable[[int], None]] = []

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            self._reactor = global_reactor()
        return self._reactor

    def privilegedStartService(self) -> None:
        """Bind now: before twistd drops privileges, and so a busy port stops start-up."""
        super().privilegedStartService()
        for description, endpoint in zip(self.descriptions, self.endpoints):
            family, host, port, backlog = _tcp_address(endpoint)
            try:
                self.groups.append(open_group(family, host, port, backlog, self.count))
            except OSError as error:
                for group in self.groups:
                    group.close()
                self.groups.clear()
                raise ListenError(f"--port {description}: {error}") from None

    def startService(self) -> None:
        super().startService()
        if not self.groups:
            self.privilegedStartService()
        if self.reload_on_hangup:
            reactor = cast(IReactorFromThreads, self.reactor)

            def hangup(signum: int, frame: Any) -> None:
                reactor.callFromThread(self.signal_all, "HUP")

            self._previous_hangup = signal.signal(signal.SIGHUP, hangup)
        ports = ", ".join(f"{d} (port {g.port})" for d, g in zip(self.descriptions, self.groups))
        log.info(
            "socksident SOCKS4/4A server listening on {ports} with {count} workers",
            ports=ports,
            count=self.count,
        )
        for index in range(self.count):
            self.spawn(index)

    def command(self, index: int) -> list[str]:
        """The worker's command line: this Python, this reactor, the same options."""
        module = type(self.reactor).__module__
        fds = ",".join(str(FIRST_LISTEN_FD + n) for n in range(len(self.groups)))
        return [
            sys.executable, "-m", "socksident.worker",
            "--index", str(index), "--reactor", module, "--listen-fds", fds,
            "--parent", str(os.getpid()), "--", *self.argv,
        ]  # fmt: skip

    def spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        protocol = _WorkerProtocol(self, index)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", EVENTS_FD: "r"}
        for n, group in enumerate(self.groups):
            child_fds[FIRST_LISTEN_FD + n] = group.sockets[index].fileno()
        protocol.started = self.reactor.seconds()
        self.reactor.spawnProcess(
            protocol,
            sys.executable,
            self.command(index),
            env={**os.environ, **self.environ},
            childFDs=child_fds,
        )
        self.workers[index] = protocol
        log.info("worker {worker} started, pid {pid}", worker=index, pid=protocol.pid)

    def publish(self, index: int, event: dict[str, Any]) -> None:
        """A worker's log event, to this process's observers, saying which worker."""
        level = event.get("log_level")
        level_name = getattr(level, "name", "info")
        namespace = event.get("log_namespace", "-")
        event["worker"] = index
        event["log_system"] = f"{namespace}#{level_name} worker {index}"
        globalLogPublisher(event)

    def ended(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        index = protocol.index
        if self.workers.get(index) is protocol:
            del self.workers[index]
        how = _exit_description(reason)
        if protocol.pid is not None:
            for exited in self.exited:
                exited(protocol.pid)
        if self._stopping:
            log.info("worker {worker} (pid {pid}) stopped: {how}", worker=index,
                     pid=protocol.pid, how=how)
            return
        lived = self.reactor.seconds() - protocol.started
        self._failures[index] = 1 if lived >= STABLE_AFTER else self._failures[index] + 1
        delay = restart_delay(self._failures[index])
        log.warn(
            "worker {worker} (pid {pid}) {how} after {lived:.1f} s; restarting in {delay:g} s",
            worker=index,
            pid=protocol.pid,
            how=how,
            lived=lived,
            delay=delay,
        )
        self._restarts[index] = self.reactor.callLater(delay, self.spawn, index)

    def signal_all(self, name: str) -> None:
        for protocol in list(self.workers.values()):
            _signal(protocol, name)

    def stopService(self) -> "Deferred[Any]":
        """SIGTERM every worker; fire once all have exited (SIGKILL after STOP_TIMEOUT)."""
        super().stopService()
        self._stopping = True
        if self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        running = list(self.workers.values())
        if not running:
            self._close_groups()
            return succeed(None)
        for protocol in running:
            _signal(protocol, "TERM")
        kill = self.reactor.callLater(self.stop_timeout, self._kill_remaining)
        reactor = self.reactor

        def second_term(signum: int, frame: Any) -> None:
            # The workers drain their connections: a second SIGTERM cuts them off.
            reactor.callFromThread(self.signal_all, "TERM")

        previous_term = signal.signal(signal.SIGTERM, second_term)

        def done(_: object) -> None:
            signal.signal(signal.SIGTERM, previous_term)
            if kill.active():
                kill.cancel()
                self._exit_cleanly()
            self._close_groups()

        return DeferredList([p.ended for p in running]).addCallback(done)

    def _exit_cleanly(self) -> None:
        """Every worker stopped in time: twistd exits 0, not by re-raising SIGTERM/SIGINT.

        twistd remembers the signal that stopped its reactor and kills itself
        with it at the end; after a complete, clean stop of all workers the
        parent's status says so instead.
        """
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None

    def _kill_remaining(self) -> None:
        for protocol in list(self.workers.values()):
            log.warn("worker {worker} (pid {pid}) still running {timeout:g} s after SIGTERM; "
                     "killing it", worker=protocol.index, pid=protocol.pid, timeout=self.stop_timeout)
            _signal(protocol, "KILL")

    def _close_groups(self) -> None:
        for group in self.groups:
            group.close()
        self.groups.clear()


def _signal(protocol: _WorkerProtocol, name: str) -> None:
    try:
        if protocol.transport is not None:
            protocol.transport.signalProcess(name)
    except (ProcessExitedAlready, OSError):
        pass


def _exit_description(reason: Failure) -> str:
    status = getattr(reason.value, "status", None)
    code = getattr(reason.value, "exitCode", None)
    number = getattr(reason.value, "signal", None)
    if number is None and isinstance(status, int) and os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
    if number is not None:
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exited with status {code}"
