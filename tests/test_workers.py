"""`--workers`: option parsing, and the parent's supervision on a fake process reactor.

The pool spawns no real process here: `ProcessReactor` records each
`spawnProcess` and its `task.Clock` drives restarts and the stop bound.
Real worker processes are tested in tests/integration/test_workers.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, eventAsJSON, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from socksident import services, tap, worker, workers
from socksident.accesslog import access_fields
from socksident.reuseport import ListeningGroup
from socksident.worker import AdoptedListener
from socksident.workerevents import event_to_line
from socksident.workers import (
    EVENTS_FD,
    FIRST_LISTEN_FD,
    STOP_TIMEOUT,
    WorkerPool,
    parse_workers,
    restart_delay,
)
from test_accesslog import record


class FakeProcess:
    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid: Any = pid
        self.signals: list[str] = []
        self.stdin_closed = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def end(self, reason: Failure) -> None:
        self.pid = None
        self.protocol.processEnded(reason)


class ProcessReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self._exitSignal: Any = None

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None) -> FakeProcess:
        process = FakeProcess(protocol, 1000 + len(self.spawned))
        self.spawned.append(dict(protocol=protocol, executable=executable, args=args,
                                 childFDs=childFDs, process=process, env=env))
        protocol.makeConnection(process)
        return process


def killed(number: int) -> Failure:
    return Failure(ProcessTerminated(signal=number))


@pytest.fixture
def events():
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.fixture
def pool():
    reactor = ProcessReactor()
    pool = WorkerPool(2, ["--workers", "2", "--rules", "r.conf"], ["tcp:1080"], [None],
                      reload_on_hangup=False, reactor=reactor)
    sockets = [socket.socket(), socket.socket()]
    pool.groups = [ListeningGroup(socket.AF_INET, "127.0.0.1", 1080, sockets)]
    pool.startService()
    yield pool
    for sock in sockets:
        sock.close()


def processes(pool: WorkerPool) -> list[FakeProcess]:
    return [spawn["process"] for spawn in pool.reactor.spawned]


# -- options -----------------------------------------------------------------------------


def test_workers_takes_a_positive_number_or_auto(monkeypatch):
    assert parse_workers("1") == 1 and parse_workers("8") == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert parse_workers("auto") == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert parse_workers("auto") == 1
    for bad in ("0", "-2", "two", "", "1.5"):
        with pytest.raises(usage.UsageError, match="--workers takes a positive number or auto"):
            parse_workers(bad)


def test_the_default_is_one_process_serving_itself():
    options = tap.Options()
    options.parseOptions([])
    assert options["workers"] == 1
    top = tap.makeService(options)
    assert not any(isinstance(s, WorkerPool) for s in top)


def test_more_than_one_worker_makes_the_parent_a_pool_that_passes_the_options_on():
    options = tap.Options()
    argv = ["--workers", "2", "--port", "tcp:0:interface=127.0.0.1", "--idle-timeout", "5"]
    options.parseOptions(argv)
    (pool,) = list(tap.makeService(options))
    assert isinstance(pool, WorkerPool)
    assert (pool.count, pool.argv, pool.reload_on_hangup) == (2, argv, False)


@pytest.mark.parametrize("port", ["unix:/tmp/socksident-test.sock", "tcp:0", "tcp6:0"])
def test_workers_serve_tcp_and_tcp6_ports_only(port):
    options = tap.Options()
    if port.startswith("unix"):
        with pytest.raises(usage.UsageError, match=r"--workers 3 serves tcp: and tcp6: ports"):
            options.parseOptions(["--workers", "3", "--port", port])
    else:
        options.parseOptions(["--workers", "3", "--port", port])
    tap.Options().parseOptions(["--workers", "1", "--port", port])  # one process serves all


def test_the_rule_command_cap_is_shared_among_the_workers(tmp_path):
    from socksident.commands import MAX_RUNNING

    rules = tmp_path / "sockd.conf"
    rules.write_text("permit 127.0.0.0 255.0.0.0\n")
    caps = {}
    for count in ("1", "4", "100"):
        options = tap.Options()
        options.parseOptions(["--workers", count, "--rules", str(rules)])
        caps[count] = options["policy"]._run_command.max_running
    assert caps == {"1": MAX_RUNNING, "4": MAX_RUNNING // 4, "100": 1}


# -- the pool ------------------------------------------------------------------------------


def test_each_worker_runs_this_python_with_its_sockets_and_the_same_options(pool):
    assert len(pool.reactor.spawned) == 2
    for index, spawn in enumerate(pool.reactor.spawned):
        assert spawn["executable"] == sys.executable
        args = spawn["args"]
        assert args[:3] == [sys.executable, "-m", "socksident.worker"]
        assert args[args.index("--index") + 1] == str(index)
        assert args[args.index("--reactor") + 1] == ProcessReactor.__module__
        assert args[args.index("--listen-fds") + 1] == str(FIRST_LISTEN_FD)
        assert args[args.index("--") + 1 :] == ["--workers", "2", "--rules", "r.conf"]
        fds = spawn["childFDs"]
        assert fds[FIRST_LISTEN_FD] == pool.groups[0].sockets[index].fileno()
        assert fds[EVENTS_FD] == "r" and fds[1] == "r" and fds[2] == "r"
        assert spawn["process"].stdin_closed


def test_a_dead_worker_is_restarted_after_a_growing_delay(pool, events):
    reactor = pool.reactor
    processes(pool)[0].end(killed(9))
    assert len(reactor.spawned) == 2
    warning = [e for e in events if e.get("log_level") is LogLevel.warn][-1]
    assert warning["worker"] == 0 and warning["pid"] == 1000 and warning["delay"] == 0.5
    assert warning["how"] == "killed by SIGKILL"
    reactor.advance(0.49)
    assert len(reactor.spawned) == 2
    reactor.advance(0.01)
    assert len(reactor.spawned) == 3
    assert pool.reactor.spawned[2]["args"][4] == "0"  # --index 0 again
    processes(pool)[2].end(Failure(ProcessTerminated(exitCode=1)))
    assert reactor.getDelayedCalls()[0].getTime() - reactor.seconds() == 1.0
    reactor.advance(1.0)
    # a worker that served a while starts over at the first delay
    reactor.advance(workers.STABLE_AFTER)
    processes(pool)[3].end(killed(11))
    assert reactor.getDelayedCalls()[0].getTime() - reactor.seconds() == 0.5


def test_restart_delays_double_up_to_a_limit():
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(50) == workers.MAX_RESTART_DELAY


def test_stop_sends_sigterm_and_waits_for_every_worker(pool):
    pool.reactor._exitSignal = signal.SIGTERM
    stopped = pool.stopService()
    assert [p.signals for p in processes(pool)] == [["TERM"], ["TERM"]]
    processes(pool)[1].end(Failure(ProcessDone(0)))
    assert not stopped.called
    processes(pool)[0].end(Failure(ProcessDone(0)))
    assert stopped.called and pool.groups == [] and pool.reactor.getDelayedCalls() == []
    assert pool.reactor._exitSignal is None  # a clean stop: twistd exits 0
    assert len(pool.reactor.spawned) == 2  # nothing restarted


def test_a_worker_that_ignores_sigterm_is_killed_after_the_bound(pool):
    pool.reactor._exitSignal = signal.SIGTERM
    stopped = pool.stopService()
    processes(pool)[0].end(Failure(ProcessDone(0)))
    pool.reactor.advance(STOP_TIMEOUT)
    assert processes(pool)[1].signals == ["TERM", "KILL"]
    processes(pool)[1].end(killed(9))
    assert stopped.called
    assert pool.reactor._exitSignal == signal.SIGTERM


def test_a_second_sigterm_is_passed_on_to_the_draining_workers(pool):
    calls: list[Any] = []
    pool.reactor.callFromThread = lambda f, *a: calls.append((f, a))
    before = signal.getsignal(signal.SIGTERM)
    stopped = pool.stopService()
    handler = signal.getsignal(signal.SIGTERM)
    assert handler is not before
    handler(signal.SIGTERM, None)
    for function, args in calls:
        function(*args)
    assert [p.signals for p in processes(pool)] == [["TERM", "TERM"], ["TERM", "TERM"]]
    for process in processes(pool):
        process.end(Failure(ProcessDone(0)))
    assert stopped.called and signal.getsignal(signal.SIGTERM) is before


def test_the_parent_waits_the_workers_shutdown_timeout_and_a_margin():
    from socksident.tap import Options, makeService

    options = Options()
    options.parseOptions(["--workers", "2", "--shutdown-timeout", "90"])
    [pool] = list(makeService(options))
    assert pool.stop_timeout == 120


def test_stopping_cancels_a_pending_restart(pool):
    processes(pool)[0].end(killed(9))
    pool.stopService()
    processes(pool)[1].end(Failure(ProcessDone(0)))
    pool.reactor.advance(60)
    assert len(pool.reactor.spawned) == 2


def test_sighup_reaches_every_running_worker(pool):
    processes(pool)[0].end(killed(9))
    pool.signal_all("HUP")
    assert [p.signals for p in processes(pool)] == [[], ["HUP"]]


def test_a_workers_events_are_published_here_saying_which_worker(pool, events):
    protocol = pool.reactor.spawned[1]["protocol"]
    line = eventAsJSON(
        {"log_format": "hello {who}", "who": "there", "log_level": LogLevel.info,
         "log_namespace": "socksident.access", "log_time": 5.0}
    ).encode() + b"\n"
    protocol.childDataReceived(EVENTS_FD, line[:10])
    assert not [e for e in events if e.get("who")]
    protocol.childDataReceived(EVENTS_FD, line[10:] + b"not json\n")
    protocol.childDataReceived(2, b"Traceback (most recent call last):\n")
    (event,) = [e for e in events if e.get("who")]
    assert event["worker"] == 1 and event["log_time"] == 5.0
    assert event["log_system"] == "socksident.access#info worker 1"
    assert any(e.get("line") == "not json" and e["worker"] == 1 for e in events)
    assert any(e.get("stream") == "stderr" and e["line"].startswith("Traceback") for e in events)


def test_a_workers_access_event_is_published_here_with_its_fields(pool, events):
    fields = record().fields()
    line = event_to_line({"log_namespace": "socksident.access", "log_time": 7.0,
                          "summary": "the line", "access_record": None, **fields})
    pool.reactor.spawned[0]["protocol"].childDataReceived(EVENTS_FD, line.encode())
    (event,) = [e for e in events if e.get("summary") == "the line"]
    assert access_fields(event) == fields
    assert event["worker"] == 0 and event["log_system"] == "socksident.access#info worker 0"


class RunningClock(task.Clock):
    """A clock that is a running reactor or not, as `_EventsToParent` asks."""

    running = False


class Writes(io.StringIO):
    """A stream that keeps what each flush sent, as the pipe would have got it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def flush(self) -> None:
        super().flush()
        text = self.getvalue()[sum(map(len, self.sent)):]
        if text:
            self.sent.append(text)


def event(summary: str) -> dict[str, Any]:
    return {"log_format": "{summary}", "summary": summary, "log_level": LogLevel.info}


def test_a_worker_sends_each_event_as_one_json_line_without_the_record_value():
    stream = Writes()
    observer = worker._EventsToParent(stream, RunningClock())
    observer({**event("a\nb"), "access_record": object()})
    [text] = stream.sent  # at once: no reactor runs
    assert text.count("\n") == 1 and text.endswith("\n")
    sent = json.loads(text)
    assert sent["summary"] == "a\nb" and "access_record" not in sent


def test_a_running_worker_sends_a_turns_events_in_one_write_on_the_next_turn():
    stream, clock = Writes(), RunningClock()
    clock.running = True
    observer = worker._EventsToParent(stream, clock)
    observer(event("one"))
    observer(event("two"))
    assert stream.sent == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    [text] = stream.sent
    assert [json.loads(line)["summary"] for line in text.splitlines()] == ["one", "two"]
    observer(event("three"))
    clock.advance(0)
    assert [json.loads(text)["summary"] for text in stream.sent[1:]] == ["three"]
    assert clock.getDelayedCalls() == []


def test_flushing_a_worker_sends_what_waits_and_cancels_the_next_turns_write():
    stream, clock = Writes(), RunningClock()
    clock.running = True
    observer = worker._EventsToParent(stream, clock)
    observer(event("last"))
    observer.flush()  # what worker_main does once its reactor has stopped
    assert [json.loads(text)["summary"] for text in stream.sent] == ["last"]
    assert clock.getDelayedCalls() == []
    observer(event("after"))
    assert len(clock.getDelayedCalls()) == 1  # a new turn's write


def test_an_adopted_listener_serves_the_inherited_socket_in_its_family():
    reactor = MemoryReactor()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    fd = os.dup(sock.fileno())
    sock.close()
    factory = Factory()
    listener = AdoptedListener("tcp6:0", fd, factory, reactor=reactor)
    listener.startService()
    assert reactor.adoptedPorts[0][1:] == (socket.AF_INET6, factory)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the port keeps its own descriptor


# -- the access log and metrics under --workers ------------------------------------------


def test_workers_get_the_pools_extra_environment_at_each_start(pool):
    assert "SOCKSIDENT_TEST" not in pool.reactor.spawned[0]["env"]
    pool.environ["SOCKSIDENT_TEST"] = "x"
    processes(pool)[0].end(killed(9))
    pool.reactor.advance(60)
    assert pool.reactor.spawned[2]["env"]["SOCKSIDENT_TEST"] == "x"
    assert pool.reactor.spawned[2]["env"]["PATH"] == os.environ["PATH"]


def test_the_pool_reports_the_pid_of_each_worker_that_exits(pool):
    gone: list[int] = []
    pool.exited.append(gone.append)
    processes(pool)[1].end(killed(9))
    pool.stopService()
    processes(pool)[0].end(Failure(ProcessDone(0)))
    assert gone == [1001, 1000]


def test_the_parent_writes_the_access_log_and_serves_the_metrics(tmp_path):
    from socksident.jsonlog import ReopenOnSignal
    from socksident.metrics import AggregatedMetricsService

    options = tap.Options()
    options.parseOptions(["--workers", "2", "--port", "tcp:0:interface=127.0.0.1",
                          "--access-log", str(tmp_path / "access.json"),
                          "--metrics", "tcp:0:interface=127.0.0.1"])
    metrics, access, pool = list(tap.makeService(options))  # started in this order
    assert isinstance(metrics, AggregatedMetricsService) and metrics.environ is pool.environ
    assert pool.exited == [metrics.worker_exited]
    assert isinstance(access, ReopenOnSignal) and isinstance(pool, WorkerPool)
    access.log.close()


def test_a_worker_opens_no_access_log_and_listens_for_no_metrics(tmp_path):
    from socksident.jsonlog import ReopenOnSignal
    from socksident.metrics import MetricsService

    options = tap.Options(worker=True)
    options.parseOptions(["--workers", "2", "--port", "tcp:0:interface=127.0.0.1",
                          "--access-log", str(tmp_path / "access.json"),
                          "--metrics", "tcp:0:interface=127.0.0.1"])
    assert options["access-log-file"] is None and not (tmp_path / "access.json").exists()
    top = tap.makeService(options, listener=lambda d, e, f: worker.AdoptedListener(d, -1, f))
    assert not any(isinstance(s, ReopenOnSignal) for s in top)
    (metrics,) = [s for s in top if isinstance(s, MetricsService)]
    assert list(metrics) == []  # no listener: the parent serves the sum


class Stopping(tap.service.Service):
    def __init__(self, name: str, order: list[str]) -> None:
        self.name, self.order = name, order
        self.stopped = Deferred()

    def stopService(self):
        super().stopService()
        self.order.append(self.name)
        return self.stopped


def test_the_parent_stops_each_service_once_the_later_ones_have_stopped():
    order: list[str] = []
    top = services.StopInOrder()
    log, pool = Stopping("log", order), Stopping("pool", order)
    log.setServiceParent(top)
    pool.setServiceParent(top)
    top.startService()
    finished: list[object] = []
    top.stopService().addBoth(finished.append)
    assert order == ["pool"]  # the log stays open while the workers drain
    pool.stopped.callback(None)
    assert order == ["pool", "log"] and finished == []
    log.stopped.callback(None)
    assert finished == [None]
