"""CONNECT through the real server over real loopback sockets, with real clients.

The proxy runs in-process on the reactor pytest-twisted drives (except the
twistd tests, which spawn the real command); blocking clients run in threads
or subprocesses, and every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads, utils
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident.policy import DefaultPolicy, IPolicy
from socksident.socks4 import (
    HTTP_NOT_A_WEB_PROXY,
    SOCKS5_NO_ACCEPTABLE_METHODS,
    Command,
    ReplyCode,
    build_reply,
    build_request,
    parse_reply,
)

from .conftest import (
    LOOPBACK,
    SpeakThenHalfClose,
    bounded,
    executable,
    recv_exactly,
    recv_until_eof,
    skip_unless_strict,
    unused_port,
    wait_until,
)

MiB = 1024 * 1024
CLIENT_TIMEOUT = 20.0  # per blocking socket operation in client threads


# -- blocking SOCKS4 client helpers (run them in a thread) --------------------


def socks4_connect(
    proxy_port: int,
    dest_port: int,
    dest_ip: str = LOOPBACK,
    user: str = "",
    hostname: Optional[str] = None,
    early: bytes = b"",
) -> tuple[socket.socket, tuple[int, int, str]]:
    """Open a connection through the proxy; returns the socket and the parsed reply.

    `early` is sent in the same write as the request, before any reply.
    """
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=CLIENT_TIMEOUT)
    sock.sendall(build_request(Command.CONNECT, dest_port, dest_ip, user, hostname) + early)
    reply = parse_reply(recv_exactly(sock, 8))
    return sock, reply


def in_thread(function: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Deferred:
    return bounded(threads.deferToThread(function, *args), timeout)


def access_for(log_capture, port: int) -> list[dict[str, Any]]:
    return [e for e in log_capture.access if e["port"] == port]


# -- destination servers used by single tests ---------------------------------


@implementer(IHalfCloseableProtocol)
class AnswerAfterEOF(Protocol):
    """Reads until EOF, then sends `answer` and closes."""

    def __init__(self, answer: bytes, got: Deferred) -> None:
        self.answer = answer
        self.got = got
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.got.callback(bytes(self.received))
        self.transport.write(self.answer)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class HashUntilEOF(Protocol):
    """Hashes everything until EOF, answers b"<count> <sha256hex>" and closes."""

    def __init__(self, done: Deferred) -> None:
        self.done = done
        self.sha = hashlib.sha256()
        self.count = 0
        self.first = b""

    def dataReceived(self, data: bytes) -> None:
        if len(self.first) < 64:
            self.first += data[: 64 - len(self.first)]
        self.count += len(data)
        self.sha.update(data)

    def readConnectionLost(self) -> None:
        self.done.callback((self.count, self.sha.hexdigest(), self.first))
        self.transport.write(b"%d %s" % (self.count, self.sha.hexdigest().encode()))
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class SendThenClose(Protocol):
    """Streams `payload` with a pull producer (no 50 MiB write buffer), then closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def connectionMade(self) -> None:
        sender = FileSender()
        sender.CHUNK_SIZE = 256 * 1024
        sender.beginFileTransfer(io.BytesIO(self.payload), self.transport).addCallback(
            lambda _: self.transport.loseConnection()
        )


def one_shot_factory(build: Callable[[], Protocol]) -> Factory:
    factory = Factory()
    factory.buildProtocol = lambda addr: build()  # type: ignore[method-assign]
    factory.noisy = False
    return factory


# -- 1. curl ------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }


async def _curl(*args: str) -> tuple[bytes, bytes, int]:
    curl = executable("curl")
    if curl is None:
        skip_unless_strict("curl is not installed (`make test` installs it)")
    return await bounded(
        utils.getProcessOutputAndValue(
            curl, ("--silent", "--show-error", "--max-time", "15") + args, env=_clean_env()
        ),
        30,
    )


@pytest_twisted.ensureDeferred
async def test_curl_socks4(proxy, http_server, log_capture):
    out, err, code = await _curl("--socks4", proxy.url, http_server.url())
    assert (code, err) == (0, b"")
    assert out == http_server.body
    [event] = await log_capture.wait_for_access(1)
    assert event["code"] == ReplyCode.GRANTED
    assert (event["command"], event["destination"], event["port"]) == (
        "CONNECT", LOOPBACK, http_server.port,
    )
    assert event["user"] == ""


@pytest_twisted.ensureDeferred
async def test_curl_socks4a_with_user(proxy, http_server, log_capture):
    out, err, code = await _curl(
        "-x", f"socks4a://alice@{proxy.url}", http_server.url("localhost", "/index")
    )
    assert (code, err) == (0, b"")
    assert out == http_server.body
    [event] = await log_capture.wait_for_access(1)
    assert event["code"] == ReplyCode.GRANTED
    # 4A: the proxy got the name, resolved it itself, and says where it went.
    assert (event["destination"], event["address"]) == ("localhost", LOOPBACK)
    assert event["user"] == "alice"
    assert event["bytes_down"] > len(http_server.body)


@pytest_twisted.ensureDeferred
async def test_curl_reports_refusal(proxy, unused_tcp_port, log_capture):
    out, err, code = await _curl("--socks4", proxy.url, f"http://{LOOPBACK}:{unused_tcp_port}/")
    assert code == 97, err  # CURLE_PROXY: the proxy handshake failed
    assert out == b""
    [event] = await log_capture.wait_for_access(1)
    assert event["code"] == ReplyCode.REJECTED


# -- 2. PySocks and python-socks ------------------------------------------------


def _pysocks_echo(proxy_port: int, host: str, port: int, rdns: bool, payload: bytes) -> bytes:
    import socks

    s = socks.socksocket()
    s.settimeout(CLIENT_TIMEOUT)
    s.set_proxy(socks.SOCKS4, LOOPBACK, proxy_port, rdns=rdns, username="bob")
    try:
        s.connect((host, port))
        s.sendall(payload)
        return recv_exactly(s, len(payload))
    finally:
        s.close()


def _python_socks_echo(url: str, host: str, port: int, rdns: bool, payload: bytes) -> bytes:
    from python_socks.sync import Proxy

    s = Proxy.from_url(url, rdns=rdns).connect(dest_host=host, dest_port=port, timeout=CLIENT_TIMEOUT)
    try:
        s.settimeout(CLIENT_TIMEOUT)
        s.sendall(payload)
        return recv_exactly(s, len(payload))
    finally:
        s.close()


@pytest.mark.parametrize(
    "library, rdns, host, socks4a",
    [
        ("pysocks", False, LOOPBACK, False),
        ("pysocks", True, "localhost", True),
        ("python-socks", False, LOOPBACK, False),
        ("python-socks", True, "localhost", True),
    ],
)
@pytest_twisted.ensureDeferred
async def test_client_libraries(proxy, echo_server, log_capture, library, rdns, host, socks4a):
    payload = f"{library} rdns={rdns} ".encode() + os.urandom(3000)
    if library == "pysocks":
        echoed = await in_thread(_pysocks_echo, proxy.port, host, echo_server.port, rdns, payload)
        user = "bob"
    else:
        # python-socks 3.x drops the user name of a URL without a password
        # (unquote(None) fails and both become ""), hence the empty password.
        url = f"socks4://carol:@{proxy.url}"
        echoed = await in_thread(_python_socks_echo, url, host, echo_server.port, rdns, payload)
        user = "carol"
    assert echoed == payload
    [event] = await log_capture.wait_for_access(1)
    assert event["code"] == ReplyCode.GRANTED
    assert event["user"] == user
    assert event["destination"] == host
    assert event["address"] == LOOPBACK
    assert (event["destination"] != event["address"]) is socks4a  # 4A sent the name
    assert (event["bytes_up"], event["bytes_down"]) == (len(payload), len(payload))
    assert echo_server.connections[0].received == payload
    await echo_server.wait_all_closed()


# -- 3. 50 MiB both ways --------------------------------------------------------

BIG = 50 * MiB


@pytest.fixture(scope="module")
def big_payload() -> bytes:
    return random.Random(0x50C4).randbytes(BIG)


def _upload(proxy_port: int, dest_port: int, payload: bytes) -> tuple[tuple, bytes]:
    sock, reply = socks4_connect(proxy_port, dest_port)
    with sock:
        assert reply[0] == ReplyCode.GRANTED
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return reply, recv_until_eof(sock)


def _download(proxy_port: int, dest_port: int) -> tuple[int, str]:
    sock, reply = socks4_connect(proxy_port, dest_port)
    with sock:
        assert reply[0] == ReplyCode.GRANTED
        sha, count = hashlib.sha256(), 0
        buffer = bytearray(256 * 1024)
        view = memoryview(buffer)
        while True:
            n = sock.recv_into(buffer)
            if not n:
                return count, sha.hexdigest()
            sha.update(view[:n])
            count += n


@pytest_twisted.ensureDeferred
async def test_50_mib_client_to_destination(proxy, listen_tcp, log_capture, big_payload):
    done: Deferred = Deferred()
    dest_port = listen_tcp(one_shot_factory(lambda: HashUntilEOF(done)))
    reply, answer = await in_thread(_upload, proxy.port, dest_port, big_payload)
    expected = hashlib.sha256(big_payload).hexdigest()
    count, digest, first = await bounded(done, 10)
    assert (count, digest) == (BIG, expected)
    assert first == big_payload[:64]
    assert answer == b"%d %s" % (BIG, expected.encode())
    assert reply[1] == dest_port  # the reply names the connection it made
    [event] = await log_capture.wait_for_access(1)
    assert event["code"] == ReplyCode.GRANTED
    assert (event["bytes_up"], event["bytes_down"]) == (BIG, len(answer))
    assert not proxy.factory.open_connects


@pytest_twisted.ensureDeferred
async def test_50_mib_destination_to_client(proxy, listen_tcp, log_capture, big_payload):
    dest_port = listen_tcp(one_shot_factory(lambda: SendThenClose(big_payload)))
    count, digest = await in_thread(_download, proxy.port, dest_port)
    assert (count, digest) == (BIG, hashlib.sha256(big_payload).hexdigest())
    [event] = await log_capture.wait_for_access(1)
    assert event["code"] == ReplyCode.GRANTED
    assert (event["bytes_up"], event["bytes_down"]) == (0, BIG)
    assert not proxy.factory.open_connects


# -- 4. 200 concurrent connections ------------------------------------------------


class SocksEchoClient(Protocol):
    """Speaks SOCKS4 CONNECT, sends its payload, closes once the echo is complete."""

    def __init__(self, request: bytes, payload: bytes) -> None:
        self.request = request
        self.payload = payload
        self.buffer = bytearray()
        self.reply: Optional[tuple[int, int, str]] = None
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.reply is None and len(self.buffer) >= 8:
            self.reply = parse_reply(bytes(self.buffer[:8]))
            del self.buffer[:8]
            if self.reply[0] != ReplyCode.GRANTED:
                self.transport.loseConnection()
                return
            self.transport.write(self.payload)
        if self.reply is not None and len(self.buffer) >= len(self.payload):
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.done.callback((self.reply, bytes(self.buffer)))


@pytest_twisted.ensureDeferred
async def test_200_concurrent_connections(proxy, echo_server, log_capture):
    count = 200
    rng = random.Random(200)
    payloads = [
        b"connection %03d|" % i + rng.randbytes(rng.randrange(1, 20000)) for i in range(count)
    ]
    clients = [
        SocksEchoClient(
            build_request(Command.CONNECT, echo_server.port, LOOPBACK, f"user{i}"), payload
        )
        for i, payload in enumerate(payloads)
    ]
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, proxy.port, timeout=10)
    await bounded(gatherResults([connectProtocol(endpoint, c) for c in clients]), 20)
    results = await bounded(gatherResults([c.done for c in clients]), 30)
    for i, (reply, echoed) in enumerate(results):
        assert reply is not None and reply[0] == ReplyCode.GRANTED, i
        assert echoed == payloads[i], i

    events = await log_capture.wait_for_access(count)
    assert len(events) == count
    by_user = {e["user"]: e for e in events}
    assert len(by_user) == count
    for i, payload in enumerate(payloads):
        event = by_user[f"user{i}"]
        assert event["code"] == ReplyCode.GRANTED
        assert (event["bytes_up"], event["bytes_down"]) == (len(payload), len(payload))

    await echo_server.wait_all_closed()
    assert len(echo_server.connections) == count
    assert sorted(bytes(c.received) for c in echo_server.connections) == sorted(payloads)
    assert not proxy.factory.open_connects


# -- 5. half-close ----------------------------------------------------------------


def _ask_then_shut(proxy_port: int, dest_port: int, question: bytes) -> bytes:
    sock, reply = socks4_connect(proxy_port, dest_port)
    with sock:
        assert reply[0] == ReplyCode.GRANTED
        sock.sendall(question)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


@pytest_twisted.ensureDeferred
async def test_client_half_closes_first(proxy, listen_tcp, log_capture):
    question = b"question: " + os.urandom(100_000)
    answer = b"answer after your EOF: " + os.urandom(1_000_000)
    got: Deferred = Deferred()
    dest_port = listen_tcp(one_shot_factory(lambda: AnswerAfterEOF(answer, got)))
    received = await in_thread(_ask_then_shut, proxy.port, dest_port, question)
    assert await bounded(got, 5) == question  # all of it, then EOF
    assert received == answer
    [event] = await log_capture.wait_for_access(1)
    assert (event["code"], event["bytes_up"], event["bytes_down"]) == (
        ReplyCode.GRANTED, len(question), len(answer),
    )
    assert not proxy.factory.open_connects


def _listen_then_answer(proxy_port: int, dest_port: int, answer: bytes) -> tuple[bytes, bytes]:
    sock, reply = socks4_connect(proxy_port, dest_port)
    with sock:
        assert reply[0] == ReplyCode.GRANTED
        greeting = recv_until_eof(sock)  # the destination's FIN reached us...
        sock.sendall(answer)  # ...and our direction is still open
        sock.shutdown(socket.SHUT_WR)
        return greeting, recv_until_eof(sock)


@pytest_twisted.ensureDeferred
async def test_destination_half_closes_first(proxy, listen_tcp, log_capture):
    greeting = b"greeting, then FIN: " + os.urandom(1_000_000)
    answer = b"answer after the FIN: " + os.urandom(100_000)
    got: Deferred = Deferred()
    dest_port = listen_tcp(one_shot_factory(lambda: SpeakThenHalfClose(greeting, got)))
    received, after = await in_thread(_listen_then_answer, proxy.port, dest_port, answer)
    assert received == greeting
    assert after == b""
    assert await bounded(got, 5) == (True, answer)
    [event] = await log_capture.wait_for_access(1)
    assert (event["code"], event["bytes_up"], event["bytes_down"]) == (
        ReplyCode.GRANTED, len(answer), len(greeting),
    )
    assert not proxy.factory.open_connects


# -- 6. early data ------------------------------------------------------------------


def _early_echo(proxy_port: int, dest_port: int, early: bytes) -> tuple[tuple, bytes]:
    sock, reply = socks4_connect(proxy_port, dest_port, early=early)
    with sock:
        if reply[0] != ReplyCode.GRANTED:
            return reply, b""
        return reply, recv_exactly(sock, len(early))


@pytest_twisted.ensureDeferred
async def test_early_data_reaches_destination_in_order(proxy, echo_server, log_capture):
    early = b"sent with the request, before the reply|" + bytes(range(256))
    reply, echoed = await in_thread(_early_echo, proxy.port, echo_server.port, early)
    assert reply[0] == ReplyCode.GRANTED
    assert echoed == early
    assert echo_server.connections[0].received == early
    [event] = await log_capture.wait_for_access(1)
    assert event["bytes_up"] == len(early)


def _early_then_shut(proxy_port: int, dest_port: int, early: bytes) -> tuple[tuple, bytes]:
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=CLIENT_TIMEOUT)
    with sock:
        sock.sendall(build_request(Command.CONNECT, dest_port, LOOPBACK, "early") + early)
        sock.shutdown(socket.SHUT_WR)  # FIN before the reply was even sent
        data = recv_until_eof(sock)
        return parse_reply(data[:8]), data[8:]


@implementer(IPolicy)
class SlowPolicy:
    """The default policy, decided `delay` seconds late (as an ident query would be)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.inner = DefaultPolicy()

    def check(self, request, context):
        return task.deferLater(reactor, self.delay, self.inner.check, request, context)


@pytest.mark.parametrize(
    "size, decision_delay",
    [(1000, 0.2), (3 * MiB, 0.0)],
    ids=["fin-while-policy-decides", "beyond-early-data-limit"],
)
@pytest_twisted.ensureDeferred
async def test_early_data_then_eof(start_proxy, listen_tcp, log_capture, size, decision_delay):
    # fin-while-policy-decides: the request, its data and the FIN all arrive
    # before the policy answers; data and FIN must both be delivered after the
    # connect.  beyond-early-data-limit: far more than early_data_limit (64 KiB):
    # the server must pause reading, not drop or reorder, then pass the FIN.
    proxy = start_proxy(SlowPolicy(decision_delay))
    early = random.Random(size).randbytes(size)
    done: Deferred = Deferred()
    dest_port = listen_tcp(one_shot_factory(lambda: HashUntilEOF(done)))
    reply, answer = await in_thread(_early_then_shut, proxy.port, dest_port, early)
    assert reply[0] == ReplyCode.GRANTED
    count, digest, first = await bounded(done, 5)
    assert (count, digest) == (len(early), hashlib.sha256(early).hexdigest())
    assert first == early[:64]
    assert answer == b"%d %s" % (len(early), digest.encode())
    [event] = await log_capture.wait_for_access(1)
    assert (event["bytes_up"], event["bytes_down"]) == (len(early), len(answer))
    assert not proxy.factory.open_connects


# -- 7. refusals --------------------------------------------------------------------


def _request_and_read_all(proxy_port: int, request: bytes) -> bytes:
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=CLIENT_TIMEOUT)
    with sock:
        sock.sendall(request)
        return recv_until_eof(sock)


@pytest_twisted.ensureDeferred
async def test_closed_port_is_refused_with_91(proxy, unused_tcp_port, log_capture):
    request = build_request(Command.CONNECT, unused_tcp_port, LOOPBACK, "dave")
    answer = await in_thread(_request_and_read_all, proxy.port, request)
    assert answer == build_reply(ReplyCode.REJECTED)  # 8 bytes, then the close
    [event] = await log_capture.wait_for_access(1)
    assert event["code"] == ReplyCode.REJECTED
    assert event["reason"].startswith("connect failed")
    assert not proxy.factory.open_connects


def _reply_only(proxy_port: int, request: bytes) -> tuple[int, int, str]:
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=CLIENT_TIMEOUT)
    with sock:
        sock.sendall(request)
        return parse_reply(recv_exactly(sock, 8))


@pytest.mark.parametrize(
    "first_bytes, expected",
    [
        (b"\x05\x01\x00", SOCKS5_NO_ACCEPTABLE_METHODS),
        (b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", HTTP_NOT_A_WEB_PROXY),
    ],
    ids=["socks5-greeting", "http-get"],
)
@pytest_twisted.ensureDeferred
async def test_not_socks4_then_next_client_is_served(
    proxy, echo_server, log_capture, first_bytes, expected
):
    answer = await in_thread(_request_and_read_all, proxy.port, first_bytes)
    assert answer == expected
    if expected is HTTP_NOT_A_WEB_PROXY:
        assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    else:
        assert answer == b"\x05\xff"
    # not a SOCKS4 request: no reply code, and still its one access record
    [record] = log_capture.access
    assert record["code"] is None and record["replies"] == []
    assert record["reason"].startswith("sent ") and record["command"] is None
    payload = b"the next client " + os.urandom(1000)
    reply, echoed = await in_thread(_early_echo, proxy.port, echo_server.port, payload)
    assert reply[0] == ReplyCode.GRANTED
    assert echoed == payload
    [_, event] = await log_capture.wait_for_access(2)
    assert (event["code"], event["bytes_up"]) == (ReplyCode.GRANTED, len(payload))


# -- 8. twistd end to end -----------------------------------------------------------


def _twistd() -> str:
    path = Path(sys.executable).with_name("twistd")
    if not path.exists():
        skip_unless_strict(f"no twistd next to {sys.executable}")
    return str(path)


class Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback([reason])  # in a list: a bare Failure would errback


async def _wait_accepting(port: int, process: Collect, timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=1)
    while True:
        if process.ended.called:
            raise AssertionError(f"twistd exited early:\n{process.out.decode()}{process.err.decode()}")
        try:
            protocol = await connectProtocol(endpoint, Protocol())
        except ConnectError:
            if reactor.seconds() > deadline:
                raise AssertionError(f"twistd did not listen on {port} within {timeout:g} s")
            await task.deferLater(reactor, 0.05, lambda: None)
            continue
        protocol.transport.loseConnection()
        return


@pytest_twisted.ensureDeferred
async def test_twistd_end_to_end(http_server, tmp_path):
    twistd = _twistd()
    if executable("curl") is None:
        skip_unless_strict("curl is not installed (`make test` installs it)")
    port = unused_port()
    process = Collect()
    transport = reactor.spawnProcess(
        process,
        twistd,
        [twistd, "-n", "--pidfile=", "socks4", "--port", f"tcp:{port}:interface={LOOPBACK}"],
        env=_clean_env(),
        path=str(tmp_path),
    )
    try:
        await _wait_accepting(port, process)
        out, err, code = await _curl(
            "-x", f"socks4a://gina@{LOOPBACK}:{port}", http_server.url("localhost")
        )
        assert (code, err) == (0, b"")
        assert out == http_server.body
        def served() -> list[bytes]:
            # The readiness probe above is a client too: its line says it
            # sent no request.
            return [
                x for x in process.out.splitlines()
                if b"socksident.access" in x and b"(no valid request)" not in x
            ]

        await wait_until(lambda: served() != [], 10, "the access-log line on stdout")
        [line] = served()
        assert b" user='gina' " in line
        assert b" CONNECT localhost:%d [127.0.0.1] -> 90 " % http_server.port in line
    finally:
        if not process.ended.called:
            transport.signalProcess("TERM")
        try:
            [reason] = await bounded(process.ended, 10)
        except Exception:
            if not process.ended.called:
                transport.signalProcess("KILL")
            raise
    # twistd stops cleanly on SIGTERM, then re-raises the signal so its exit
    # status says why it stopped.
    output = process.out.decode() + process.err.decode()
    assert b"Received SIGTERM, shutting down." in process.out, output
    assert b"Server Shut Down." in process.out, output
    assert reason.check(ProcessDone) or (
        reason.check(ProcessTerminated) and reason.value.signal == signal.SIGTERM
    ), (reason, output)
    assert b"Traceback" not in process.out + process.err, output


@pytest.mark.parametrize(
    "option, value",
    [("--bind-ports", "10-5"), ("--connect-timeout", "abc")],
)
@pytest_twisted.ensureDeferred
async def test_twistd_rejects_bad_option(option, value, tmp_path):
    twistd = _twistd()
    out, err, code = await bounded(
        utils.getProcessOutputAndValue(
            twistd,
            ["-n", "--pidfile=", "socks4", "--port", f"tcp:{unused_port()}", option, value],
            env=_clean_env(),
            path=str(tmp_path),
        ),
        30,
    )
    assert code != 0
    text = (out + err).decode()
    assert f"{option} " in text and repr(value) in text, text
    assert "Traceback" not in text
