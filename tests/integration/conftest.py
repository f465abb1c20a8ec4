"""Shared fixtures for the integration tests: real sockets on loopback, the real reactor.

Everything here runs on the global reactor that pytest-twisted drives.  Servers
listen on 127.0.0.1 port 0 and are stopped at teardown; tests learn the port
from the fixture.  Blocking clients (curl, PySocks, plain sockets) must run in
a thread (`deferToThread`) or a subprocess, never on the reactor thread.

Fixtures (all function-scoped, all generic; BIND fixtures may be added below):

``start_proxy(policy=None, settings=None, **factory_kwargs)``
    starts an in-process `SOCKS4ServerFactory` and returns a `RunningProxy`.
``proxy``
    one proxy with the default policy and settings.
``listen_tcp(factory, interface="127.0.0.1")``
    listens with any Twisted server factory; returns the port number.
``echo_server``
    an `EchoServer` (echo until EOF, then close) that tracks its connections.
``http_server``
    an `HTTPServer` answering every GET with a fixed body.
``log_capture``
    every twisted.logger event published while the test runs.
``unused_tcp_port``
    a port that was free a moment ago (bind to 0, close).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from zope.interface import implementer

from socksident.server import SOCKS4ServerFactory

LOOPBACK = "127.0.0.1"
#: Deep enough that hundreds of simultaneous connects never wait for a SYN retry.
BACKLOG = 1024


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `predicate` on the reactor every 10 ms; fail after `timeout` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


def bounded(d: "Deferred[Any]", timeout: float = 30.0) -> "Deferred[Any]":
    """`d` with a deadline: it fails with TimeoutError rather than hanging the suite."""
    return d.addTimeout(timeout, reactor)


# -- the proxy ---------------------------------------------------------------


@dataclass
class RunningProxy:
    factory: SOCKS4ServerFactory
    listening: IListeningPort
    host: str = LOOPBACK

    @property
    def port(self) -> int:
        return int(self.listening.getHost().port)

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"


@pytest_twisted.async_yield_fixture
async def start_proxy():
    started: list[IListeningPort] = []

    def start(policy: Any = None, settings: Any = None, **factory_kwargs: Any) -> RunningProxy:
        factory = SOCKS4ServerFactory(policy, settings, **factory_kwargs)
        factory.noisy = False
        listening = reactor.listenTCP(0, factory, backlog=BACKLOG, interface=LOOPBACK)
        started.append(listening)
        return RunningProxy(factory, listening)

    yield start
    for listening in started:
        await listening.stopListening()


@pytest.fixture
def proxy(start_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    return start_proxy()


# -- generic servers ---------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def listen_tcp():
    started: list[IListeningPort] = []

    def listen(factory: Factory, interface: str = LOOPBACK) -> int:
        listening = reactor.listenTCP(0, factory, backlog=BACKLOG, interface=interface)
        started.append(listening)
        return int(listening.getHost().port)

    yield listen
    for listening in started:
        await listening.stopListening()


@implementer(IHalfCloseableProtocol)
class EchoProtocol(Protocol):
    """Echo every byte; on EOF close (after the echo is flushed)."""

    def connectionMade(self) -> None:
        self.factory.opened(self)
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.factory.closed(self)
        self.closed.callback(None)


class EchoServer(Factory):
    """An echo server that remembers every connection it has served."""

    protocol = EchoProtocol
    noisy = False

    def __init__(self) -> None:
        self.port = 0
        self.connections: list[EchoProtocol] = []
        self.open: set[EchoProtocol] = set()

    def opened(self, connection: EchoProtocol) -> None:
        self.connections.append(connection)
        self.open.add(connection)

    def closed(self, connection: EchoProtocol) -> None:
        self.open.discard(connection)

    async def wait_all_closed(self, timeout: float = 10.0) -> None:
        await wait_until(lambda: not self.open, timeout, "the echo server's connections to close")


@pytest.fixture
def echo_server(listen_tcp: Callable[..., int]):
    server = EchoServer()
    server.port = listen_tcp(server)
    yield server
    for connection in list(server.open):
        connection.transport.abortConnection()


@dataclass
class HTTPServer:
    port: int
    body: bytes
    site: Site = field(repr=False)

    def url(self, host: str = LOOPBACK, path: str = "/") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def http_server(listen_tcp: Callable[..., int]) -> HTTPServer:
    body = b"socksident integration test body\n" + bytes(range(256)) * 64 + b"\nend\n"
    root = Resource()
    root.putChild(b"", Data(body, "application/octet-stream"))
    root.putChild(b"index", Data(body, "application/octet-stream"))
    site = Site(root)
    site.noisy = False
    return HTTPServer(listen_tcp(site), body, site)


# -- logs and ports ----------------------------------------------------------


class LogCapture:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    @property
    def access(self) -> list[dict[str, Any]]:
        """The access-log events (namespace socksident.access), oldest first."""
        return [e for e in self.events if e.get("log_namespace") == "socksident.access"]

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Events that carry a traceback (log.failure), from any namespace."""
        return [e for e in self.events if "log_failure" in e]

    async def wait_for_access(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        await wait_until(
            lambda: len(self.access) >= count, timeout, f"{count} access-log event(s)"
        )
        return self.access


@pytest.fixture
def log_capture():
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


def unused_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def unused_tcp_port() -> int:
    return unused_port()


def executable(name: str) -> Optional[str]:
    """Find `name` in PATH (shutil.which, kept here so tests share one spelling)."""
    import shutil

    return shutil.which(name)


def logged_failures(capture: "LogCapture") -> list[str]:
    """The tracebacks logged so far, once garbage has been collected.

    A Deferred that is garbage-collected with a failure nobody handled logs
    "Unhandled error in Deferred" only as it goes: collecting first makes
    such a Deferred left by this test show here, not in some later test.
    """
    import gc

    gc.collect()
    return [
        f"{e.get('log_namespace')}: {e.get('log_format')}: {e['log_failure'].getTraceback()}"
        for e in capture.failures
    ]


@pytest.fixture(autouse=True)
def no_tracebacks_logged(log_capture):
    """Whatever a test checks, the server must not have logged a traceback
    nor left a Deferred with an unhandled failure."""
    yield
    failures = logged_failures(log_capture)
    assert not failures, "tracebacks were logged:\n" + "\n".join(failures)


def skip_unless_strict(reason: str) -> None:
    """Skip a test that needs root or a tool `make test` installs, with `reason`.

    CI sets SOCKSIDENT_STRICT_TESTS=1: there such a test must run, so it fails.
    """
    if os.environ.get("SOCKSIDENT_STRICT_TESTS"):
        pytest.fail(f"{reason} (SOCKSIDENT_STRICT_TESTS is set: this test must run here)")
    pytest.skip(reason)


def recv_exactly(sock: Any, n: int) -> bytes:
    """Read exactly `n` bytes from a blocking (plain or TLS) socket, or fail the test."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 256 * 1024))
        if not chunk:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes: {bytes(out[:64])!r}")
        out += chunk
    return bytes(out)


def recv_until_eof(sock: Any, limit: int = 256 * 1024 * 1024) -> bytes:
    """Read a blocking (plain or TLS) socket to its end; fail past `limit` bytes."""
    out = bytearray()
    while True:
        chunk = sock.recv(256 * 1024)
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > limit:
            raise AssertionError(f"more than {limit} bytes before EOF")


@implementer(IHalfCloseableProtocol)
class SpeakThenHalfClose(Protocol):
    """Sends `greeting`, shuts its write side at once, then reads until the peer's EOF.

    `done` fires with (whether EOF came, the bytes received) when the connection ends.
    """

    def __init__(self, greeting: bytes, done: Deferred) -> None:
        self.greeting = greeting
        self.done = done
        self.received = bytearray()
        self.eof = False

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if not self.done.called:
            self.done.callback((self.eof, bytes(self.received)))


# -- a real twistd, watched from outside --------------------------------------


@pytest.fixture
def twistd_server(tmp_path):
    """Start `twistd socks4 ARGS` (`TwistdServer`); stops each at teardown, and
    fails the test if a server's log shows a traceback or an unhandled failure
    (a Deferred garbage-collected with an error nobody handled)."""
    from .twistd_server import TwistdServer

    started: list[TwistdServer] = []

    def start(*args: str, **kwargs: Any) -> TwistdServer:
        server = TwistdServer(tmp_path, args, **kwargs)
        started.append(server)
        return server

    yield start
    poisoned = []
    for server in started:
        server.stop()
        poisoned += server.poison()
    assert not poisoned, "the server's log shows failures:\n" + "\n".join(poisoned)
