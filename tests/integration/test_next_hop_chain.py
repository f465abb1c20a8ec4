"""Chains of real proxies on loopback sockets, where only the last can resolve a name.

Each proxy gets its own injected resolver (a name table), so "does not
resolve here" is decided per proxy in one process; the hops speak real
SOCKS4A over real sockets, plain TCP or TLS with certificates made here.
"""

from __future__ import annotations

import datetime
import os
import socket
import ipaddress
from pathlib import Path
from typing import Any, Optional, Union

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, quoteStringArgument, serverFromString
from twisted.internet.interfaces import IHostnameResolver, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from socksident.accesslog import AccessRecord
from socksident.nexthop import NextHop
from socksident.server import SOCKS4ServerFactory
from socksident.socks4 import RequestRejectedOrFailed
from tests.integration.conftest import LOOPBACK, SpeakThenHalfClose, bounded, wait_until

# Twisted's ssl: endpoint hands pyOpenSSL objects to pyOpenSSL; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning"
)

ONLY_AT_THE_END = "only-at-the-end.test"


def by_listener(events: list[Any]) -> dict[int, AccessRecord]:
    """The access records of a test, keyed by the port of the proxy that wrote each."""
    return {
        event["access_record"].connection.server_port: event["access_record"] for event in events
    }


@implementer(IHostnameResolver)
class NameTable:
    """Resolves the names it holds, and no others (as this proxy's DNS would)."""

    def __init__(self, names: Optional[dict[str, str]] = None) -> None:
        self.names = names or {}
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, **kw: Any) -> Any:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        if hostName in self.names:
            receiver.addressResolved(IPv4Address("TCP", self.names[hostName], portNumber))
        receiver.resolutionComplete()
        return None


# -- certificates: a CA and a server certificate for 127.0.0.1 it signed -----------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_ca(directory: Path, common: str) -> tuple[Any, x509.Certificate]:
    """A CA (key, certificate); its PEM is the only file in `directory` (a trustRoots dir)."""
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _pem(directory / "ca.pem", certificate.public_bytes(serialization.Encoding.PEM))
    return key, certificate


def make_server_certificate(
    directory: Path, ca: tuple[Any, x509.Certificate], ip: str, stem: str = "hop"
) -> tuple[Path, Path]:
    """A certificate for `ip` signed by `ca`; (key path, certificate path), named by `stem`."""
    ca_key, ca_certificate = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("next hop"))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key_path = _pem(
        directory / f"{stem}-key.pem",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path = _pem(
        directory / f"{stem}-cert.pem", certificate.public_bytes(serialization.Encoding.PEM)
    )
    return key_path, cert_path


# -- proxies -----------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def listening():
    ports: list[IListeningPort] = []

    async def listen(description: Union[str, Any], factory: SOCKS4ServerFactory) -> int:
        """Listen on a server endpoint description, or on a server endpoint."""
        factory.noisy = False
        endpoint = (
            serverFromString(reactor, description) if isinstance(description, str) else description
        )
        port = await bounded(endpoint.listen(factory), 5)
        ports.append(port)
        return int(port.getHost().port)

    yield listen
    for port in ports:
        await port.stopListening()


def proxy(resolver: NameTable, hop: Optional[str] = None) -> SOCKS4ServerFactory:
    """A proxy with its own name table and, given an endpoint string, a next hop."""
    next_hop = NextHop(clientFromString(reactor, hop), hop) if hop is not None else None
    return SOCKS4ServerFactory(resolver=resolver, next_hop=next_hop)


async def round_trip(first_port: int, destination_port: int, user: str = "alice") -> bytes:
    """hello through the first proxy to ONLY_AT_THE_END, half-closed, read to EOF."""
    done: Deferred[tuple[bool, bytes]] = Deferred()
    endpoint = clientFromString(
        reactor,
        rf"socks4:{ONLY_AT_THE_END}:{destination_port}:proxy=tcp\:{LOOPBACK}\:{first_port}"
        f":user={user}",
    )
    await bounded(endpoint.connect(Factory.forProtocol(lambda: SpeakThenHalfClose(b"hello", done))))
    eof, received = await bounded(done)
    assert eof
    return received


class AskAndWait(Protocol):
    """Sends a greeting, waits for its echo, then closes (no half-close: over TLS,
    Twisted turns a close_notify into a full close; see the README)."""

    def __init__(self, greeting: bytes, done: Deferred[bytes]) -> None:
        self.greeting, self.done, self.received = greeting, done, b""

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.greeting):
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.received)


async def echoed_over_tls(first_port: int, destination_port: int) -> bytes:
    done: Deferred[bytes] = Deferred()
    endpoint = clientFromString(
        reactor,
        rf"socks4:{ONLY_AT_THE_END}:{destination_port}:proxy=tcp\:{LOOPBACK}\:{first_port}",
    )
    await bounded(endpoint.connect(Factory.forProtocol(lambda: AskAndWait(b"hello", done))))
    return await bounded(done)


def tls_server(key: Path, cert: Path) -> str:
    return "ssl:0:interface={}:privateKey={}:certKey={}".format(
        quoteStringArgument(LOOPBACK), quoteStringArgument(str(key)), quoteStringArgument(str(cert))
    )


def tls_hop(host: str, port: int, roots: Path) -> str:
    return f"tls:host={host}:port={port}:trustRoots={quoteStringArgument(str(roots))}"


# -- the tests ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_three_proxies_where_only_the_last_resolves(
    listening, echo_server, access_events
):
    last_names = NameTable({ONLY_AT_THE_END: LOOPBACK})
    middle_names, first_names = NameTable(), NameTable()
    c = await listening(f"tcp:0:interface={LOOPBACK}", proxy(last_names))
    b = await listening(f"tcp:0:interface={LOOPBACK}", proxy(middle_names, f"tcp:{LOOPBACK}:{c}"))
    a = await listening(f"tcp:0:interface={LOOPBACK}", proxy(first_names, f"tcp:{LOOPBACK}:{b}"))

    assert await round_trip(a, echo_server.port, user="carol") == b"hello"
    assert echo_server.connections[0].received == b"hello"
    # each proxy tried the name itself; the name travelled on unresolved
    assert first_names.asked == middle_names.asked == last_names.asked == [ONLY_AT_THE_END]
    await echo_server.wait_all_closed()
    records = by_listener(access_events)
    assert set(records) == {a, b, c}
    assert records[a].next_hop == f"tcp:{LOOPBACK}:{b}" and records[a].next_hop_reply == "90"
    assert records[b].next_hop == f"tcp:{LOOPBACK}:{c}" and records[b].next_hop_reply == "90"
    assert records[c].next_hop is None and records[c].address == LOOPBACK
    # every hop saw the USERID, and its own client (the previous hop) as the client
    assert {record.request.user_id for record in records.values()} == {"carol"}
    assert all(record.connection.client_host == LOOPBACK for record in records.values())
    assert all(record.bytes_up == 5 and record.bytes_down == 5 for record in records.values())


@pytest_twisted.ensureDeferred
async def test_a_refusal_deeper_in_the_chain_is_91_to_our_client(listening, access_events):
    # the last proxy resolves the name, but nothing listens on port 1 there
    c = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable({ONLY_AT_THE_END: LOOPBACK})))
    b = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable(), f"tcp:{LOOPBACK}:{c}"))
    a = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable(), f"tcp:{LOOPBACK}:{b}"))
    with pytest.raises(RequestRejectedOrFailed) as info:
        await round_trip(a, 1)
    assert info.value.code == 91
    records = by_listener(access_events)
    assert records[c].replies == (91,) and records[c].next_hop is None
    assert records[b].next_hop_reply == "91" and records[a].next_hop_reply == "91"


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Any]:
    good_ca = make_ca(tmp_path / "good-ca", "socksident test CA")
    make_ca(tmp_path / "other-ca", "another CA")
    key, cert = make_server_certificate(tmp_path, good_ca, LOOPBACK)
    return {
        "key": key,
        "cert": cert,
        "good": tmp_path / "good-ca",
        "other": tmp_path / "other-ca",
    }


@pytest_twisted.ensureDeferred
async def test_the_next_hop_over_verified_tls(listening, echo_server, certificates, access_events):
    b = await listening(
        tls_server(certificates["key"], certificates["cert"]),
        proxy(NameTable({ONLY_AT_THE_END: LOOPBACK})),
    )
    hop = tls_hop(LOOPBACK, b, certificates["good"])
    a = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable(), hop))

    assert await echoed_over_tls(a, echo_server.port) == b"hello"
    await echo_server.wait_all_closed()
    first = by_listener(access_events)[a]
    assert first.next_hop == hop and first.next_hop_reply == "90"
    assert first.bytes_up == 5 and first.bytes_down == 5


def hop_log_lines() -> tuple[list[str], Any]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "socksident.establish":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    return lines, observe


@pytest.mark.parametrize(
    "roots, host, why",
    [
        ("other", LOOPBACK, "certificate verify failed"),  # a CA we do not trust
        ("good", "localhost", "localhost"),  # a name the certificate does not hold
    ],
    ids=["unknown-ca", "wrong-name"],
)
@pytest_twisted.ensureDeferred
async def test_a_hop_that_fails_verification_is_91_with_one_log_line(
    listening, echo_server, certificates, access_events, roots, host, why
):
    b = await listening(
        tls_server(certificates["key"], certificates["cert"]),
        proxy(NameTable({ONLY_AT_THE_END: LOOPBACK})),
    )
    hop = tls_hop(host, b, certificates[roots])
    a = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable(), hop))
    lines, observer = hop_log_lines()
    try:
        with pytest.raises(RequestRejectedOrFailed) as info:
            await echoed_over_tls(a, echo_server.port)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert info.value.code == 91
    assert echo_server.connections == []  # nothing went past the hop
    assert len(lines) == 1, lines
    assert hop in lines[0] and why in lines[0], lines[0]
    first = by_listener(access_events)[a]
    assert first.replies == (91,) and first.next_hop == hop
    assert first.next_hop_reply is not None and first.next_hop_reply != "90"


def rules_proxy(tmp_path: Path, text: str, resolver: NameTable, hop: str) -> SOCKS4ServerFactory:
    from socksident.policy import IdentMode
    from socksident.rules import RulesPolicy

    rules = tmp_path / "sockd.conf"
    rules.write_text(text)
    return SOCKS4ServerFactory(
        RulesPolicy(str(rules), IdentMode.OFF),
        resolver=resolver,
        next_hop=NextHop(clientFromString(reactor, hop), hop),
    )


@pytest_twisted.ensureDeferred
async def test_via_next_hop_sends_a_name_that_resolves_here_through_the_hop(
    tmp_path, listening, echo_server, access_events
):
    b = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable({ONLY_AT_THE_END: LOOPBACK})))
    hop = f"tcp:{LOOPBACK}:{b}"
    # A resolves the name too (to an address where nothing listens): the rule wins
    here = NameTable({ONLY_AT_THE_END: "127.0.0.9"})
    a = await listening(
        f"tcp:0:interface={LOOPBACK}",
        rules_proxy(tmp_path, "permit via=next-hop 127.0.0.0/8 .test\npermit 127.0.0.0/8\n", here, hop),
    )
    assert await round_trip(a, echo_server.port) == b"hello"
    await echo_server.wait_all_closed()
    records = by_listener(access_events)
    assert records[a].next_hop == hop and records[a].next_hop_reply == "90"
    assert records[a].rule is not None and records[a].rule.endswith("sockd.conf:1")
    assert records[b].address == LOOPBACK


@pytest_twisted.ensureDeferred
async def test_via_direct_keeps_an_unresolvable_name_from_the_hop(
    tmp_path, listening, echo_server, access_events
):
    last = NameTable({ONLY_AT_THE_END: LOOPBACK})
    b = await listening(f"tcp:0:interface={LOOPBACK}", proxy(last))
    a = await listening(
        f"tcp:0:interface={LOOPBACK}",
        rules_proxy(tmp_path, "permit via=direct 127.0.0.0/8\n", NameTable(), f"tcp:{LOOPBACK}:{b}"),
    )
    with pytest.raises(RequestRejectedOrFailed) as info:
        await round_trip(a, echo_server.port)
    assert info.value.code == 91
    assert last.asked == []  # the hop was never asked
    record = by_listener(access_events)[a]
    assert record.next_hop is None and "forbids the next hop (via=direct)" in record.reason


class Garbage(Protocol):
    """A 'next hop' that answers a SOCKS4 request with eight bytes that are no reply."""

    closed: list["Garbage"] = []

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.0")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        Garbage.closed.append(self)


@pytest.mark.parametrize("kind", ["down", "garbage"])
@pytest_twisted.ensureDeferred
async def test_a_hop_that_is_down_or_speaks_garbage_is_91(
    kind, listen_tcp, unused_tcp_port, listening, access_events
):
    Garbage.closed.clear()
    port = unused_tcp_port if kind == "down" else listen_tcp(Factory.forProtocol(Garbage))
    hop = f"tcp:{LOOPBACK}:{port}"
    a = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable(), hop))
    with pytest.raises(RequestRejectedOrFailed) as info:
        await round_trip(a, 1)
    assert info.value.code == 91
    record = by_listener(access_events)[a]
    assert record.next_hop == hop and record.replies == (91,)
    expected = "unreachable: " if kind == "down" else "bad reply: "
    assert record.next_hop_reply.startswith(expected), record.next_hop_reply
    if kind == "garbage":  # and we closed our connection to it
        await wait_until(lambda: len(Garbage.closed) == 1, 5, "the hop connection to close")


# -- BIND through the next hop -------------------------------------------------------


def bind_through_the_hop(a: int, down: bytes, up: bytes) -> dict[str, Any]:
    """Blocking, in a thread: the client's primary CONNECT and its BIND both go
    through A to the application server only B can name; the application
    server connects to where B listens.  Then each side half-closes in turn."""
    from tests.integration.test_bind import (
        connect_socket,
        read_reply,
        recv_until_eof,
        request,
    )

    name = ONLY_AT_THE_END.encode()
    app_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    app_listener.settimeout(15)
    app_listener.bind((LOOPBACK, 0))
    app_listener.listen(4)
    app_port = app_listener.getsockname()[1]
    sockets = [app_listener]
    try:
        control = connect_socket(LOOPBACK, a)
        sockets.append(control)
        control.sendall(request(1, app_port, "0.0.0.1", b"carol", name))
        assert read_reply(control)[0] == 90, "primary CONNECT"
        app_control, _ = app_listener.accept()
        sockets.append(app_control)

        data = connect_socket(LOOPBACK, a)
        sockets.append(data)
        data.sendall(request(2, app_port, "0.0.0.1", b"carol", name))
        result: dict[str, Any] = {"first": read_reply(data)}
        code, port, host = result["first"]
        assert code == 90, f"first BIND reply {code}"
        inbound = connect_socket(host, port)
        sockets.append(inbound)
        result["app_address"] = inbound.getsockname()
        result["second"] = read_reply(data)
        inbound.sendall(down)
        inbound.shutdown(socket.SHUT_WR)
        result["client_got"] = recv_until_eof(data)  # the FIN came through both hops
        data.sendall(up)  # and the other direction still flows
        data.shutdown(socket.SHUT_WR)
        result["app_got"] = recv_until_eof(inbound)
        control.close()
        app_control.close()
        return result
    finally:
        for sock in sockets:
            sock.close()


@pytest_twisted.ensureDeferred
async def test_a_bind_for_a_name_only_the_hop_resolves_goes_through_it(listening, access_events):
    from tests.integration.test_bind import in_thread

    b = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable({ONLY_AT_THE_END: LOOPBACK})))
    hop = f"tcp:{LOOPBACK}:{b}"
    first_names = NameTable()
    a = await listening(f"tcp:0:interface={LOOPBACK}", proxy(first_names, hop))
    down, up = os.urandom(256 * 1024), os.urandom(64 * 1024 + 3)

    result = await in_thread(bind_through_the_hop, a, down, up)

    code, port, host = result["first"]
    assert host == LOOPBACK and port not in (0, a, b)  # where B listens, as B said
    app_host, app_port = result["app_address"]
    assert result["second"] == (90, app_port, app_host)  # B's second reply, passed on
    assert result["client_got"] == down and result["app_got"] == up
    assert first_names.asked == [ONLY_AT_THE_END, ONLY_AT_THE_END]

    await wait_until(lambda: len(access_events) == 4, 10, "four access records")
    binds = [e["access_record"] for e in access_events if e["command"] == "BIND"]
    outer, inner = sorted(binds, key=lambda r: r.connection.server_port != a)
    assert outer.connection.server_port == a and inner.connection.server_port == b
    assert outer.replies == inner.replies == (90, 90)
    assert outer.next_hop == hop and outer.next_hop_reply == "90, 90"
    assert inner.next_hop is None and inner.address == LOOPBACK  # B's DSTIP check passed
    assert inner.request.user_id == "carol" and inner.request.hostname == ONLY_AT_THE_END
    for record in (outer, inner):
        assert (record.bytes_up, record.bytes_down) == (len(up), len(down))


# -- a TLS hop that requires a client certificate --------------------------------------


def requiring_client_certificates(key: Path, cert: Path, client_ca: x509.Certificate) -> Any:
    """A TLS listener that verifies its clients against `client_ca` and refuses
    those without a certificate (Twisted's ssl: description cannot ask this)."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ServerEndpoint

    server = ssl.PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes())
    authority = ssl.Certificate.loadPEM(client_ca.public_bytes(serialization.Encoding.PEM))
    options = server.options(authority)  # verify=True, requireCertificate=True
    return SSL4ServerEndpoint(reactor, 0, options, interface=LOOPBACK)


@pytest.mark.parametrize("with_certificate", [True, False], ids=["certificate", "none"])
@pytest_twisted.ensureDeferred
async def test_a_hop_that_requires_a_client_certificate(
    tmp_path, listening, echo_server, certificates, access_events, with_certificate
):
    client_ca = make_ca(tmp_path / "client-ca", "socksident client CA")
    client_key, client_cert = make_server_certificate(tmp_path, client_ca, LOOPBACK, "a")
    b = await listening(
        requiring_client_certificates(certificates["key"], certificates["cert"], client_ca[1]),
        proxy(NameTable({ONLY_AT_THE_END: LOOPBACK})),
    )
    hop = tls_hop(LOOPBACK, b, certificates["good"])
    if with_certificate:
        hop += ":certificate={}:privateKey={}".format(
            quoteStringArgument(str(client_cert)), quoteStringArgument(str(client_key))
        )
    a = await listening(f"tcp:0:interface={LOOPBACK}", proxy(NameTable(), hop))
    lines, observer = hop_log_lines()
    try:
        if with_certificate:
            assert await echoed_over_tls(a, echo_server.port) == b"hello"
            await echo_server.wait_all_closed()
        else:
            with pytest.raises(RequestRejectedOrFailed) as info:
                await echoed_over_tls(a, echo_server.port)
            assert info.value.code == 91
    finally:
        globalLogPublisher.removeObserver(observer)
    first = by_listener(access_events)[a]
    assert first.next_hop == hop
    if with_certificate:
        assert lines == []
        assert first.replies == (90,) and first.next_hop_reply == "90"
        assert by_listener(access_events)[b].replies == (90,)
    else:
        assert echo_server.connections == []
        assert len(lines) == 1, lines
        assert hop in lines[0] and "certificate required" in lines[0], lines[0]
        assert first.replies == (91,) and "certificate required" in first.next_hop_reply
