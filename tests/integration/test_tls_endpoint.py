"""The README's claim that ``--port`` takes any server endpoint, checked for ``ssl:``.

The proxy listens with `serverFromString(reactor, "ssl:0:...")` on a throwaway
self-signed certificate made in `tmp_path`; a client thread speaks SOCKS4 over
Python's `ssl` module, verifying the proxy against that certificate.  Clients
use ``suppress_ragged_eofs=False``, so a bare TCP FIN where TLS owes a
close_notify is an error, not an EOF.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.protocol import Factory, Protocol

from socksident.server import SOCKS4Server, SOCKS4ServerFactory
from socksident.socks4 import Command, ReplyCode, build_request, parse_reply

from .conftest import (
    LOOPBACK,
    SpeakThenHalfClose,
    bounded,
    recv_exactly,
    recv_until_eof,
    wait_until,
)

# Twisted's ssl: endpoint hands pyOpenSSL objects to pyOpenSSL; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning"
)

MiB = 1024 * 1024
CLIENT_TIMEOUT = 5.0  # per blocking socket operation in the client threads


# -- a throwaway certificate ----------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1, valid for a day; (key, cert)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "socksident test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


# -- the proxy on an ssl: endpoint ----------------------------------------------


class TLSProxy:
    def __init__(self, factory: SOCKS4ServerFactory, port: int, cert: Path) -> None:
        self.factory = factory
        self.port = port
        self.cert = cert


@pytest_twisted.async_yield_fixture
async def tls_proxy(certificate):
    key_path, cert_path = certificate
    description = "ssl:0:interface={}:privateKey={}:certKey={}".format(
        quoteStringArgument(LOOPBACK),
        quoteStringArgument(str(key_path)),
        quoteStringArgument(str(cert_path)),
    )
    factory = SOCKS4ServerFactory()
    factory.noisy = False
    listening = await bounded(serverFromString(reactor, description).listen(factory), 5)
    yield TLSProxy(factory, int(listening.getHost().port), cert_path)
    await listening.stopListening()


# -- blocking TLS client helpers (run them in a thread) -------------------------


def tls_connect(proxy: TLSProxy) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(proxy.cert))  # verifies 127.0.0.1
    raw = socket.create_connection((LOOPBACK, proxy.port), timeout=CLIENT_TIMEOUT)
    return context.wrap_socket(raw, server_hostname=LOOPBACK, suppress_ragged_eofs=False)


def socks4_connect(proxy: TLSProxy, dest_port: int) -> tuple[ssl.SSLSocket, tuple[int, int, str]]:
    sock = tls_connect(proxy)
    sock.sendall(build_request(Command.CONNECT, dest_port, LOOPBACK, "tls"))
    return sock, parse_reply(recv_exactly(sock, 8))


def in_thread(function: Callable[..., Any], *args: Any, timeout: float = 8.0) -> Deferred:
    return bounded(threads.deferToThread(function, *args), timeout)


# -- CONNECT over TLS -----------------------------------------------------------


def _echo_then_close(
    proxy: TLSProxy, dest_port: int, payload: bytes, close_notify: bool
) -> tuple[tuple[int, int, str], bytes]:
    sock, reply = socks4_connect(proxy, dest_port)
    try:
        if reply[0] != ReplyCode.GRANTED:
            return reply, b""
        echoed = bytearray()
        chunk = 64 * 1024  # one chunk in flight: the echo never waits on our reading
        for start in range(0, len(payload), chunk):
            piece = payload[start : start + chunk]
            sock.sendall(piece)
            echoed += recv_exactly(sock, len(piece))
        if close_notify:
            sock = sock.unwrap()  # our close_notify out, the proxy's back
        return reply, bytes(echoed)
    finally:
        sock.close()


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "bare-close"])
@pytest_twisted.ensureDeferred
async def test_connect_echo_1_mib_then_client_closes(
    tls_proxy, echo_server, log_capture, close_notify
):
    payload = os.urandom(MiB)
    reply, echoed = await in_thread(
        _echo_then_close, tls_proxy, echo_server.port, payload, close_notify
    )
    assert reply == (ReplyCode.GRANTED, echo_server.port, LOOPBACK)
    assert echoed == payload
    # the client's close reaches the destination as a close...
    await echo_server.wait_all_closed(timeout=5)
    [destination] = echo_server.connections
    assert bytes(destination.received) == payload
    # ...and the request ends in exactly one access event with the right counts
    await log_capture.wait_for_access(1, timeout=5)
    await task.deferLater(reactor, 0.05, lambda: None)  # room for a duplicate event
    [event] = log_capture.access
    assert (event["code"], event["bytes_up"], event["bytes_down"]) == (
        ReplyCode.GRANTED, MiB, MiB,
    )
    assert event["destination"] == LOOPBACK and event["port"] == echo_server.port
    assert not tls_proxy.factory.open_connects


def _refused(proxy: TLSProxy, dest_port: int) -> bytes:
    sock = tls_connect(proxy)
    with sock:
        sock.sendall(build_request(Command.CONNECT, dest_port, LOOPBACK, "tls"))
        return recv_until_eof(sock)  # a clean TLS EOF, or SSLEOFError


@pytest_twisted.ensureDeferred
async def test_refused_connect_gets_8_byte_91(tls_proxy, unused_tcp_port, log_capture):
    answer = await in_thread(_refused, tls_proxy, unused_tcp_port)
    assert len(answer) == 8
    assert parse_reply(answer)[0] == ReplyCode.REJECTED
    [event] = await log_capture.wait_for_access(1, timeout=5)
    assert (event["code"], event["bytes_up"], event["bytes_down"]) == (
        ReplyCode.REJECTED, 0, 0,
    )
    assert "connect failed" in event["reason"]


# -- the destination closes first ------------------------------------------------


def _listen_then_answer(proxy: TLSProxy, dest_port: int, answer: bytes) -> bytes:
    sock, reply = socks4_connect(proxy, dest_port)
    try:
        assert reply[0] == ReplyCode.GRANTED
        greeting = recv_until_eof(sock)  # the destination's FIN, as close_notify...
        sock.sendall(answer)  # ...and our direction is still open (TLS 1.3 half-close)
        sock = sock.unwrap()
        return greeting
    finally:
        sock.close()


@pytest.mark.parametrize("size", [100, MiB], ids=["100B", "1MiB"])
@pytest_twisted.ensureDeferred
async def test_destination_half_close_reaches_client_as_close_notify(
    tls_proxy, listen_tcp, log_capture, size
):
    """Over plain TCP the destination's FIN becomes a FIN to the client; over
    TLS a FIN under the TLS layer is a truncation (SSLEOFError), leaves the
    client unable to send, and made Twisted log an AttributeError traceback."""
    greeting = os.urandom(size)
    answer = b"answer after the FIN: " + os.urandom(100_000)
    done: Deferred = Deferred()
    factory = Factory.forProtocol(lambda: SpeakThenHalfClose(greeting, done))
    factory.noisy = False
    dest_port = listen_tcp(factory)
    received = await in_thread(_listen_then_answer, tls_proxy, dest_port, answer)
    assert received == greeting
    assert await bounded(done, 5) == (True, answer)
    [event] = await log_capture.wait_for_access(1, timeout=5)
    assert (event["code"], event["bytes_up"], event["bytes_down"]) == (
        ReplyCode.GRANTED, len(answer), size,
    )
    assert not tls_proxy.factory.open_connects


# -- flow control ------------------------------------------------------------------


class Blast(Protocol):
    """Writes `payload` at once (the destination buffers it, not the proxy), then closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseConnection()


def _read_later(proxy: TLSProxy, dest_port: int, go: threading.Event) -> bytes:
    sock, reply = socks4_connect(proxy, dest_port)
    try:
        assert reply[0] == ReplyCode.GRANTED
        if not go.wait(CLIENT_TIMEOUT):
            raise AssertionError("the test never let the client read")
        return recv_until_eof(sock, limit=64 * MiB)
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_client_not_reading_pauses_the_destination(
    tls_proxy, listen_tcp, log_capture
):
    size = 32 * MiB
    payload = os.urandom(size)
    factory = Factory.forProtocol(lambda: Blast(payload))
    factory.noisy = False
    dest_port = listen_tcp(factory)
    built: list[SOCKS4Server] = []
    original_build = tls_proxy.factory.buildProtocol

    def build(addr: Any) -> SOCKS4Server:
        built.append(original_build(addr))
        return built[-1]

    tls_proxy.factory.buildProtocol = build  # to reach the relay's counters
    go = threading.Event()
    reading = in_thread(_read_later, tls_proxy, dest_port, go)
    try:
        await wait_until(lambda: bool(built) and built[0].relay is not None, 5, "the relay")
        relay = built[0].relay
        # the client reads nothing: what the proxy takes from the destination
        # levels off at what the socket buffers hold, far below the payload
        previous, deadline = -1, reactor.seconds() + 5
        while relay.bytes_down != previous and reactor.seconds() < deadline:
            previous = relay.bytes_down
            await task.deferLater(reactor, 0.2, lambda: None)
        assert relay.bytes_down == previous, "the proxy kept reading for 5 s"
        assert relay.bytes_down < size // 2  # about 3 MiB on Linux loopback
    except BaseException:
        go.set()
        reading.addErrback(lambda _: None)  # the assertion above is the news
        raise
    go.set()
    received = await reading
    assert received == payload
    [event] = await log_capture.wait_for_access(1, timeout=5)
    assert (event["code"], event["bytes_up"], event["bytes_down"]) == (
        ReplyCode.GRANTED, 0, size,
    )
