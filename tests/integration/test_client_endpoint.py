"""The SOCKS4 client endpoint over real sockets: through our own server, through
Twisted's `twistd socks` (SOCKS4A) and through Dante (SOCKS4 by address)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol

from socksident.client import SOCKS4ClientEndpoint
from socksident.socks4 import RequestRejectedOrFailed
from tests.integration.conftest import (
    LOOPBACK,
    SpeakThenHalfClose,
    bounded,
    executable,
    skip_unless_strict,
    unused_port,
    wait_until,
)

TWISTD = Path(sys.executable).parent / "twistd"


def accepts(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except OSError:
        return False
    return True


async def half_close_round_trip(description: str) -> tuple[bool, bytes]:
    """Send a greeting through the endpoint, shut our write half, read to EOF."""
    done: Deferred[tuple[bool, bytes]] = Deferred()
    endpoint = clientFromString(reactor, description)
    await bounded(endpoint.connect(Factory.forProtocol(lambda: SpeakThenHalfClose(b"hello", done))))
    return await bounded(done)


@pytest_twisted.ensureDeferred
async def test_through_our_server_by_endpoint_string_with_half_close(proxy, echo_server):
    eof, received = await half_close_round_trip(
        rf"socks4:host={LOOPBACK}:port={echo_server.port}:proxy=tcp\:{LOOPBACK}\:{proxy.port}"
        ":user=alice"
    )
    assert (eof, received) == (True, b"hello")
    assert echo_server.connections[0].received == b"hello"


@pytest_twisted.ensureDeferred
async def test_by_name_through_our_server(proxy, echo_server):
    eof, received = await half_close_round_trip(
        rf"socks4:localhost:{echo_server.port}:proxy=tcp\:{LOOPBACK}\:{proxy.port}"
    )
    assert received == b"hello"


@pytest_twisted.ensureDeferred
async def test_a_refusal_from_our_server(start_proxy, unused_tcp_port):
    running = start_proxy()
    endpoint = clientFromString(
        reactor, rf"socks4:{LOOPBACK}:{unused_tcp_port}:proxy=tcp\:{LOOPBACK}\:{running.port}"
    )
    with pytest.raises(RequestRejectedOrFailed) as info:
        await bounded(endpoint.connect(Factory.forProtocol(SpeakThenHalfClose)))
    assert info.value.code == 91


@pytest.fixture
def twistd_socks(tmp_path: Path) -> Iterator[int]:
    port = unused_port()
    process = subprocess.Popen(
        [str(TWISTD), "--nodaemon", "--pidfile=", "socks", "-p", str(port), "-i", LOOPBACK],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    yield port
    process.terminate()
    process.wait(timeout=20)


class SayAndWait(Protocol):
    """Write `greeting`, wait for as many bytes back, close: for proxies
    that turn a half-close into a full close (Twisted's own)."""

    def __init__(self, greeting: bytes, done: Deferred[bytes]) -> None:
        self.greeting, self.done, self.received = greeting, done, b""

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.greeting) and not self.done.called:
            self.done.callback(self.received)
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_through_twisteds_own_socks_server_by_name(twistd_socks, echo_server):
    await wait_until(lambda: accepts(twistd_socks), 20, "twistd socks to listen")
    endpoint = SOCKS4ClientEndpoint(
        "localhost", echo_server.port, clientFromString(reactor, f"tcp:{LOOPBACK}:{twistd_socks}")
    )
    done: Deferred[bytes] = Deferred()
    await bounded(endpoint.connect(Factory.forProtocol(lambda: SayAndWait(b"via twisted", done))))
    assert await bounded(done) == b"via twisted"


DANTE_CONF = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 port = {allowed} command: connect }}
socks block {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
"""


@pytest.fixture
def dante(tmp_path: Path, echo_server: Any) -> Iterator[int]:
    danted = executable("danted") or ("/usr/sbin/danted" if os.path.exists("/usr/sbin/danted") else None)
    if danted is None or os.geteuid() != 0:
        skip_unless_strict("needs root and danted (Debian's dante-server)")
    port = unused_port()
    conf = tmp_path / "danted.conf"
    conf.write_text(DANTE_CONF.format(port=port, allowed=echo_server.port))
    process = subprocess.Popen(
        [str(danted), "-f", str(conf), "-N", "1", "-p", str(tmp_path / "danted.pid")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield port
    process.terminate()
    process.wait(timeout=20)


@pytest_twisted.ensureDeferred
async def test_through_dante_by_address_and_its_refusal(dante, echo_server, unused_tcp_port):
    await wait_until(lambda: accepts(dante), 20, "danted to listen")
    eof, received = await half_close_round_trip(
        rf"socks4:{LOOPBACK}:{echo_server.port}:proxy=tcp\:{LOOPBACK}\:{dante}:user=alice"
    )
    assert (eof, received) == (True, b"hello")
    blocked = clientFromString(
        reactor, rf"socks4:{LOOPBACK}:{unused_tcp_port}:proxy=tcp\:{LOOPBACK}\:{dante}"
    )
    with pytest.raises(RequestRejectedOrFailed):
        await bounded(blocked.connect(Factory.forProtocol(SpeakThenHalfClose)))
