"""Run the rules file's shell commands without blocking the reactor.

A rule command (``: cmd``, ``#NO_IDENTD:``, ``#BAD_ID:``) is started as
``/bin/sh -c CMD`` with the server's environment and no stdin.  Each line it
writes to stdout or stderr becomes a structured log event, and so does its
exit status.  A command still running after its time limit is killed, and
its pipes are closed so that a background child holding them cannot keep it
alive.  (A child the shell started may outlive the kill: only the shell is
signalled.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast
from typing import Protocol as _Interface

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from socksident._types import DelayedCall, ReactorProcessTime, global_reactor

__all__ = [
    "DEFAULT_TIME_LIMIT",
    "MAX_LOG_LINE",
    "MAX_RUNNING",
    "CommandProtocol",
    "CommandReactor",
    "CommandResult",
    "CommandRunner",
    "run_command",
]

log = Logger()

#: Seconds a command may run before it is killed.
DEFAULT_TIME_LIMIT = 60.0
SHELL = "/bin/sh"
#: Longest output line logged as one event; longer lines are split.
MAX_LOG_LINE = 4096


#: What the runner needs from a reactor: IReactorProcess and IReactorTime.
CommandReactor = ReactorProcessTime


class _ProcessTransport(_Interface):
    pid: Optional[int]

    def closeStdin(self) -> None: ...

    def signalProcess(self, signalID: str) -> None: ...

    def loseConnection(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CommandResult:
    """How a command ended; `run_command`'s Deferred fires with one."""

    command: str
    exit_code: Optional[int]  # None when killed by a signal or never started
    signal: Optional[int] = None
    timed_out: bool = False
    error: Optional[str] = None  # why it could not be started


class CommandProtocol(ProcessProtocol):
    """Logs one command's output and exit, and enforces its time limit."""

    def __init__(self, command: str, clock: CommandReactor, time_limit: float) -> None:
        self.command = command
        self.finished: Deferred[CommandResult] = Deferred(lambda d: self.kill())
        self.pid: Optional[int] = None
        self._clock = clock
        self._time_limit = time_limit
        self._timer: Optional[DelayedCall] = None
        self._process: Optional[_ProcessTransport] = None
        self._partial = {"stdout": b"", "stderr": b""}
        self._timed_out = False

    def connectionMade(self) -> None:
        self._process = cast(_ProcessTransport, self.transport)
        self.pid = self._process.pid
        self._process.closeStdin()
        self._timer = self._clock.callLater(self._time_limit, self._time_up)

    def outReceived(self, data: bytes) -> None:
        self._received("stdout", data)

    def errReceived(self, data: bytes) -> None:
        self._received("stderr", data)

    def _received(self, stream: str, data: bytes) -> None:
        *lines, rest = (self._partial[stream] + data).split(b"\n")
        while len(rest) > MAX_LOG_LINE:
            lines.append(rest[:MAX_LOG_LINE])
            rest = rest[MAX_LOG_LINE:]
        self._partial[stream] = rest
        for line in lines:
            self._log_line(stream, line)

    def _log_line(self, stream: str, line: bytes) -> None:
        log.info(
            "command {pid} {stream}: {line}",
            command=self.command,
            pid=self.pid,
            stream=stream,
            line=line.rstrip(b"\r").decode("utf-8", "replace"),
        )

    def _time_up(self) -> None:
        self._timer = None
        self._timed_out = True
        log.warn(
            "command {pid} still running after {time_limit} s; killing it: {command!r}",
            command=self.command,
            pid=self.pid,
            time_limit=self._time_limit,
        )
        self.kill()

    def kill(self) -> None:
        """Kill the shell and close its pipes, so that processEnded comes."""
        assert self._process is not None
        try:
            self._process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        self._process.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for stream, rest in self._partial.items():
            if rest:
                self._log_line(stream, rest)
        result = CommandResult(
            self.command,
            exit_code=getattr(reason.value, "exitCode", None),
            signal=getattr(reason.value, "signal", None),
            timed_out=self._timed_out,
        )
        _log_result(result, self.pid)
        if not self.finished.called:
            self.finished.callback(result)


def _log_result(result: CommandResult, pid: Optional[int]) -> None:
    fields = dict(
        command=result.command,
        pid=pid,
        exit_code=result.exit_code,
        signal=result.signal,
        timed_out=result.timed_out,
    )
    if result.exit_code == 0:
        log.info("command {pid} exited with status 0: {command!r}", **fields)
    elif result.exit_code is not None:
        log.warn("command {pid} exited with status {exit_code}: {command!r}", **fields)
    else:
        log.warn("command {pid} killed by signal {signal}: {command!r}", **fields)


def run_command(
    command: str,
    reactor: Optional[CommandReactor] = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
) -> Deferred[CommandResult]:
    """Start ``/bin/sh -c command``; the Deferred fires when it has ended.

    It never fails: a command that cannot be started is logged and reported
    in `CommandResult.error`.  Cancelling it kills the command.  `reactor`
    defaults to the global one, looked up at call time.
    """
    if reactor is None:
        reactor = cast(CommandReactor, global_reactor())
    protocol = CommandProtocol(command, reactor, time_limit)
    try:
        reactor.spawnProcess(protocol, SHELL, [SHELL, "-c", command], env=None)
    except Exception as e:
        log.failure("command could not be started: {command!r}", command=command)
        return succeed(CommandResult(command, exit_code=None, error=str(e)))
    return protocol.finished


#: Rule commands allowed to run at once; more are dropped, with a log line.
MAX_RUNNING = 32


class CommandRunner:
    """`run_command` with a cap, so a busy client cannot fork without end.

    Every permitted request may start a command that runs up to the time
    limit; past `max_running` at once, further commands are skipped and
    logged instead of queued, since a queue would only delay the same flood.
    """

    def __init__(
        self,
        max_running: int = MAX_RUNNING,
        reactor: Optional[CommandReactor] = None,
        time_limit: float = DEFAULT_TIME_LIMIT,
    ) -> None:
        self.max_running = max_running
        self.running = 0
        self._reactor = reactor
        self._time_limit = time_limit

    def __call__(self, command: str) -> Deferred[CommandResult]:
        if self.running >= self.max_running:
            log.warn(
                "command skipped, {running} already running (limit {limit}): {command!r}",
                running=self.running,
                limit=self.max_running,
                command=command,
            )
            return succeed(CommandResult(command, exit_code=None, error="too many commands running"))
        self.running += 1
        finished = run_command(command, self._reactor, self._time_limit)
        finished.addBoth(self._ended)
        return finished

    def _ended(self, result: CommandResult) -> CommandResult:
        self.running -= 1
        return result
