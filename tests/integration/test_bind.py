"""BIND through the real server over real loopback sockets.

The proxy runs in-process on the reactor pytest-twisted drives.  Each
scenario's client and application server are blocking sockets run in one
thread (`deferToThread`), step by step as the protocol describes them: the
client CONNECTs to the application server, asks for a BIND, tells the
application server the announced address over the primary connection, and
the application server connects to it.  The last test runs a real program
that uses BIND: curl in active-mode FTP under Dante's `socksify`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import pytest_twisted
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import reactor, threads, utils
from twisted.internet.defer import Deferred
from twisted.protocols.ftp import FTPFactory, FTPRealm

from socksident.server import ServerSettings, SOCKS4ServerFactory

from .conftest import (
    LOOPBACK,
    bounded,
    executable,
    recv_exactly,
    skip_unless_strict,
    wait_until,
)

OTHER_LOOPBACK = "127.0.0.2"  # also this host, but not the address the client named
SOCKET_TIMEOUT = 15.0  # per blocking socket operation
THREAD_TIMEOUT = 60.0


# -- blocking helpers (they run in a thread, never on the reactor) --------------


def request(command: int, port: int, address: str, user: bytes = b"", hostname: bytes = b"") -> bytes:
    data = struct.pack("!BBH4s", 4, command, port, socket.inet_aton(address)) + user + b"\0"
    return data + (hostname + b"\0" if hostname else b"")


def read_reply(sock: socket.socket) -> tuple[int, int, str]:
    version, code, port, packed = struct.unpack("!BBH4s", recv_exactly(sock, 8))
    assert version == 0, f"reply version {version}"
    return code, port, socket.inet_ntoa(packed)


def recv_until_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def connect_socket(host: str, port: int, source: Optional[str] = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(SOCKET_TIMEOUT)
    if source is not None:
        sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def assert_refused(host: str, port: int, within: float = 5.0) -> None:
    """Connecting to host:port is refused (allowing the reactor a moment to close it)."""
    deadline = time.monotonic() + within
    while True:
        try:
            probe = socket.create_connection((host, port), timeout=SOCKET_TIMEOUT)
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            pass  # the listener closed while this connect sat in its queue
        else:
            # The listener may still sit in the reactor's close; a queued
            # connection is reset, never served.  Try again shortly.
            probe.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"{host}:{port} still accepts connections")
        time.sleep(0.02)


def can_bind(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


class Scenario:
    """A client, its application server, and the primary connection between them."""

    def __init__(self, proxy_port: int, proxy_host: str = LOOPBACK) -> None:
        self.proxy = (proxy_host, proxy_port)
        self.app_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.app_listener.settimeout(SOCKET_TIMEOUT)
        self.app_listener.bind((LOOPBACK, 0))
        self.app_listener.listen(4)
        self.app_port = self.app_listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.app_listener]

    def keep(self, sock: socket.socket) -> socket.socket:
        self.sockets.append(sock)
        return sock

    def primary(self) -> tuple[socket.socket, socket.socket]:
        """CONNECT to the application server; returns (client side, app side)."""
        control = self.keep(connect_socket(*self.proxy))
        control.sendall(request(1, self.app_port, LOOPBACK))
        code, _, _ = read_reply(control)
        assert code == 90, f"CONNECT got {code}"
        app_control, _ = self.app_listener.accept()
        app_control.settimeout(SOCKET_TIMEOUT)
        return control, self.keep(app_control)

    def bind(self, address: str = LOOPBACK, hostname: bytes = b"") -> tuple[socket.socket, tuple[int, int, str]]:
        data = self.keep(connect_socket(*self.proxy))
        data.sendall(request(2, self.app_port, address, b"tester", hostname))
        return data, read_reply(data)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def in_thread(function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    return bounded(threads.deferToThread(function, *args), THREAD_TIMEOUT)


# -- full sequences ------------------------------------------------------------------


def full_sequence(proxy_port: int, app_source: str, payload_down: bytes, payload_up: bytes) -> dict[str, Any]:
    scenario = Scenario(proxy_port)
    try:
        control, app_control = scenario.primary()
        data, first = scenario.bind()
        result: dict[str, Any] = {"first": first}
        code, port, host = first
        assert code == 90, f"first BIND reply {code}"
        # The application learns where to connect over the primary connection,
        # as FTP's PORT command does.
        control.sendall(f"PORT {host} {port}\r\n".encode())
        line = recv_exactly(app_control, len(f"PORT {host} {port}\r\n"))
        _, announced_host, announced_port = line.decode().split()
        inbound = scenario.keep(connect_socket(announced_host, int(announced_port), source=app_source))
        result["app_address"] = inbound.getsockname()
        result["second"] = read_reply(data)
        if result["second"][0] != 90:
            result["client_rest"] = recv_until_eof(data)
            result["app_rest"] = recv_until_eof(inbound)
        else:
            inbound.sendall(payload_down)
            inbound.shutdown(socket.SHUT_WR)
            data.sendall(payload_up)
            data.shutdown(socket.SHUT_WR)
            result["client_got"] = recv_until_eof(data)
            result["app_got"] = recv_until_eof(inbound)
        assert_refused(host, port)
        # The primary connection is untouched by what happened to the BIND.
        control.sendall(b"still there\r\n")
        result["primary_after"] = recv_exactly(app_control, len(b"still there\r\n"))
        return result
    finally:
        scenario.close()


@pytest_twisted.ensureDeferred
async def test_full_bind_sequence(proxy, log_capture):
    down = os.urandom(3 * 1024 * 1024)  # application server -> client
    up = os.urandom(1024 * 1024 + 7)  # client -> application server
    result = await in_thread(full_sequence, proxy.port, LOOPBACK, down, up)

    code, port, host = result["first"]
    assert host == LOOPBACK, "the listener's real address, the one the client connected to"
    assert port not in (0, proxy.port)
    app_host, app_port = result["app_address"]
    assert result["second"] == (90, app_port, app_host)
    assert app_host == LOOPBACK
    assert hashlib.sha256(result["client_got"]).digest() == hashlib.sha256(down).digest()
    assert hashlib.sha256(result["app_got"]).digest() == hashlib.sha256(up).digest()
    assert result["primary_after"] == b"still there\r\n"

    events = await log_capture.wait_for_access(2)
    [bind] = [e for e in events if e["command"] == "BIND"]
    assert bind["code"] == 90
    assert (bind["destination"], bind["address"]) == (LOOPBACK, LOOPBACK)
    assert (bind["bytes_up"], bind["bytes_down"]) == (len(up), len(down))


@pytest_twisted.ensureDeferred
async def test_inbound_from_another_address_gets_91(proxy, log_capture):
    if not can_bind(OTHER_LOOPBACK):
        skip_unless_strict(f"cannot bind a socket to {OTHER_LOOPBACK} on this host")
    result = await in_thread(full_sequence, proxy.port, OTHER_LOOPBACK, b"", b"")
    assert result["first"][0] == 90
    assert result["second"] == (91, 0, "0.0.0.0")
    # Both connections closed: no more bytes on either, just EOF (or reset).
    assert result["client_rest"] == b""
    assert result["app_rest"] == b""
    assert result["primary_after"] == b"still there\r\n"
    events = await log_capture.wait_for_access(2)
    [bind] = [e for e in events if e["command"] == "BIND"]
    assert bind["code"] == 91
    assert OTHER_LOOPBACK in bind["reason"]


def bind_and_wait(proxy_port: int) -> dict[str, Any]:
    scenario = Scenario(proxy_port)
    try:
        scenario.primary()
        data, first = scenario.bind()
        code, port, host = first
        assert code == 90, f"first BIND reply {code}"
        started = time.monotonic()
        second = read_reply(data)
        rest = recv_until_eof(data)
        waited = time.monotonic() - started
        assert_refused(host, port)
        return {"first": first, "second": second, "rest": rest, "waited": waited}
    finally:
        scenario.close()


@pytest_twisted.ensureDeferred
async def test_time_limit_closes_client_and_listener(start_proxy, log_capture):
    proxy = start_proxy(settings=ServerSettings(bind_timeout=0.5))
    result = await in_thread(bind_and_wait, proxy.port)
    assert result["second"] == (91, 0, "0.0.0.0")
    assert result["rest"] == b""
    assert 0.3 < result["waited"] < 5
    events = await log_capture.wait_for_access(2)
    [bind] = [e for e in events if e["command"] == "BIND"]
    assert bind["code"] == 91
    assert "no inbound BIND connection within 0.5 s" in bind["reason"]


def bind_and_leave(proxy_port: int, scenario_box: list[Scenario]) -> tuple[int, int, str]:
    scenario = Scenario(proxy_port)
    scenario_box.append(scenario)
    scenario.primary()
    data, first = scenario.bind()
    data.close()
    return first


@pytest_twisted.ensureDeferred
async def test_client_leaving_closes_the_listener(proxy, log_capture):
    box: list[Scenario] = []
    try:
        code, port, host = await in_thread(bind_and_leave, proxy.port, box)
        assert code == 90
        # Once the proxy has seen the client go (and logged it), nothing may
        # connect to the listener any more.  (Probing earlier would make the
        # probe the awaited inbound connection.)
        await wait_until(
            lambda: any(e["command"] == "BIND" for e in log_capture.access),
            10,
            "the BIND to end",
        )
        await in_thread(assert_refused, host, port)
    finally:
        for scenario in box:
            scenario.close()
    events = await log_capture.wait_for_access(2)
    [bind] = [e for e in events if e["command"] == "BIND"]
    assert "client closed" in bind["reason"]


def bind_alone(proxy_port: int) -> tuple[tuple[int, int, str], bytes]:
    scenario = Scenario(proxy_port)
    try:
        data, reply = scenario.bind()
        return reply, recv_until_eof(data)
    finally:
        scenario.close()


@pytest_twisted.ensureDeferred
async def test_bind_without_connect_is_refused_by_default(proxy, log_capture):
    reply, rest = await in_thread(bind_alone, proxy.port)
    assert (reply, rest) == ((91, 0, "0.0.0.0"), b"")
    [event] = await log_capture.wait_for_access(1)
    assert "BIND without an open CONNECT" in event["reason"]


@pytest_twisted.ensureDeferred
async def test_bind_without_connect_when_allowed(start_proxy, log_capture):
    proxy = start_proxy(settings=ServerSettings(bind_without_connect=True, bind_timeout=0.2))
    reply, rest = await in_thread(bind_alone, proxy.port)
    assert reply[0] == 90 and reply[2] == LOOPBACK
    assert rest == b"\x00\x5b" + bytes(6)  # then the time limit: 91, and EOF
    [event] = await log_capture.wait_for_access(1)
    assert event["code"] == 91


def bind_ports_sequence(proxy_port: int) -> dict[str, Any]:
    scenario = Scenario(proxy_port)
    try:
        scenario.primary()
        first_data, first = scenario.bind()
        _, second = scenario.bind()
        first_data.close()
        # Once the first BIND is gone its port is free for the next one.
        binds = 2
        deadline = time.monotonic() + 5
        while True:
            _, third = scenario.bind()
            binds += 1
            if third[0] == 90 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return {"first": first, "second": second, "third": third, "binds": binds}
    finally:
        scenario.close()


@pytest_twisted.ensureDeferred
async def test_bind_ports_range_exhausted_gets_91(start_proxy, log_capture):
    probe = socket.socket()
    probe.bind((LOOPBACK, 0))
    low = probe.getsockname()[1]
    probe.close()
    proxy = start_proxy(settings=ServerSettings(bind_ports=(low, low)))
    result = await in_thread(bind_ports_sequence, proxy.port)
    assert result["first"] == (90, low, LOOPBACK)
    assert result["second"] == (91, 0, "0.0.0.0")
    assert result["third"] == (90, low, LOOPBACK)
    events = await log_capture.wait_for_access(1 + result["binds"])
    refused = [e for e in events if e["command"] == "BIND" and e["code"] == 91]
    assert refused and all("no free port" in e["reason"] for e in refused)


def socks4a_bind(proxy_port: int) -> dict[str, Any]:
    scenario = Scenario(proxy_port)
    try:
        scenario.primary()
        data, first = scenario.bind("0.0.0.1", hostname=b"localhost")
        code, port, host = first
        assert code == 90, f"first BIND reply {code}"
        inbound = scenario.keep(connect_socket(host, port))
        second = read_reply(data)
        inbound.sendall(b"over 4A")
        return {"second": second, "app": inbound.getsockname(), "got": recv_exactly(data, 7)}
    finally:
        scenario.close()


@pytest_twisted.ensureDeferred
async def test_socks4a_bind_matches_what_the_name_resolves_to(proxy, log_capture):
    result = await in_thread(socks4a_bind, proxy.port)
    assert result["second"] == (90, result["app"][1], LOOPBACK)
    assert result["got"] == b"over 4A"
    events = await log_capture.wait_for_access(2)
    [bind] = [e for e in events if e["command"] == "BIND"]
    assert (bind["destination"], bind["address"], bind["code"]) == ("localhost", LOOPBACK, 90)


def _ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_dual_stack_proxy_announces_the_ipv4_address(log_capture):
    """A proxy listening on :: sees IPv4 clients as ::ffff:a.b.c.d; BIND must still
    listen on, and announce, the IPv4 address the client used."""
    if not _ipv6_available():
        skip_unless_strict("no IPv6 on this host")
    factory = SOCKS4ServerFactory()
    factory.noisy = False
    listening = reactor.listenTCP(0, factory, interface="::")
    try:
        result = await in_thread(full_sequence, listening.getHost().port, LOOPBACK, b"down", b"up")
    finally:
        await listening.stopListening()
    assert result["first"][2] == LOOPBACK
    assert result["second"][0] == 90
    assert (result["client_got"], result["app_got"]) == (b"down", b"up")
    await log_capture.wait_for_access(2)


# -- a real program that uses BIND: active-mode FTP under socksify ------------------


@pytest.fixture
def ftp_server(listen_tcp, tmp_path):
    root = tmp_path / "ftproot"
    root.mkdir()
    content = os.urandom(512 * 1024)
    (root / "payload.bin").write_bytes(content)
    portal = Portal(FTPRealm(str(root)), [AllowAnonymousAccess()])
    factory = FTPFactory(portal)
    factory.allowAnonymous = True
    factory.noisy = False
    port = listen_tcp(factory)
    return port, content


def _socksify_env(tmp_path: Path, proxy_port: int) -> dict[str, str]:
    conf = tmp_path / "socks.conf"
    conf.write_text(
        f"logoutput: {tmp_path / 'dante.log'}\n"
        "route {\n"
        f"    from: 0.0.0.0/0 to: 0.0.0.0/0 via: {LOOPBACK} port = {proxy_port}\n"
        "    proxyprotocol: socks_v4\n"
        "    command: bind connect\n"
        "}\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
    }
    env["SOCKS_CONF"] = str(conf)
    env["SOCKS_AUTOADD_LANROUTES"] = "no"
    return env


@pytest_twisted.ensureDeferred
async def test_active_ftp_through_socksify(proxy, ftp_server, log_capture, tmp_path):
    socksify, curl = executable("socksify"), executable("curl")
    if socksify is None:
        skip_unless_strict(
            "socksify is not installed (Debian package dante-client; `make test` installs it)"
        )
    if curl is None:
        skip_unless_strict("curl is not installed (`make test` installs it)")
    ftp_port, content = ftp_server
    env = _socksify_env(tmp_path, proxy.port)

    async def run(url: str) -> bytes:
        # --ftp-port -: active mode, the data connection comes from the server
        # to a socket the client "listens" on, which socksify turns into BIND.
        out, err, code = await bounded(
            utils.getProcessOutputAndValue(
                socksify,
                (curl, "--silent", "--show-error", "--max-time", "20", "--ftp-port", "-", url),
                env=env,
            ),
            40,
        )
        dante_log = tmp_path / "dante.log"
        assert code == 0, (
            f"curl exited {code}: {err!r}\n"
            + (dante_log.read_text()[-3000:] if dante_log.exists() else "")
        )
        return out

    listing = await run(f"ftp://{LOOPBACK}:{ftp_port}/")
    assert b"payload.bin" in listing
    got = await run(f"ftp://{LOOPBACK}:{ftp_port}/payload.bin")
    assert hashlib.sha256(got).digest() == hashlib.sha256(content).digest()

    # Two curl runs: each a CONNECT (FTP control) and a BIND (FTP data).
    await log_capture.wait_for_access(4)
    events = log_capture.access
    binds = [e for e in events if e["command"] == "BIND"]
    connects = [e for e in events if e["command"] == "CONNECT"]
    assert [e["code"] for e in binds] == [90, 90]
    assert all((e["destination"], e["port"]) == (LOOPBACK, ftp_port) for e in binds)
    # The file came over the BIND connection, through the relay.
    assert binds[1]["bytes_down"] == len(content)
    assert binds[0]["bytes_down"] >= len(listing)  # curl turns CRLF into LF
    assert [(e["code"], e["port"]) for e in connects] == [(90, ftp_port)] * 2
