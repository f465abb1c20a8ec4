"""No socket outlives its pair: the linger time, on real sockets, against a real twistd.

The scenario that used to pin the proxy's descriptors for ever: a destination
accepts and never reads; a client pushes until the proxy pauses it, then
resets.  A paused socket is not watched by the reactor, and a flushing close
to a peer that never reads never ends; now the proxy notices the reset, gives
the destination side `--linger-timeout` seconds, then aborts it.  The same in
the other direction, and with TLS on the client side.

The waits below are bounds (linger + the paused-side check + a margin for a
loaded machine): without the fix the descriptors never come back at all.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
from pathlib import Path

import pytest

from socksident.socks4 import Command, build_request, parse_reply

from .conftest import recv_exactly
from .test_tls_endpoint import make_certificate
from .twistd_server import LOOPBACK, wait_for

pytestmark = pytest.mark.filterwarnings(
    "ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning"
)

LINGER = 1.0
BOUND = LINGER + 1.0 + 20.0  # linger + one paused-side check + a loaded machine's margin
CHUNK = b"x" * 65536
PAIRS = 4


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a RST, not a FIN."""
    raw = sock
    if isinstance(sock, ssl.SSLSocket):
        raw = socket.socket(fileno=sock.detach())
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


def push_until_stalled(sock: socket.socket, stall: float = 1.0) -> int:
    """Send until nothing more goes out for `stall` seconds (the proxy paused us)."""
    sock.settimeout(stall)
    sent = 0
    try:
        while True:
            sent += sock.send(CHUNK)
    except (socket.timeout, ssl.SSLWantWriteError):
        return sent


def destination() -> socket.socket:
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    listener.settimeout(20)
    return listener


def connect_through(server, listener: socket.socket, tls_cert: Path | None = None):
    """A granted CONNECT through `server` to `listener`; (client socket, accepted socket)."""
    raw = socket.create_connection((LOOPBACK, server.port), timeout=20)
    sock: socket.socket = raw
    if tls_cert is not None:
        context = ssl.create_default_context(cafile=str(tls_cert))
        sock = context.wrap_socket(raw, server_hostname=LOOPBACK)
    sock.sendall(build_request(Command.CONNECT, listener.getsockname()[1], LOOPBACK, "linger"))
    assert parse_reply(recv_exactly(sock, 8))[0] == 90
    accepted, _ = listener.accept()
    return sock, accepted


def dropped_by(server, side: str) -> list[int]:
    return [
        int(match.group(1))
        for line in server.access_lines()
        if (match := re.search(rf" cut-off={side} dropped=(\d+)$", line))
    ]


@pytest.fixture
def tls_port(tmp_path):
    key, cert = make_certificate(tmp_path)
    return f"ssl:{{port}}:interface={{interface}}:privateKey={key}:certKey={cert}", cert


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_client_that_resets_while_paused_frees_the_destination_side(
    twistd_server, tls_port, tls
):
    """The issue's measurement: the destination never reads, the client resets."""
    endpoint, cert = tls_port
    kwargs = {"endpoint": endpoint} if tls else {}
    server = twistd_server("--linger-timeout", f"{LINGER:g}", **kwargs)
    listener = destination()
    baseline = server.descriptors()
    held = []
    for _ in range(PAIRS):
        client, accepted = connect_through(server, listener, cert if tls else None)
        held.append(accepted)  # open, never read
        assert push_until_stalled(client) > 0
        reset(client)
    server.wait_descriptors(baseline, BOUND, "after the clients' resets ")
    wait_for(lambda: len(dropped_by(server, "remote")) == PAIRS, BOUND, "the access records")
    # what the destination never took: at least what its socket holds unread
    assert all(dropped > 0 for dropped in dropped_by(server, "remote"))
    for sock in held:
        sock.close()
    listener.close()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_client_that_stops_reading_is_cut_off_after_the_destination_is_gone(
    twistd_server, tls_port, tls
):
    """The other direction: the destination sends until the proxy pauses it,
    then resets; the client never reads."""
    endpoint, cert = tls_port
    kwargs = {"endpoint": endpoint} if tls else {}
    server = twistd_server("--linger-timeout", f"{LINGER:g}", **kwargs)
    listener = destination()
    baseline = server.descriptors()
    held = []
    for _ in range(PAIRS):
        client, accepted = connect_through(server, listener, cert if tls else None)
        held.append(client)  # open, never read again
        assert push_until_stalled(accepted) > 0
        reset(accepted)
    server.wait_descriptors(baseline, BOUND, "after the destinations' resets ")
    wait_for(lambda: len(dropped_by(server, "client")) == PAIRS, BOUND, "the access records")
    assert all(dropped > 0 for dropped in dropped_by(server, "client"))
    for sock in held:
        sock.close()
    listener.close()


def test_a_half_closed_relay_where_nothing_moves_ends_at_the_idle_timeout(twistd_server):
    """A FIN is not a side gone: the destination closes its sending side after
    a burst the client never reads, and nothing moves.  The linger time does
    not apply (the open side may still send); `--idle-timeout` ends it."""
    server = twistd_server("--linger-timeout", f"{LINGER:g}", "--idle-timeout", "3")
    listener = destination()
    baseline = server.descriptors()
    client, accepted = connect_through(server, listener)
    push_until_stalled(accepted)
    accepted.shutdown(socket.SHUT_WR)
    server.wait_descriptors(baseline, 3 + BOUND, "at the idle timeout ")
    wait_for(lambda: any("(idle for 3 s)" in line for line in server.access_lines()),
             BOUND, "the idle record")
    client.close()
    accepted.close()
    listener.close()
