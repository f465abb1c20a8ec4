"""The outgoing side on real sockets: a black-holed first address, and --source-address."""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable

import pytest_twisted
from twisted.internet import threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver
from zope.interface import implementer

from socksident.settings import ServerSettings

from .conftest import EchoServer, bounded, recv_exactly


@implementer(IHostnameResolver)
class FixedResolver:
    """Every name resolves to `addresses`, in this order."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return receiver


def connect_and_echo(proxy_port: int, port: int, name: str = "", ip: str = "0.0.0.1") -> bytes:
    """A SOCKS4(A) CONNECT, then one echoed message; the reply and the echo."""
    request = struct.pack("!BBH4s", 4, 1, port, socket.inet_aton(ip)) + b"race\x00"
    if name:
        request += name.encode() + b"\x00"
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=60) as sock:
        sock.sendall(request)
        reply = recv_exactly(sock, 8)
        if reply[1] != 90:
            return reply
        sock.sendall(b"ping")
        return reply + recv_exactly(sock, 4)


def black_hole(port: int) -> list[socket.socket]:
    """A listener on 127.0.0.2:`port` whose accept queue is full: Linux drops
    further SYNs, so a connect to it never answers (until its own timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.2", port))
    listener.listen(0)
    queued = socket.create_connection(("127.0.0.2", port), timeout=5)  # fills the queue
    waiting = socket.socket()
    waiting.setblocking(False)
    waiting.connect_ex(("127.0.0.2", port))  # its SYN is dropped
    return [listener, queued, waiting]


@pytest_twisted.ensureDeferred
async def test_a_black_holed_first_address_does_not_hold_up_the_next(
    start_proxy: Callable[..., Any], listen_tcp: Callable[..., int], log_capture: Any
) -> None:
    echo = EchoServer()
    port = listen_tcp(echo)
    sockets = black_hole(port)
    try:
        # Tried one after another, the first address would use up all 20 s: a 91.
        proxy = start_proxy(
            settings=ServerSettings(connect_timeout=20),
            resolver=FixedResolver("127.0.0.2", "127.0.0.1"),
        )
        answer = await bounded(threads.deferToThread(
            connect_and_echo, proxy.port, port, "dual.example"), 60)
        assert answer[1] == 90 and answer[8:] == b"ping"
        await log_capture.wait_for_access(1)
        [event] = [e for e in log_capture.access if e["destination"] == "dual.example"]
        assert event["address"] == "127.0.0.1" and event["code"] == 90
        await echo.wait_all_closed()
    finally:
        for sock in sockets:
            sock.close()


@pytest_twisted.ensureDeferred
async def test_connects_leave_from_the_source_address(
    start_proxy: Callable[..., Any], echo_server: EchoServer, log_capture: Any
) -> None:
    proxy = start_proxy(settings=ServerSettings(source_addresses=("127.0.0.2",)))
    answer = await bounded(threads.deferToThread(
        connect_and_echo, proxy.port, echo_server.port, ip="127.0.0.1"))
    assert answer[1] == 90 and answer[8:] == b"ping"
    [connection] = echo_server.connections
    assert connection.transport.getPeer().host == "127.0.0.2"


@pytest_twisted.ensureDeferred
async def test_a_destination_of_another_family_than_the_source_gets_91(
    start_proxy: Callable[..., Any], log_capture: Any
) -> None:
    proxy = start_proxy(
        settings=ServerSettings(source_addresses=("127.0.0.2",)),
        resolver=FixedResolver("::1"),
    )
    answer = await bounded(threads.deferToThread(connect_and_echo, proxy.port, 9, "v6.example"))
    assert answer[1] == 91
    await log_capture.wait_for_access(1)
    [event] = [e for e in log_capture.access if e["destination"] == "v6.example"]
    assert event["reason"] == "connect failed: ::1: no IPv6 --source-address to leave from"
