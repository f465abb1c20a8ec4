"""`dial` from a source address leaves the port to connect(): source ports are shared.

In a private network namespace whose ephemeral port range is two ports, a
process that binds (address, 0) before connecting gets at most two
connections from that address, whatever their destinations; `dial` asks
Linux to bind the address only (IP_BIND_ADDRESS_NO_PORT), so connect()
picks the port by the whole address pair and three destinations share it.
The ident client dials every query from the proxy's own address: without
this, TIME_WAIT sockets of earlier queries held the range, each bind
scanned longer for a free port, and a long run under load slowed down.
Needs root, unshare (util-linux) and ip (iproute2).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

from .conftest import skip_unless_strict

SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

# Run inside a fresh namespace: three listeners, then one connection to each
# from 127.0.0.1, bound first (argv "bind") or dialled; prints each source
# port, or the error.
SCENARIO = r"""
import json, socket, sys
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.protocol import Factory, Protocol
from socksident.dial import dial

with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 40001\n")
ports = (5001, 5002, 5003)
listeners = [socket.create_server(("127.0.0.1", port)) for port in ports]
sources, kept = [], []  # kept: every socket stays open, as a relay's would
if sys.argv[1] == "bind":
    for port in ports:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", 0))
            sock.connect(("127.0.0.1", port))
            sources.append(sock.getsockname()[1])
        except OSError as error:
            sources.append(error.errno)
        kept.append(sock)
else:
    def done(results):
        for ok, result in results:
            sources.append(result.transport.getHost().port if ok else repr(result.value))
        reactor.stop()

    factory = Factory.forProtocol(Protocol)
    attempts = [dial(reactor, "127.0.0.1", port, factory, source="127.0.0.1") for port in ports]
    DeferredList(attempts, consumeErrors=True).addCallback(done)
    reactor.callLater(20, reactor.stop)
    reactor.run()
print(json.dumps(sources))
"""


def source_ports(mode: str) -> list:
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, "-c", SCENARIO, mode],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PATH=SEARCH_PATH),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_dialled_connections_from_one_address_share_its_source_ports():
    if os.geteuid() != 0:
        skip_unless_strict("a private network namespace needs root")
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool, path=SEARCH_PATH) is None:
            skip_unless_strict(f"needs {tool} ({package})")
    # Bound first, a port is gone for every destination: two connections, then EADDRINUSE.
    bound = source_ports("bind")
    assert sorted(bound[:2]) == [40000, 40001] and bound[2] == errno.EADDRINUSE
    # Dialled, all three connect, sharing the range's two ports.
    dialled = source_ports("dial")
    assert len(dialled) == 3 and set(dialled) <= {40000, 40001}, dialled
