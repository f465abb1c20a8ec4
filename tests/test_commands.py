"""Rule commands: spawned through the reactor, logged, time-limited."""

from __future__ import annotations

from typing import Any, Generator, Mapping, Optional, Sequence

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from socksident.commands import CommandResult, run_command


class FakeProcess:
    """The transport a spawned process would have; records what is done to it."""

    def __init__(self, protocol: ProcessProtocol) -> None:
        self.protocol = protocol
        self.pid: Optional[int] = 4242
        self.signals: list[str] = []
        self.stdin_closed = False
        self.pipes_closed = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def loseConnection(self) -> None:
        self.pipes_closed = True

    def signalProcess(self, signal: str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(signal)

    def end(self, reason: Exception) -> None:
        self.pid = None
        self.protocol.processEnded(Failure(reason))


class FakeProcessReactor(Clock):
    """A Clock that spawns FakeProcesses instead of real ones."""

    def __init__(self, fail: Optional[Exception] = None) -> None:
        super().__init__()
        self.fail = fail
        self.spawned: list[tuple[str, list[str], Any, FakeProcess]] = []

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
    ) -> FakeProcess:
        if self.fail is not None:
            raise self.fail
        process = FakeProcess(processProtocol)
        self.spawned.append((executable, list(args), env, process))
        processProtocol.makeConnection(process)  # type: ignore[no-untyped-call]
        return process


def fired(d: Deferred[CommandResult]) -> CommandResult:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], CommandResult), results[0]
    return results[0]


def test_spawns_sh_c_with_the_server_environment() -> None:
    reactor = FakeProcessReactor()
    run_command("echo hi > /tmp/x", reactor=reactor)
    ((executable, args, env, process),) = reactor.spawned
    assert executable == "/bin/sh" and args == ["/bin/sh", "-c", "echo hi > /tmp/x"]
    assert env is None  # None: the child inherits os.environ
    assert process.stdin_closed


def test_fires_when_the_process_ends_and_cancels_the_timer() -> None:
    reactor = FakeProcessReactor()
    d = run_command("true", reactor=reactor)
    process = reactor.spawned[0][3]
    assert not d.called and len(reactor.getDelayedCalls()) == 1
    process.end(ProcessDone(0))
    assert fired(d) == CommandResult("true", exit_code=0, signal=None, timed_out=False)
    assert reactor.getDelayedCalls() == []


def test_time_limit_kills_the_command() -> None:
    reactor = FakeProcessReactor()
    with capturedLogs() as events:
        d = run_command("sleep 1000", reactor=reactor, time_limit=5)
        process = reactor.spawned[0][3]
        reactor.advance(4.9)
        assert process.signals == [] and not process.pipes_closed
        reactor.advance(0.2)
        assert process.signals == ["KILL"] and process.pipes_closed
        assert not d.called
        process.end(ProcessTerminated(signal=9))
    result = fired(d)
    assert (result.exit_code, result.signal, result.timed_out) == (None, 9, True)
    assert [e["time_limit"] for e in events if "time_limit" in e] == [5]


def test_default_time_limit_is_sixty_seconds() -> None:
    reactor = FakeProcessReactor()
    run_command("sleep 1000", reactor=reactor)
    process = reactor.spawned[0][3]
    reactor.advance(59.9)
    assert process.signals == []
    reactor.advance(0.1)
    assert process.signals == ["KILL"]


def test_time_limit_after_the_shell_exited_still_closes_the_pipes() -> None:
    # The shell is gone but a background child holds stdout open.
    reactor = FakeProcessReactor()
    d = run_command("sleep 1000 &", reactor=reactor, time_limit=1)
    process = reactor.spawned[0][3]
    process.pid = None
    reactor.advance(1)
    assert process.signals == [] and process.pipes_closed
    process.end(ProcessDone(0))
    assert fired(d).timed_out


def test_cancelling_kills_the_command() -> None:
    reactor = FakeProcessReactor()
    d = run_command("sleep 1000", reactor=reactor)
    process = reactor.spawned[0][3]
    d.addErrback(lambda f: None)
    d.cancel()
    assert process.signals == ["KILL"] and process.pipes_closed
    process.end(ProcessTerminated(signal=9))  # must not raise AlreadyCalledError


def test_output_lines_are_logged_per_stream() -> None:
    reactor = FakeProcessReactor()
    with capturedLogs() as events:
        run_command("cmd", reactor=reactor)
        protocol = reactor.spawned[0][3].protocol
        protocol.outReceived(b"hel")
        protocol.outReceived(b"lo\r\nwor")
        protocol.errReceived(b"oops\n")
        protocol.outReceived(b"ld")
        assert [e["line"] for e in events if "line" in e] == ["hello", "oops"]
        reactor.spawned[0][3].end(ProcessTerminated(exitCode=3))
    lines = [(e["stream"], e["line"], e["pid"], e["command"]) for e in events if "line" in e]
    assert lines == [
        ("stdout", "hello", 4242, "cmd"),
        ("stderr", "oops", 4242, "cmd"),
        ("stdout", "world", 4242, "cmd"),
    ]
    (status,) = [e for e in events if "exit_code" in e]
    assert (status["exit_code"], status["log_level"].name) == (3, "warn")


def test_endless_line_is_split() -> None:
    reactor = FakeProcessReactor()
    with capturedLogs() as events:
        run_command("yes | tr -d '\\n'", reactor=reactor)
        reactor.spawned[0][3].protocol.outReceived(b"y" * 10000)
    assert [len(e["line"]) for e in events if "line" in e] == [4096, 4096]


def test_a_command_that_cannot_start_is_logged_and_reported() -> None:
    reactor = FakeProcessReactor(fail=OSError("fork failed"))
    with capturedLogs() as events:
        result = fired(run_command("echo", reactor=reactor))
    assert result == CommandResult("echo", exit_code=None, error="fork failed")
    assert [e["command"] for e in events if e.get("log_failure")] == ["echo"]


@pytest_twisted.inlineCallbacks
def test_real_shell_output_and_exit_status() -> Generator[Any, Any, None]:
    with capturedLogs() as events:
        result = yield run_command("echo hello; echo oops >&2; exit 3")
    assert (result.exit_code, result.signal, result.timed_out) == (3, None, False)
    lines = sorted((e["stream"], e["line"]) for e in events if "line" in e)
    assert lines == [("stderr", "oops"), ("stdout", "hello")]
    (status,) = [e for e in events if "exit_code" in e]
    assert status["exit_code"] == 3 and isinstance(status["pid"], int)


def test_runner_caps_how_many_commands_run_at_once() -> None:
    from socksident.commands import CommandRunner

    reactor = FakeProcessReactor()
    default = CommandRunner(reactor=reactor)
    for n in range(32):
        default(f"echo {n}")
    assert fired(default("echo 32")).error == "too many commands running"
    assert len(reactor.spawned) == 32
    reactor = FakeProcessReactor()
    runner = CommandRunner(max_running=2, reactor=reactor)
    first, _ = runner("echo 1"), runner("echo 2")
    skipped = fired(runner("echo 3"))
    assert skipped.error == "too many commands running" and skipped.exit_code is None
    assert [args[-1] for _, args, _, _ in reactor.spawned] == ["echo 1", "echo 2"]
    reactor.spawned[0][3].end(ProcessDone(0))
    assert fired(first).exit_code == 0 and runner.running == 1
    runner("echo 4")
    assert [args[-1] for _, args, _, _ in reactor.spawned][-1] == "echo 4"
